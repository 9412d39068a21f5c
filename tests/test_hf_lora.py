"""training.lora with implementation 'transformers' (planner/hf/lora.py): the estimate equals the
real step.

The estimate traces proxies of one to three blocks under FakeTensorMode and extrapolates
(planner/hf/estimate.py); the measurement runs the whole transformers model with the same
adapters for real on the CPU (planner/hf/step.py ``run``, 3 steps; steady = the highest of steps
2-3 per phase), or, with data_parallel 2, on 2 real gloo ranks under torchrun
(service/validation/hf_ranks.py). Tolerance: none, every category of every phase's peak, first
and steady step, to the byte. The adapters' bytes are also counted by hand (Hu et al. 2021:
A (r, in), B (out, r) per wrapped projection).
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

from planner.catalog.errors import PlanningError  # noqa: E402
from planner.catalog.specs import MemoryRequest, TrainingSpec, ValidationRequest  # noqa: E402
from planner.hf import estimate as E  # noqa: E402
from planner.hf import step as S  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

BASE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
LLAMA = {"model_type": "llama", **BASE}
QWEN2 = {"model_type": "qwen2", **BASE}
MISTRAL = {"model_type": "mistral", **BASE}
FULL = {"activation_checkpointing": {"strategy": "full"}}


def _training(lora: dict, **over) -> dict:
    return {"precision": "fp32", "optimizer": "adamw", "micro_batch_size": 2,
            "sequence_length": 16, "implementation": "transformers", "lora": lora, **over}


CASES = [
    ("llama fp32 adamw q,v", LLAMA, _training({"rank": 4, "target_modules": ["q", "v"]})),
    ("llama amp-bf16 adamw all, ckpt reentrant", LLAMA, _training(
        {"rank": 8, "alpha": 32, "target_modules": ["q", "k", "v", "o", "up", "gate", "down"]},
        precision="amp-bf16", transformers={"use_reentrant": True}, **FULL)),
    ("qwen2 bf16 sgd-momentum o,mlp", QWEN2, _training(
        {"rank": 2, "target_modules": ["o", "up", "gate", "down"]}, precision="bf16",
        optimizer="sgd-momentum")),
    ("mistral fp32 adam q,v ckpt", MISTRAL, _training(
        {"rank": 4, "target_modules": ["q", "v"]}, optimizer="adam", **FULL)),
]


@pytest.mark.parametrize("label, cfg, tr", CASES, ids=[c[0] for c in CASES])
def test_the_estimate_equals_the_real_step(label, cfg, tr):
    spec = TrainingSpec(**tr)
    est = E.estimate(cfg, spec)  # proxies extrapolated, or the whole model where they disagree
    assert est.traced_layers in ((1, 2, 3), (7,))
    real = S.run(cfg, spec, "cpu", traced=False, steps=3)
    for phase in S.PHASES:
        bd, op = max((s["phases"][phase] for s in real[1:]), key=lambda p: p[0]["total"])
        assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)
    assert est.first.breakdown == real[0]["peak"][0]


def test_only_the_adapters_train():
    # llama-tiny, q and v, rank 4: per layer A (4, 32) + B (32, 4) for q, A (4, 32) + B (16, 4)
    # for v (2 kv heads of 8): 448 parameters, x 7 layers, fp32
    tr = TrainingSpec(**_training({"rank": 4, "target_modules": ["q", "v"]}))
    est = E.estimate(LLAMA, tr)
    opt = est.steady_phases["optimizer"].breakdown
    adapters = 7 * 4 * ((32 + 32) + (32 + 16)) * 4
    assert opt["gradients"] == adapters
    # AdamW: exp_avg and exp_avg_sq per adapter tensor + one step scalar each (4 tensors/layer)
    assert opt["optimizer_states"] == 2 * adapters + 7 * 4 * 4
    plain = E.estimate(LLAMA, tr.model_copy(update={"lora": None}))
    # the parameters: the base plus the adapters
    assert opt["parameters"] == plain.steady_phases["optimizer"].breakdown["parameters"] + adapters


def test_data_parallel_ranks_with_adapters():
    from service.validation.hf_ranks import measure_ranks

    tr = _training({"rank": 4, "target_modules": ["q", "v", "down"]}, precision="amp-bf16")
    est = E.estimate(LLAMA, TrainingSpec(**tr), ddp=2)
    req = ValidationRequest(model={"hf_config": LLAMA}, training=tr,
                            parallelism={"data_parallel": 2}, steps=3, device="cpu")
    for r in measure_ranks(req, timeout_s=300):
        for phase, (bd, op) in r["steady"].items():
            assert (est.steady_phases[phase].breakdown, est.steady_phases[phase].op) == (bd, op)


def test_the_route_and_a_validation_job():
    from service.validation.runner import run_validation

    tr = CASES[0][2]
    res = estimate_memory(MemoryRequest(model={"hf_config": LLAMA}, training=tr), device="cpu")
    assert res.breakdown.model_dump() == E.estimate(LLAMA, TrainingSpec(**tr), device="cpu") \
        .steady.breakdown
    assert "lora" in {a.name for a in res.assumptions}
    job = run_validation(ValidationRequest(model={"hf_config": LLAMA}, training=tr, steps=3,
                                           device="cpu"))
    assert job.estimate == job.measured and job.first_step_estimate == job.first_step_measured


GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128}
PHI3 = {"model_type": "phi3", **BASE, "pad_token_id": 0}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 48, "intermediate_size": 80,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 101}


@pytest.mark.parametrize("cfg, lora, field", [
    (GPT2, {"target_modules": ["q"]}, "training.lora.target_modules"),  # Conv1D c_attn
    (PHI3, {"target_modules": ["q", "v"]}, "training.lora.target_modules"),  # qkv_proj fused
    (MIXTRAL, {"target_modules": ["q"]}, "training.lora"),
    (LLAMA, {"base_dtype": "nf4"}, "training.lora.base_dtype"),
], ids=["gpt2", "phi3", "mixtral", "qlora"])
def test_what_is_not_run_is_refused_naming_the_field(cfg, lora, field):
    from service.jobs.requirements import runner_refusal

    with pytest.raises(PlanningError) as exc:
        estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=_training(lora)),
                        device="cpu")
    assert exc.value.field == field
    # a validation job is refused at submission, before anything is built
    refused = runner_refusal(ValidationRequest(model={"hf_config": cfg},
                                               training=_training(lora), device="cpu"))
    assert refused is not None and refused[0].endswith(field)


def test_phi3s_separate_projections_take_adapters():
    # phi3 keeps o_proj and down_proj as nn.Linear: adapters there are run (and equal to real)
    tr = TrainingSpec(**_training({"rank": 4, "target_modules": ["o", "down"]}))
    est = E.estimate(PHI3, tr)
    real = S.run(PHI3, tr, "cpu", traced=False, steps=3)
    bd, _ = max((s["phases"]["optimizer"] for s in real[1:]), key=lambda p: p[0]["total"])
    assert est.steady_phases["optimizer"].breakdown == bd
    assert bd["gradients"] == 7 * 4 * ((32 + 32) + (48 + 32)) * 4
