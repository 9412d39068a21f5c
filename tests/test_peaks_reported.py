"""Which peak each reported figure is: the step's peak, the forward/backward peak, the activation
peak. When the optimizer step holds the step's peak, its breakdown has (almost) no activations;
the activation peak and the forward/backward peak are reported beside it, measured on the replay
and on the real step (CPU, LiveMemoryMeter) to the byte."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from planner.catalog.presets import resolve_model
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.routes.memory import estimate_memory
from planner.step.program import ReferenceProgram
from planner.catalog.specs import MemoryRequest, ModelSpec, TrainingSpec
from planner.machine.stepsim import Machine
from service.app import create_app

GiB = 2**30
LLAMA7B = {"model": {"preset": "llama-2-7b"},
           "training": {"precision": "mixed-bf16", "optimizer": "adamw", "micro_batch_size": 1,
                        "sequence_length": 4096}}


def _with(body: dict, strategy: str) -> dict:
    return {**body, "training": {**body["training"],
                                 "activation_checkpointing": {"strategy": strategy}}}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app()) as c:
        yield c


def test_optimizer_peak_reports_the_activation_peak_beside_it(client):
    none = client.post("/v1/memory", json=_with(LLAMA7B, "none")).json()
    full = client.post("/v1/memory", json=_with(LLAMA7B, "full")).json()
    for r in (none, full):
        # the step's peak: the foreach AdamW step over fp32 masters, no activations live but
        # the input ids and targets
        assert r["peak_phase"] == "optimizer: optimizer_step"
        assert r["breakdown"]["activations"] == 2 * 4096 * 8
        assert r["breakdown"]["temporaries"] > 50 * GiB
        fb = r["forward_backward_peak"]
        assert fb["total"] < r["breakdown"]["total"]
        assert fb["total"] == sum(fb[c] for c in ("parameters", "gradients", "optimizer_states",
                                                  "activations", "temporaries"))
        assert fb["activations"] <= r["activation_peak_bytes"]
        assert r["forward_backward_peak_phase"].startswith("backward")
    # checkpointing every block lowers the activation peak tenfold, not the step's peak
    assert none["activation_peak_bytes"] > 24 * GiB
    assert full["activation_peak_bytes"] < none["activation_peak_bytes"] / 9
    assert full["forward_backward_peak"]["total"] < none["forward_backward_peak"]["total"]
    assert full["breakdown"] == none["breakdown"]


def test_checkpointing_route_reports_the_activation_peak(client):
    none = client.post("/v1/checkpointing", json={**LLAMA7B, "strategy": "none"}).json()
    full = client.post("/v1/checkpointing", json={**LLAMA7B, "strategy": "full"}).json()
    mem = client.post("/v1/memory", json=_with(LLAMA7B, "full")).json()
    assert full["activation_peak_bytes"] == mem["activation_peak_bytes"]
    assert full["forward_backward_peak_bytes"] == mem["forward_backward_peak"]["total"]
    assert full["total_peak_bytes"] == mem["breakdown"]["total"] == none["total_peak_bytes"]
    assert full["activation_peak_bytes"] < none["activation_peak_bytes"] / 9
    # no longer the optimizer's temporaries (50.2 GiB for both strategies)
    assert none["activation_peak_bytes"] != none["breakdown"]["temporaries"]
    assert none["activation_peak_bytes"] < 25 * GiB


def test_forward_backward_peak_is_the_breakdown_when_the_peak_falls_there():
    r = estimate_memory(MemoryRequest.model_validate({
        "model": {"preset": "gpt2"}, "training": {"micro_batch_size": 8,
                                                  "sequence_length": 1024}}))
    assert not r.peak_phase.startswith("optimizer")
    assert r.forward_backward_peak == r.breakdown
    assert r.forward_backward_peak_phase == r.peak_phase
    assert r.breakdown.activations <= r.activation_peak_bytes


def test_bare_parameter_count_has_no_activation_peak():
    r = estimate_memory(MemoryRequest.model_validate({"model": {"num_parameters": 10**9}}))
    assert r.activation_peak_bytes is None and r.forward_backward_peak is None


class _Watching(Machine):
    """The machine, watching the live activation bytes after every allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def alloc(self, nbytes, name, cat=None):
        b = super().alloc(nbytes, name, cat)
        if self.phase != "optimizer":
            self.seen = max(self.seen, self.cur[3])
        return b


@pytest.mark.parametrize("strategy", ["none", "full", "every-k"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_max_is_the_highest_live_activations(family, strategy):
    arch = {"family": family, "num_layers": 9, "hidden_size": 64, "num_heads": 4,
            "vocab_size": 300, "max_sequence_length": 256}
    model = resolve_model(ModelSpec.model_validate(arch))
    tr = TrainingSpec.model_validate({"micro_batch_size": 3, "sequence_length": 100,
                                      "activation_checkpointing": {"strategy": strategy,
                                                                   "every_k": 2}})
    ck = checkpointed_blocks(tr, model.num_layers)
    m = _Watching()
    got = ReferenceProgram(model, tr, checkpointed=ck, compress=False, machine=m).run()
    assert got.act_max.total == m.seen > 0
    # the middle blocks accounted for arithmetically give the same figure
    assert ReferenceProgram(model, tr, checkpointed=ck).run().act_max.total == m.seen


TINY = {"family": "llama", "num_layers": 3, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "ffn_hidden_size": 160, "vocab_size": 512, "max_sequence_length": 64}


@pytest.mark.parametrize("extra", [
    {"precision": "mixed-bf16"},
    {"precision": "mixed-bf16", "activation_checkpointing": {"strategy": "full"}},
    {"precision": "amp-bf16", "attention": "eager"},
    {"precision": "fp32", "activation_checkpointing": {"strategy": "every-k", "every_k": 2}},
])
def test_activation_and_forward_backward_peaks_equal_the_measured_step(extra):
    """The reference step on CPU under LiveMemoryMeter, watched after every op: the highest live
    activation bytes outside the optimizer step and the highest total of forward/backward (step
    2) equal the estimate's activation_peak_bytes and forward_backward_peak."""
    from service.validation import step as S
    from service.validation.meter import LiveMemoryMeter

    class Meter(LiveMemoryMeter):
        act_max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.phase != "optimizer":
                act = sum(r.nbytes for r in self._live_records() if r.resolved() == "activations")
                self.act_max = max(self.act_max, act)
            return out

    req = MemoryRequest.model_validate({"model": TINY, "training": {
        "micro_batch_size": 2, "sequence_length": 32, "optimizer": "adamw", **extra}})
    est = estimate_memory(req, device="cpu")
    cfg = resolve_model(req.model)
    tr = req.training
    ck = checkpointed_blocks(tr, cfg.num_layers)
    torch.manual_seed(0)
    dev = torch.device("cpu")
    s = S.build(cfg, tr, dev, ck)
    idx, tgt = S.make_batch(cfg, tr, dev)
    meter = Meter()
    meter.register(s.model, "parameters")
    meter.register([idx, tgt], "activations")
    if isinstance(s.optimizer, S.MasterWeightOptimizer):
        meter.register(s.optimizer.masters, "optimizer_states")
    fb_steady = None
    with meter:
        for step in range(2):
            meter.reset_peak()
            with meter.in_phase("forward"):
                loss = S.forward_loss(s, idx, tgt, on_recompute=lambda: meter.in_phase("recompute"))
            with meter.in_phase("backward"):
                S.backward(s, loss)
            del loss
            meter.mark([p.grad for p in s.model.parameters() if p.grad is not None], "gradients")
            fb_steady = meter.peak.breakdown()  # forward and backward only
            with meter.in_phase("optimizer"):
                S.optimizer_step(s)
            meter.mark(s.optimizer, "optimizer_states")
    assert est.activation_peak_bytes == meter.act_max
    assert est.forward_backward_peak.model_dump() == fb_steady


# ---- bytes per parameter: a preset and a bare count of the same model -------------------------
GPT2XL_MIXED = {"precision": "mixed-fp16", "optimizer": "adam"}


def _notes(body: dict) -> tuple:
    r = estimate_memory(MemoryRequest.model_validate(body))
    return r, " | ".join(r.notes)


def test_preset_reads_as_model_states_plus_the_steps_temporaries():
    """GPT-2 XL, mixed-fp16 Adam: 24 bytes/parameter as a preset (the foreach step's
    temporaries at the peak), 16 as a bare count (model states only); both notes say why."""
    r, notes = _notes({"model": {"preset": "gpt2-xl"}, "training": GPT2XL_MIXED})
    psi = r.model.num_parameters
    bd = r.breakdown
    assert r.peak_phase.startswith("optimizer")
    assert round(bd.total / psi, 1) == 24.0
    assert "24.0 bytes/parameter = model states 16.0 bytes/parameter" in notes
    assert "(parameters 2.0 + gradients 2.0 + optimizer states 12.0: the ZeRO paper's 16Ψ" in notes
    assert f"the step's temporaries 8.0 ({bd.temporaries} bytes: {4 * psi} bytes of fp32 " \
           f"gradient copies for the master-weight step, {bd.temporaries - 4 * psi} bytes made " \
           "by the foreach adam step itself)" in notes
    fused = estimate_memory(MemoryRequest.model_validate({
        "model": {"preset": "gpt2-xl"},
        "training": {**GPT2XL_MIXED, "optimizer_implementation": "fused"}})).breakdown.total
    assert fused < bd.total
    assert f"optimizer_implementation 'fused' would peak at {fused} bytes" in notes
    assert f"{bd.total - fused} bytes" in notes

    bare, notes = _notes({"model": {"num_parameters": psi}, "training": GPT2XL_MIXED})
    assert bare.breakdown.total == 16 * psi
    assert "model states 16.0 bytes/parameter (parameters 2.0 + gradients 2.0 + optimizer " \
           "states 12.0: the ZeRO paper's 16Ψ" in notes
    assert "temporaries" in notes and "are not included" in notes


def test_no_fused_kernel_is_said():
    _, notes = _notes({"model": {"preset": "gpt2-xl"},
                       "training": {"precision": "mixed-bf16", "optimizer": "rmsprop"}})
    assert "optimizer_implementation 'fused' does not exist for 'rmsprop'" in notes


# ---- a setup that does not fit says what to change ---------------------------------------------
README_FIRST = {"model": {"preset": "llama-2-7b"},
                "training": {"precision": "amp-bf16", "optimizer": "adamw",
                             "micro_batch_size": 1, "sequence_length": 4096,
                             "activation_checkpointing": {"strategy": "full"}},
                "hardware": {"gpu": "h100-80gb"}}


def test_not_fitting_says_by_how_much_and_what_fits(client):
    r = client.post("/v1/memory", json=README_FIRST).json()
    assert r["fit"]["fits"] is False
    over = -r["fit"]["headroom_bytes"] / GiB
    notes = r["notes"]
    assert f"does not fit on h100-80gb: peak {r['breakdown']['total'] / GiB:.2f} GiB + allocator " \
           f"reserve {r['allocator_reserve_bytes'] / GiB:.2f} GiB is {over:.2f} GiB over its " \
           "80.00 GiB" in notes
    (fits,) = [n for n in notes if n.startswith("fits instead")]
    # each suggestion holds when the planner is asked about it
    bf16 = client.post("/v1/memory", json={**README_FIRST, "training": {
        **README_FIRST["training"], "precision": "bf16"}}).json()
    assert bf16["fit"]["fits"]
    assert f"precision 'bf16' (16-bit parameters, gradients and optimizer states, no fp32 " \
           f"master copy): peak {bf16['breakdown']['total'] / GiB:.2f} GiB" in fits
    assert "zero_stage 3 (FSDP2) over data_parallel 2:" in fits
    sharded = estimate_memory(MemoryRequest.model_validate({
        **README_FIRST, "hardware": None,
        "parallelism": {"data_parallel": 2, "zero_stage": 3}}))  # every rank replayed
    assert sharded.breakdown.total * 1.05 <= 80 * GiB
    (short,) = [n for n in notes if n.startswith("does not fit either")]
    fused = client.post("/v1/memory", json={**README_FIRST, "training": {
        **README_FIRST["training"], "optimizer_implementation": "fused"}}).json()
    assert not fused["fit"]["fits"]
    assert f"optimizer_implementation 'fused': peak {fused['breakdown']['total'] / GiB:.2f} " \
           "GiB" in short


def test_a_smaller_micro_batch_is_suggested_when_it_fits():
    r, notes = _notes({"model": {"preset": "gpt2-xl"},
                       "training": {"precision": "amp-bf16", "micro_batch_size": 32,
                                    "sequence_length": 1024},
                       "hardware": {"gpu": "a100-80gb"}})
    best = r.fit.max_micro_batch_size
    assert not r.fit.fits and 1 <= best < 32
    assert f"micro_batch_size {best} (the largest that fits; gradient_accumulation_steps " \
           f"{-(-32 // best)} keeps at least 32 sequences per step)" in notes
    assert "activation_checkpointing 'full': peak" in notes
    assert "optimizer_implementation 'fused'" not in notes  # the peak is not the optimizer's


def test_a_fitting_setup_has_no_fit_notes():
    r, notes = _notes({**README_FIRST, "parallelism": {"data_parallel": 8, "zero_stage": 3}})
    assert r.fit.fits and "fit" not in notes
