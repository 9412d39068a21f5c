"""The math SDPA backend's replay against the measured step, byte for byte, on CPU.

On CUDA, ``F.scaled_dot_product_attention`` with fp32 inputs and grouped-query heads has no fused
kernel and runs the composite ``_scaled_dot_product_attention_math``
(benchmarks/results/sdpa-kernels-cuda.json); ``estimate_memory(device="cuda")`` replays it
(planner/step/attention.py: ``sdpa_math``). Being composite, it runs the same ops on CPU: here the
reference step runs under ``sdpa_kernel(SDPBackend.MATH)`` and the planner replays it with the
math backend forced (``ReferenceModel.sdpa_kernel``) and the CPU's other kernels (non-fused
dropout, layer-norm statistics), and every category of both peaks must be equal. (What only a
forward instant would show, such as how long the float mask lives, no peak here reaches; the
CUDA allocator trace of the campaign's llama-medium fp32 row shows the same allocations and
frees in the same order.)
"""

from __future__ import annotations

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel

from planner.catalog.presets import resolve_model
from planner.catalog.specs import ValidationRequest
from planner.layouts.compose import snap_breakdown
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step.program import ReferenceProgram
from service.validation.runner import measure

# Eight query heads on two key/value heads at 64 tokens and a vocabulary of 64: the step's peak
# is inside the attention's backward (the scaled key's or query's gradient, or the softmax's),
# so the replayed ops' saved tensors and backward order decide it; a vocabulary of 512 puts it
# at the loss, with every block's saved tensors live.
LLAMA = dict(family="llama", num_layers=3, hidden_size=64, num_heads=8, num_kv_heads=2,
             ffn_hidden_size=160, vocab_size=64, max_sequence_length=64)
GPT2 = dict(family="gpt2", num_layers=3, hidden_size=64, num_heads=4, vocab_size=64,
            max_sequence_length=64)

CASES = [
    (model, vocab, dropout, ckpt)
    for model, vocab in (("llama", 64), ("llama", 512))
    for dropout in (0.0, 0.1)
    for ckpt in ("none", "selective")
] + [("gpt2", 64, 0.0, "none"), ("llama", 64, 0.1, "full")]


def _replay(req: ValidationRequest):
    cfg = resolve_model(req.model)
    prog = ReferenceProgram(cfg, req.training, device="cpu",
                            checkpointed=checkpointed_blocks(req.training, cfg.num_layers))
    prog.sdpa_kernel = "math"
    return prog.run()


@pytest.mark.parametrize("family,vocab,dropout,ckpt", CASES,
                         ids=[f"{c[0]}-V{c[1]}-dropout{c[2]:g}-{c[3]}" for c in CASES])
def test_math_sdpa_replay_equals_measured(family, vocab, dropout, ckpt):
    model = dict(LLAMA if family == "llama" else GPT2, vocab_size=vocab)
    training = dict(precision="fp32", attention="sdpa", optimizer="adamw", micro_batch_size=2,
                    sequence_length=64, dropout=dropout,
                    activation_checkpointing={"strategy": ckpt})
    req = ValidationRequest(model=model, training=training, steps=3, device="cpu")
    with sdpa_kernel(SDPBackend.MATH):
        m = measure(req)
    peaks = _replay(req)
    assert snap_breakdown(peaks.steady).model_dump() == m["steady"]["breakdown"], \
        (m["steady"]["phase"], m["steady"]["op"], peaks.steady.phase, peaks.steady.op)
    assert snap_breakdown(peaks.first).model_dump() == m["first"]["breakdown"]


def test_math_backend_differs_from_flash():
    """The forced backend is what the replay runs: the math path keeps the (B, nh, T, T)
    probabilities, the CPU flash kernel does not."""
    req = ValidationRequest(model=LLAMA, steps=3, device="cpu",
                            training=dict(precision="fp32", attention="sdpa", optimizer="adamw",
                                          micro_batch_size=2, sequence_length=64))
    cfg = resolve_model(req.model)
    flash = ReferenceProgram(cfg, req.training, device="cpu").run()
    assert _replay(req).steady.by_cat[3] > flash.steady.by_cat[3]
