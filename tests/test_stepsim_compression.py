"""Simulating blocks 0, 1, 2, L-2, L-1 and accounting for the identical middle blocks
arithmetically gives exactly the peaks of simulating every block (planner/step/program.py,
_phantom_forward). Tolerance: none."""

from __future__ import annotations

import itertools

import pytest

from planner.catalog.presets import resolve_model
from planner.step.program import ReferenceProgram
from planner.catalog.specs import ModelSpec, TrainingSpec

EXTRAS = [{}, {"lora": {"rank": 4, "target_modules": ["q", "up"]}},
          {"gradient_accumulation_steps": 2}, {"dropout": 0.1},
          {"activation_checkpointing": {"strategy": "selective"}}]
CASES = list(itertools.product(["gpt2", "llama"], ["fp32", "amp-bf16", "bf16", "mixed-fp16"],
                               ["sdpa", "eager"], [7, 12], ["none", "full"], range(len(EXTRAS))))


@pytest.mark.parametrize("family,precision,attention,layers,ckpt,extra", CASES)
def test_compressed_equals_full(family, precision, attention, layers, ckpt, extra):
    spec = dict(family=family, num_layers=layers, hidden_size=64, num_heads=4,
                vocab_size=512 if layers == 7 else 64, max_sequence_length=64)
    if family == "llama":
        spec.update(num_kv_heads=2, ffn_hidden_size=160)
    cfg = resolve_model(ModelSpec(**spec))
    tr = TrainingSpec(precision=precision, attention=attention, micro_batch_size=2,
                      sequence_length=32, optimizer="adamw" if layers == 7 else "sgd",
                      **EXTRAS[extra])
    blocks = set(range(layers)) if ckpt == "full" else set()
    for device in ("cpu", "cuda"):
        full = ReferenceProgram(cfg, tr, device=device, checkpointed=blocks, compress=False).run()
        comp = ReferenceProgram(cfg, tr, device=device, checkpointed=blocks).run()
        assert comp.first.as_dict() == full.first.as_dict()
        assert comp.steady.as_dict() == full.steady.as_dict()
        assert comp.act_peak.total == full.act_peak.total


def test_compression_applies_to_deep_models_only():
    cfg = resolve_model(ModelSpec(preset="gpt2-xl"))
    prog = ReferenceProgram(cfg, TrainingSpec())
    assert prog.n_phantom == 43 and prog.real_blocks == [0, 1, 2, 46, 47]
    # a non-uniform checkpoint pattern is simulated block by block
    prog = ReferenceProgram(cfg, TrainingSpec(), checkpointed={0, 5})
    assert prog.n_phantom == 0


# Checkpoint plans that repeat with a period of k blocks (every-k, sqrt and hand-made patterns,
# with and without a remainder of blocks after the last whole period): the first three periods
# and the last two are simulated, the periods between accounted for arithmetically.
PERIODIC = [  # (layers, plan as a function of the block index)
    (14, lambda i: i % 2 == 0), (15, lambda i: i % 2 == 1), (21, lambda i: i % 3 == 0),
    (23, lambda i: i % 3 != 2), (49, lambda i: i % 7 != 6), (30, lambda i: i % 4 in (1, 2)),
]


@pytest.mark.parametrize("family,precision,plan,extra", list(itertools.product(
    ["gpt2", "llama"], ["fp32", "amp-bf16", "mixed-fp16"], range(len(PERIODIC)),
    range(len(EXTRAS)))))
def test_periodic_plans_compressed_equal_full(family, precision, plan, extra):
    layers, pick = PERIODIC[plan]
    spec = dict(family=family, num_layers=layers, hidden_size=32, num_heads=2,
                vocab_size=96, max_sequence_length=32)
    if family == "llama":
        spec.update(num_kv_heads=1, ffn_hidden_size=80)
    cfg = resolve_model(ModelSpec(**spec))
    tr = TrainingSpec(precision=precision, micro_batch_size=2, sequence_length=16,
                      optimizer="sgd-momentum", **EXTRAS[extra])
    blocks = {i for i in range(layers) if pick(i)}
    comp_prog = ReferenceProgram(cfg, tr, device="cuda", checkpointed=blocks)
    assert comp_prog.n_phantom > 0 and comp_prog.period > 1
    comp = comp_prog.run()
    full = ReferenceProgram(cfg, tr, device="cuda", checkpointed=blocks, compress=False).run()
    assert comp.first.as_dict() == full.first.as_dict()
    assert comp.steady.as_dict() == full.steady.as_dict()
    assert comp.act_peak.total == full.act_peak.total
    assert comp.act_max.total == full.act_max.total
