"""MoE models (mixtral, qwen2_moe) with data-parallel ranks (DDP): the estimate equals real ranks.

As for dense models (tests/test_hf_data_parallel.py), the estimate traces ONE rank's step
(planner/hf/step.py wrapped in DistributedDataParallel(gradient_as_bucket_view=True)) under
FakeTensorMode on torch's fake process group, on proxies extrapolated over the blocks
(planner/hf/estimate.py); POST /v1/memory answers it for data_parallel > 1 at expert_parallel 1.
The measurement runs the whole model on 2 real ranks under ``torchrun --standalone
--nproc-per-node 2`` with gloo on the CPU (service/validation/hf_ranks.py), 3 steps, steady =
highest of steps 2-3 per phase. Every rank routes the same tokens (the same batch on every rank).
Tolerance: none, every category of every phase's peak of the first and the steady step, on every
rank, to the byte.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from planner.catalog.specs import MemoryRequest, TrainingSpec, ValidationRequest  # noqa: E402
from planner.hf import estimate as E  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402
from service.validation.hf_ranks import measure_ranks  # noqa: E402
from tests.test_hf_data_parallel import _training  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

MODELS = {
    # 7 blocks, period 1: proxies of 1, 2, 3 blocks extrapolated
    "mixtral": {"model_type": "mixtral", "hidden_size": 48, "intermediate_size": 80,
                "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 101},
    # every block sparse, with the shared expert and its gate: period 1, extrapolated
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 48, "intermediate_size": 80,
                  "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                  "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                  "vocab_size": 101},
    # sparse and dense blocks mixed (sparse step 2, block 3 dense): traced whole
    "qwen2_moe-mixed": {"model_type": "qwen2_moe", "hidden_size": 48, "intermediate_size": 80,
                        "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                        "num_hidden_layers": 4, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2,
                        "decoder_sparse_step": 2, "mlp_only_layers": [3], "vocab_size": 101},
}
CASES = [("mixtral", "fp32"), ("mixtral", "amp-bf16+ckpt"), ("qwen2_moe", "fp32"),
         ("qwen2_moe", "amp-bf16"), ("qwen2_moe-mixed", "fp32")]


@pytest.mark.parametrize("name, precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_one_traced_moe_rank_equals_every_real_rank(name, precision):
    cfg, tr = MODELS[name], _training(precision)
    est = E.estimate(cfg, TrainingSpec(**tr), ddp=2)
    assert est.extrapolated == (name != "qwen2_moe-mixed")
    req = ValidationRequest(model={"hf_config": cfg}, training=tr,
                            parallelism={"data_parallel": 2}, steps=3, device="cpu")
    ranks = measure_ranks(req, timeout_s=300)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        for phase, (bd, op) in r["steady"].items():
            assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)
        first = max(r["first"].values(), key=lambda p: p[0]["total"])
        assert est.first.breakdown == first[0]
    # what the one-device composition missed: the buckets, one gradient per parameter, live in
    # the forward window (where the one-device step holds none)
    one = E.estimate(cfg, TrainingSpec(**tr))
    fwd1, fwd2 = one.steady_phases["forward"].breakdown, est.steady_phases["forward"].breakdown
    assert fwd1["gradients"] == 0
    assert fwd2["gradients"] == one.steady_phases["optimizer"].breakdown["gradients"] > 0


def test_the_route_answers_the_ddp_rank_for_moe():
    cfg, tr = MODELS["mixtral"], _training("fp32")
    res = estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr,
                                        parallelism={"data_parallel": 2}), device="cpu")
    assert "data_parallel_ddp" in {a.name for a in res.assumptions}
    est = E.estimate(cfg, TrainingSpec(**tr), ddp=2)
    assert res.breakdown.model_dump() == est.steady.breakdown
    assert res.first_step.model_dump() == est.first.breakdown
    # the moe split: the experts' and the dense gradients add up to the buckets
    assert res.moe.expert_gradients + res.moe.dense_gradients == \
        est.steady_phases["optimizer"].breakdown["gradients"]


def test_a_validation_job_reports_every_moe_rank():
    from service.jobs.requirements import runner_refusal
    from service.validation.runner import run_validation

    req = ValidationRequest(model={"hf_config": MODELS["qwen2_moe-mixed"]},
                            training=_training("fp32"), parallelism={"data_parallel": 2},
                            steps=3, device="cpu")
    assert runner_refusal(req) is None
    res = run_validation(req)
    assert [r.rank for r in res.ranks] == [0, 1]
    assert all(r.estimate == r.measured for r in res.ranks)
    assert res.estimate == res.measured and res.first_step_estimate == res.first_step_measured
    # expert parallelism is estimated only: the rank program runs every expert on every rank
    ep = ValidationRequest(model={"hf_config": MODELS["mixtral"]}, training=_training("fp32"),
                           parallelism={"data_parallel": 2, "expert_parallel": 2}, device="cpu")
    refused = runner_refusal(ep)
    assert refused is not None and "expert_parallel" in refused[1]
