"""implementation 'transformers' with data-parallel ranks (DDP): the estimate equals real ranks.

The estimate traces ONE rank's step (planner/hf/step.py wrapped in
DistributedDataParallel(gradient_as_bucket_view=True)) under FakeTensorMode on torch's fake
process group, on proxies of one to three blocks extrapolated over the blocks
(planner/hf/estimate.py). The measurement runs the whole model on 2 real ranks under
``torchrun --standalone --nproc-per-node 2`` with gloo on the CPU (service/validation/hf_ranks.py),
3 steps, steady = highest of steps 2-3 per phase. Tolerance: none, every category of every
phase's peak of the first and the steady step, on every rank, to the byte.
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

warnings.filterwarnings("ignore", message=".*deprecated.*")

BASE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
MODELS = {
    "llama": {"model_type": "llama", **BASE},
    "qwen2": {"model_type": "qwen2", **BASE},
    # 3.4 M parameters, 13.6 MB of fp32 gradients: past DDP's 1 MB first-bucket cap, so the
    # reducer's rebuild before the second forward re-cuts the one initial bucket into several
    "llama-wide": {"model_type": "llama", **BASE, "hidden_size": 256, "intermediate_size": 512,
                   "vocab_size": 1024},
}
CASES = [("llama", "fp32"), ("llama", "amp-bf16"), ("qwen2", "fp32"), ("qwen2", "amp-bf16"),
         ("llama-wide", "fp32"), ("llama", "amp-bf16+ckpt"),
         # GradScaler; 16-bit models with fp32 master weights (planner/hf/precision.py)
         ("llama", "amp-fp16"), ("qwen2", "mixed-bf16"), ("llama", "mixed-fp16")]


def _training(precision: str) -> dict:
    ckpt = precision.endswith("+ckpt")  # every decoder layer checkpointed (use_reentrant False)
    return {"precision": precision.removesuffix("+ckpt"), "optimizer": "adamw",
            "micro_batch_size": 2, "sequence_length": 16, "implementation": "transformers",
            **({"activation_checkpointing": {"strategy": "full"}} if ckpt else {})}


@pytest.mark.parametrize("name, precision", CASES, ids=[f"{m}-{p}" for m, p in CASES])
def test_one_traced_rank_equals_every_real_rank(name, precision):
    cfg, tr = MODELS[name], _training(precision)
    est = E.estimate(cfg, TrainingSpec(**tr), ddp=2)
    assert est.extrapolated and est.traced_layers == (1, 2, 3)
    req = ValidationRequest(model={"hf_config": cfg}, training=tr,
                            parallelism={"data_parallel": 2}, steps=3, device="cpu")
    ranks = measure_ranks(req, timeout_s=300)
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        for phase, (bd, op) in r["steady"].items():
            assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)
        first = max(r["first"].values(), key=lambda p: p[0]["total"])
        assert est.first.breakdown == first[0]


def test_ddp_holds_the_buckets_from_the_start():
    """The reducer's buckets are the gradients from the wrap on: the first forward already holds
    one gradient per parameter, which the one-device step does not."""
    cfg, tr = MODELS["llama"], TrainingSpec(**_training("fp32"))
    one, two = E.estimate(cfg, tr), E.estimate(cfg, tr, ddp=2)
    fwd1, fwd2 = one.steady_phases["forward"].breakdown, two.steady_phases["forward"].breakdown
    assert fwd1["gradients"] == 0  # set_to_none: no gradient lives in the one-device forward
    # the buckets: every parameter's gradient, as many bytes as the one-device optimizer step's
    assert fwd2["gradients"] == one.steady_phases["optimizer"].breakdown["gradients"] > 0


def test_the_route_answers_ddp_and_refuses_the_rest():
    cfg, tr = MODELS["llama"], _training("fp32")
    res = estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr,
                                        parallelism={"data_parallel": 4}), device="cpu")
    assert "data_parallel_ddp" in {a.name for a in res.assumptions}
    assert res.breakdown.model_dump() == {
        **E.estimate(cfg, TrainingSpec(**tr), ddp=4).steady.breakdown}
    # ZeRO 1-3: tests/test_hf_fsdp.py
    for par, field in (({"data_parallel": 2, "tensor_parallel": 2}, "parallelism"),
                       ({"tensor_parallel": 2}, "parallelism")):
        with pytest.raises(PlanningError) as exc:
            estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr,
                                          parallelism=par), device="cpu")
        assert exc.value.field == field


def test_a_validation_job_reports_every_rank():
    from service.validation.runner import run_validation

    req = ValidationRequest(model={"hf_config": MODELS["llama"]}, training=_training("fp32"),
                            parallelism={"data_parallel": 2}, steps=3, device="cpu")
    res = run_validation(req)
    assert [r.rank for r in res.ranks] == [0, 1]
    assert all(r.estimate == r.measured for r in res.ranks)
    assert res.estimate == res.measured and res.first_step_estimate == res.first_step_measured


def test_what_the_rank_program_does_not_run_is_refused_at_submission():
    from service.jobs.requirements import runner_refusal

    for over in ({"mode": "traced"}, {"device": "cuda"}):
        req = ValidationRequest(model={"hf_config": MODELS["llama"]}, training=_training("fp32"),
                                parallelism={"data_parallel": 2}, **over)
        assert runner_refusal(req) is not None
