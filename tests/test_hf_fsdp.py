"""implementation 'transformers' under FSDP2 (zero_stage 3 and 2) and ZeRO-1 (DDP plus torch's
ZeroRedundancyOptimizer): traced ranks equal real ranks.

The estimate traces a rank's step (planner/hf/step.py with every decoder layer, then the root,
``fully_shard``-ed; planner/hf/fsdp.py) under FakeTensorMode on torch's fake process group, on
proxies extrapolated over the blocks where linear, else the whole model (planner/hf/estimate.py).
The measurement runs the whole model on 2 real ranks under ``torchrun --standalone
--nproc-per-node 2`` with gloo on the CPU and FSDP2's deterministic gloo collectives
(service/validation/hf_ranks.py, planner/hf/gloo_comms.py), 3 steps, steady = highest of steps
2-3 per phase. Each real rank is compared with the trace of that same rank. Tolerance: none,
every category of every phase's peak of the first and the steady step, to the byte.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from planner.catalog.errors import PlanningError  # noqa: E402
from planner.catalog.specs import MemoryRequest, TrainingSpec, ValidationRequest  # noqa: E402
from planner.hf import estimate as E  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402
from service.validation.hf_ranks import measure_ranks  # noqa: E402
from tests.test_hf_data_parallel import BASE, _training  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

MODELS = {
    "llama": {"model_type": "llama", **BASE},
    "qwen2": {"model_type": "qwen2", **BASE},
    # 129 embedding rows over 2 ranks: rank 0 holds 65, rank 1 64 (padded to 65)
    "qwen2-uneven": {"model_type": "qwen2", **BASE, "vocab_size": 129},
    "llama-uneven": {"model_type": "llama", **BASE, "vocab_size": 129, "intermediate_size": 50},
}
CASES = [("llama", "fp32", 3), ("llama", "amp-bf16", 3), ("llama", "fp32", 2),
         ("llama", "amp-bf16", 2), ("qwen2", "fp32", 3), ("qwen2", "amp-bf16", 2),
         ("qwen2-uneven", "amp-bf16", 3), ("qwen2-uneven", "fp32", 2),
         ("llama-uneven", "amp-bf16+ckpt", 3), ("llama", "bf16", 3),
         ("llama", "fp32", 1), ("qwen2-uneven", "amp-bf16", 1)]


@pytest.mark.parametrize("name, precision, zero", CASES,
                         ids=[f"{m}-{p}-zero{z}" for m, p, z in CASES])
def test_each_traced_rank_equals_its_real_rank(name, precision, zero):
    cfg, tr = MODELS[name], _training(precision)
    req = ValidationRequest(model={"hf_config": cfg}, training=tr,
                            parallelism={"data_parallel": 2, "zero_stage": zero}, steps=3,
                            device="cpu")
    ranks = measure_ranks(req, timeout_s=300)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        est = E.estimate(cfg, TrainingSpec(**tr), ddp=2, zero_stage=zero, rank=r["rank"])
        for phase, (bd, op) in r["steady"].items():
            assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)
        first = max(r["first"].values(), key=lambda p: p[0]["total"])
        assert est.first.breakdown == first[0]


def test_uneven_shards_make_rank_zero_the_largest():
    """torch.chunk gives rank 0 the extra row: its optimizer states (made from the unpadded
    shard) exceed rank 1's by the states of one row of each uneven parameter, while the padded
    sharded parameters and the reduce-scatter gradients are the same size on both."""
    cfg, tr = MODELS["qwen2-uneven"], TrainingSpec(**_training("fp32"))
    r0, r1 = (E.estimate(cfg, tr, ddp=2, zero_stage=3, rank=k).steady_phases["optimizer"]
              .breakdown for k in (0, 1))
    # adamw: exp_avg and exp_avg_sq, fp32, one 32-wide row of embed_tokens and of lm_head
    assert r0["optimizer_states"] - r1["optimizer_states"] == 2 * 2 * 32 * 4
    assert r0["parameters"] == r1["parameters"] and r0["gradients"] == r1["gradients"]
    assert r0["total"] > r1["total"]


def test_sharding_divides_the_model_states():
    """ZeRO-3's optimizer window holds half of DDP's gradients and optimizer states on 2 ranks
    (even shards), and its forward holds no gradient buckets."""
    cfg, tr = MODELS["llama"], TrainingSpec(**_training("fp32"))
    ddp, z3 = E.estimate(cfg, tr, ddp=2), E.estimate(cfg, tr, ddp=2, zero_stage=3)
    d, z = ddp.steady_phases["optimizer"].breakdown, z3.steady_phases["optimizer"].breakdown
    # adamw's 4-byte fp32 ``step`` per parameter tensor is whole on every rank: 9 tensors per
    # llama layer, plus embeddings, final norm and lm_head
    steps = 4 * (9 * 7 + 3)
    assert 2 * (z["optimizer_states"] - steps) == d["optimizer_states"] - steps
    assert 2 * z["gradients"] == d["gradients"]
    assert z3.steady_phases["forward"].breakdown["gradients"] == 0


def test_the_route_answers_fsdp_and_refuses_the_rest():
    cfg, tr = MODELS["qwen2-uneven"], _training("fp32")
    for zero in (2, 3):
        res = estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr,
                                            parallelism={"data_parallel": 2, "zero_stage": zero}),
                              device="cpu")
        assert "data_parallel_fsdp2" in {a.name for a in res.assumptions}
        est = E.estimate(cfg, TrainingSpec(**tr), ddp=2, zero_stage=zero, rank=0)
        assert res.breakdown.model_dump() == est.steady.breakdown
    for par, over, field in (
            ({"data_parallel": 1, "zero_stage": 1}, {}, "parallelism.zero_stage"),
            ({"data_parallel": 2, "zero_stage": 3}, {"precision": "amp-fp16"},
             "training.precision"),
            ({"data_parallel": 2, "zero_stage": 3}, {"optimizer_implementation": "fused"},
             "training.optimizer_implementation"),
            ({"data_parallel": 2, "zero_stage": 3, "offload_parameters": True}, {},
             "parallelism")):
        with pytest.raises(PlanningError) as exc:
            estimate_memory(MemoryRequest(model={"hf_config": cfg}, training={**tr, **over},
                                          parallelism=par), device="cpu")
        assert exc.value.field == field


def test_a_validation_job_compares_every_rank_with_its_own_trace():
    from service.validation.runner import run_validation

    req = ValidationRequest(model={"hf_config": MODELS["qwen2-uneven"]},
                            training=_training("fp32"),
                            parallelism={"data_parallel": 2, "zero_stage": 3}, steps=3,
                            device="cpu")
    res = run_validation(req)
    assert [r.rank for r in res.ranks] == [0, 1]
    assert all(r.estimate == r.measured for r in res.ranks)
    assert res.ranks[0].estimate.total > res.ranks[1].estimate.total
    assert res.worst_rank == res.worst_measured_rank == 0
    assert res.estimate == res.measured and res.first_step_estimate == res.first_step_measured
    assert "FSDP2 ZeRO-3" in res.device


def test_zero1_partition_is_torchs():
    """The partition the route picks its ranks by is the one ZeroRedundancyOptimizer makes."""
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from planner.hf.fsdp import zero1_partition

    numels = [7, 300, 12, 300, 45, 1, 128, 64, 64, 3]
    for world in (2, 3, 4):
        with E.fake_group(world):
            params = [torch.nn.Parameter(torch.zeros(n)) for n in numels]
            opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, lr=0.1)
            got = [sum(p.numel() for g in groups for p in g["params"])
                   for groups in opt._partition_parameters()]
        assert got == zero1_partition(numels, world)


def test_the_route_answers_zero1_with_the_worst_rank():
    """ZeRO-1 on 3 ranks: every rank traced, the route's answer is the highest of them."""
    cfg, tr = MODELS["qwen2-uneven"], _training("fp32")
    res = estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr,
                                        parallelism={"data_parallel": 3, "zero_stage": 1}),
                          device="cpu")
    assert "data_parallel_zero1" in {a.name for a in res.assumptions}
    per_rank = [E.estimate(cfg, TrainingSpec(**tr), ddp=3, zero_stage=1, rank=k).steady.breakdown
                for k in range(3)]
    assert len({bd["optimizer_states"] for bd in per_rank}) > 1  # the shares differ
    assert res.breakdown.model_dump() == max(per_rank, key=lambda bd: bd["total"])


def test_proxies_past_the_one_block_proxy_extrapolate():
    """ZeRO-3's one-block proxy peaks in backward at the loss, more blocks in a layer's backward:
    the proxies of 2, 3 and 4 blocks extrapolate a 10-block model, equal to its real ranks."""
    cfg, tr = {**MODELS["llama"], "num_hidden_layers": 10}, _training("fp32")
    req = ValidationRequest(model={"hf_config": cfg}, training=tr,
                            parallelism={"data_parallel": 2, "zero_stage": 3}, steps=3,
                            device="cpu")
    ranks = measure_ranks(req, timeout_s=300)
    for r in ranks:
        est = E.estimate(cfg, TrainingSpec(**tr), ddp=2, zero_stage=3, rank=r["rank"])
        assert est.extrapolated and est.traced_layers == (2, 3, 4)
        for phase, (bd, op) in r["steady"].items():
            assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)
        first = max(r["first"].values(), key=lambda p: p[0]["total"])
        assert est.first.breakdown == first[0]


def test_a_zero1_validation_job_reports_the_highest_estimated_rank():
    from service.validation.runner import run_validation

    req = ValidationRequest(model={"hf_config": MODELS["qwen2-uneven"]},
                            training=_training("amp-bf16"),
                            parallelism={"data_parallel": 2, "zero_stage": 1}, steps=3,
                            device="cpu")
    res = run_validation(req)
    assert all(r.estimate == r.measured for r in res.ranks)
    e = max(res.ranks, key=lambda r: (r.estimate.total, -r.rank))
    assert res.worst_rank == e.rank and res.estimate == e.estimate
    assert res.estimate == res.measured and res.first_step_estimate == res.first_step_measured
    assert "ZeroRedundancyOptimizer" in res.device
