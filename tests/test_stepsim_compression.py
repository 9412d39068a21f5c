"""Simulating blocks 0, 1, 2, L-2, L-1 and accounting for the identical middle blocks
arithmetically gives exactly the peaks of simulating every block (planner/step/program.py,
_phantom_forward). Tolerance: none."""

from __future__ import annotations

import itertools
import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import ModelSpec, ParallelSpec, TrainingSpec
from planner.layouts.data_parallel import ParallelProgram
from planner.layouts.parallel_ranks import unsupported_reason
from planner.step.plans import plan_period
from planner.step.program import ReferenceProgram

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
    # a plan without a period compresses its long runs only: blocks 6-47 are 42 alike
    prog = ReferenceProgram(cfg, TrainingSpec(), checkpointed={0, 5})
    assert prog.n_phantom == 42 - 5 and prog.real_blocks == [*range(9), 46, 47]
    # short runs are simulated block by block
    prog = ReferenceProgram(cfg, TrainingSpec(), checkpointed=set(range(0, 48, 5)) | {47})
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


# Plans that do not repeat (a budget's prefix, hand-picked blocks): the whole model is one period,
# and each run of seven or more blocks alike keeps its first three and last two, a phantom
# standing for the rest. One device and every data-parallel stage, against the full replay.
def _irregular(rng: random.Random, layers: int) -> set[int]:
    kind = rng.choice(["prefix", "suffix", "runs"])
    if kind == "prefix":
        return set(range(rng.randint(0, layers)))
    if kind == "suffix":
        return set(range(rng.randint(0, layers), layers))
    out, i, on = set(), 0, rng.random() < 0.5
    while i < layers:
        n = rng.choice([1, 2, 7, 8, 11])
        if on:
            out.update(range(i, min(i + n, layers)))
        i, on = i + n, not on
    return out


@pytest.mark.parametrize("seed", range(24))
def test_irregular_plans_compress_their_long_runs(seed):
    rng = random.Random(seed)
    family = rng.choice(["gpt2", "llama"])
    layers = rng.randint(9, 40)
    spec = dict(family=family, num_layers=layers, hidden_size=32, num_heads=2,
                vocab_size=96, max_sequence_length=32)
    if family == "llama":
        spec.update(num_kv_heads=1, ffn_hidden_size=80)
    cfg = resolve_model(ModelSpec(**spec))
    tr = TrainingSpec(precision=rng.choice(["fp32", "amp-bf16", "mixed-fp16", "bf16"]),
                      micro_batch_size=2, sequence_length=16,
                      optimizer=rng.choice(["sgd-momentum", "adamw"]), **rng.choice(EXTRAS))
    blocks = _irregular(rng, layers)
    comp_prog = ReferenceProgram(cfg, tr, device="cuda", checkpointed=blocks)
    runs = [len(list(g)) for _, g in itertools.groupby(i in blocks for i in range(layers))]
    if plan_period(blocks, layers) is None:
        assert comp_prog.n_phantom == sum(r - 5 for r in runs if r >= 7)
    comp = comp_prog.run()
    full = ReferenceProgram(cfg, tr, device="cuda", checkpointed=blocks, compress=False).run()
    for f in ("first", "steady", "fb_steady", "forward_peak"):
        c, w = getattr(comp, f), getattr(full, f)
        assert (c.as_dict(), c.op, c.phase) == (w.as_dict(), w.op, w.phase), f
    assert comp.act_peak.total == full.act_peak.total
    assert comp.act_max.total == full.act_max.total
    par = ParallelSpec(data_parallel=rng.choice([2, 3]), zero_stage=rng.choice([0, 1, 2, 3]))
    if unsupported_reason(tr, par) is None:
        for rank in (0, par.data_parallel - 1):
            c = ParallelProgram(cfg, tr, par, rank, device="cuda", checkpointed=blocks).run()
            w = ParallelProgram(cfg, tr, par, rank, device="cuda", checkpointed=blocks,
                                compress=False).run()
            assert (c.steady.as_dict(), c.steady.op) == (w.steady.as_dict(), w.steady.op), rank
            assert c.first.as_dict() == w.first.as_dict(), rank
