"""implementation 'transformers' with amp-fp16, mixed-bf16 and mixed-fp16 (planner/hf/precision.py).

Measured as tests/test_hf_estimate.py measures: the estimate (proxies traced under FakeTensorMode
and extrapolated) against the real CPU step of the whole model, 3 steps, steady state = the
highest of steps 2-3. Tolerance: none, every category of the first and the steady step to the
byte. The precisions are the reference step's (service/validation/step.py): the master-weight
optimizer is held equal to the reference's, update for update.
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from planner.catalog.specs import MemoryRequest, TrainingSpec  # noqa: E402
from planner.hf import precision as P  # noqa: E402
from planner.hf import step as S  # noqa: E402
from planner.routes.memory import estimate_memory  # noqa: E402

warnings.filterwarnings("ignore", message=".*deprecated.*")

# 7 blocks: more than the three proxies of one to three blocks, so they are extrapolated
BASE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
MODELS = {
    "llama": {"model_type": "llama", **BASE},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 7, "n_head": 4, "n_positions": 32,
             "vocab_size": 128},
    "mixtral": {"model_type": "mixtral", **BASE, "num_local_experts": 4,
                "num_experts_per_tok": 2},
}
CASES = [
    ("llama", {"precision": "amp-fp16", "optimizer": "adamw"}),
    ("llama", {"precision": "amp-fp16", "optimizer": "sgd",
               "activation_checkpointing": {"strategy": "full"}}),
    ("llama", {"precision": "mixed-bf16", "optimizer": "sgd"}),
    ("llama", {"precision": "mixed-fp16", "optimizer": "adamw", "gradient_accumulation_steps": 2}),
    ("gpt2", {"precision": "amp-fp16", "optimizer": "sgd"}),
    ("gpt2", {"precision": "mixed-bf16", "optimizer": "adamw"}),
    ("gpt2", {"precision": "mixed-fp16", "optimizer": "sgd", "attention": "eager"}),
    ("mixtral", {"precision": "amp-fp16", "optimizer": "adamw"}),
    ("mixtral", {"precision": "mixed-bf16", "optimizer": "sgd"}),
    ("mixtral", {"precision": "mixed-fp16", "optimizer": "adamw"}),
    # LoRA (planner/hf/lora.py): the masters and states of the adapters only
    ("llama", {"precision": "mixed-fp16", "optimizer": "adamw",
               "lora": {"rank": 4, "alpha": 8, "target_modules": ["q", "v"]}}),
]


def _training(over: dict) -> dict:
    return {"micro_batch_size": 2, "sequence_length": 16, "implementation": "transformers",
            **over}


def _estimate(cfg: dict, tr: dict):
    return estimate_memory(MemoryRequest(model={"hf_config": cfg}, training=tr), device="cpu")


@pytest.mark.parametrize("name, over", CASES,
                         ids=[f"{m}-{o['precision']}-{o['optimizer']}" for m, o in CASES])
def test_estimate_equals_the_real_step(name, over):
    cfg, tr = MODELS[name], _training(over)
    est = _estimate(cfg, tr)
    steps = S.run(cfg, TrainingSpec(**tr), "cpu", traced=False, steps=3)
    assert not any(s["skipped"] for s in steps)  # the scalers found no overflow
    steady = max(steps[1:], key=lambda s: s["peak"][0]["total"])
    assert est.breakdown.model_dump() == steady["peak"][0]
    assert est.first_step.model_dump() == steps[0]["peak"][0]
    assert est.peak_phase == f"{steady['peak'][2]}: {steady['peak'][1]}"


def test_model_and_master_dtypes():
    """What each precision builds: the model's dtype, fp32 masters for mixed-*, a GradScaler
    only for amp-fp16, the static scale only for mixed-fp16."""
    cfg = MODELS["llama"]
    for prec, dtype, master in (("amp-fp16", torch.float32, False),
                                ("mixed-bf16", torch.bfloat16, True),
                                ("mixed-fp16", torch.float16, True)):
        tr = TrainingSpec(**_training({"precision": prec, "optimizer": "sgd"}))
        model, opt = S.build(cfg, tr, torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert isinstance(opt, P.MasterWeights) == master
        if master:
            assert {m.dtype for m in opt.masters} == {torch.float32}
        scaling = P.LossScaling(prec, "cpu", traced=False)
        assert (scaling.scaler is not None) == (prec == "amp-fp16")
        assert scaling.static == (2.0**10 if prec == "mixed-fp16" else 1.0)


@pytest.mark.parametrize("loss_scale", [1.0, 2.0**10])
def test_master_weights_step_fp32_masters(loss_scale):
    """MasterWeights (also the reference step's MasterWeightOptimizer, service/validation/step.py)
    against the scheme written out by hand: fp32 copies of the 16-bit parameters stepped by the
    inner optimizer on the gradients cast to fp32 and unscaled, the 16-bit parameters copied
    from them; a step whose gradients are not all finite (checked under a loss scale) skipped.
    Bit for bit."""
    from service.validation.step import MasterWeightOptimizer

    assert MasterWeightOptimizer is P.MasterWeights  # one implementation for both steps
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(5, 3, generator=g).half(), torch.randn(7, generator=g).half()]
    grads = [[torch.randn(5, 3, generator=g).half(), torch.randn(7, generator=g).half()]
             for _ in range(3)]
    if loss_scale != 1.0:  # the second step overflows (checked under a loss scale only)
        grads[1][1][2] = float("inf")
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)  # noqa: E731

    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = P.MasterWeights(params, adamw, loss_scale)
    masters = [torch.nn.Parameter(t.float()) for t in init]
    by_hand = adamw(masters)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fp32 = [gr.float() * (1.0 / loss_scale) for gr in gs]
        skipped = loss_scale != 1.0 and not all(bool(torch.isfinite(x).all()) for x in fp32)
        assert opt.skipped == skipped
        if not skipped:
            for m, gr in zip(masters, fp32):
                m.grad = gr
            by_hand.step()
        assert all(torch.equal(p.detach(), m.detach().half()) for p, m in zip(params, masters))
    assert not torch.equal(params[0].detach(), init[0])


def _overflow_first_backward(monkeypatch):
    """An overflow in the first backward: one gradient set to inf once accumulated (in place,
    no allocation), as a loss scale too high for the step's gradients makes."""
    orig = S.build

    def build(*args, **kwargs):
        model, opt = orig(*args, **kwargs)
        p, seen = next(model.parameters()), []

        def hook(param):
            if not seen:
                seen.append(1)
                param.grad.fill_(float("inf"))

        p.register_post_accumulate_grad_hook(hook)
        return model, opt

    monkeypatch.setattr(S, "build", build)


@pytest.mark.parametrize("over", [{"precision": "amp-fp16", "optimizer": "adamw"},
                                  {"precision": "amp-fp16", "optimizer": "sgd"},
                                  {"precision": "mixed-fp16", "optimizer": "adamw"}])
def test_a_skipped_first_step(monkeypatch, over):
    """The loss scalers skip a step whose gradients overflow, a value the real step reads. The
    estimate describes steps that are taken (a trace runs the check's ops and takes the step).
    When the first step is skipped: it peaks no higher than the estimated first step (no
    optimizer states made, no step scratch); the first step taken peaks as the estimated first step,
    plus at most GradScaler's scale and growth tracker (8 bytes, made at the first scale() and
    kept) when that peak is in the forward; the steps after it as the estimated steady step."""
    cfg, tr = MODELS["llama"], _training(over)
    est = _estimate(cfg, tr)
    assert "every step taken" in {a.name: a.note for a in est.assumptions}["loss_scaling"]
    _overflow_first_backward(monkeypatch)
    steps = S.run(cfg, TrainingSpec(**tr), "cpu", traced=False, steps=3)
    assert [s["skipped"] for s in steps] == [True, False, False]
    skipped, first, steady = (s["peak"][0] for s in steps)
    assert skipped["total"] <= est.first_step.total
    # the inner optimizer made no states (mixed-fp16's fp32 masters exist from the start)
    masters = 4 * sum(p.numel() for p in S.build(cfg, TrainingSpec(**tr), "cpu")[0].parameters())
    assert skipped["optimizer_states"] == (masters if over["precision"] == "mixed-fp16" else 0)
    extra = first["total"] - est.first_step.total
    assert extra == (8 if steps[1]["peak"][2] == "forward" and over["precision"] == "amp-fp16"
                     else 0)
    assert steady == est.breakdown.model_dump()


def test_expert_states_of_mixed_precision_are_the_built_model():
    """Expert parallelism's split (planner/layouts/expert.py) under mixed-bf16: the routed
    experts' bf16 parameters, and their fp32 masters plus AdamW states, measured on the real
    model after one step."""
    from planner.catalog.hf_config import normalize
    from planner.layouts import expert

    cfg = MODELS["mixtral"]
    tr = TrainingSpec(**_training({"precision": "mixed-bf16", "optimizer": "adamw"}))
    model, opt = S.build(cfg, tr, torch.device("cpu"))
    model(**S.make_batch(128, tr, "cpu", traced=False)).loss.backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    params = states = 0
    for p, m in zip(opt.model_params, opt.masters):
        if ".experts." in names[id(p)]:
            params += p.nbytes
            states += m.nbytes + sum(v.nbytes for v in opt.state[m].values())
    got = expert.split(normalize(cfg), tr, 1)
    assert got[0] == params > 0
    assert got[2] == states > 6 * params  # 2-byte parameters: 4 + 4 + 4 bytes of fp32 each


@pytest.mark.parametrize("mode", ["real", "traced"])
def test_validation_job_measures_these_precisions(mode):
    """A validation job (service/validation/runner.py) runs the same step module on the whole
    model: real, or traced (the loss scalers' reads taken as no overflow, as in the estimate)."""
    from planner.catalog.specs import ValidationRequest
    from service.validation.runner import run_validation

    for prec in ("amp-fp16", "mixed-fp16"):
        req = ValidationRequest(model={"hf_config": MODELS["gpt2"]}, mode=mode, steps=3,
                                device="cpu", training=_training({"precision": prec,
                                                                  "optimizer": "adamw"}))
        res = run_validation(req)
        assert res.measured == res.estimate
        assert res.first_step_measured == res.first_step_estimate
