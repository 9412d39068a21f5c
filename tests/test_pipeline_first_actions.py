"""A step's first forward and backward of a stage composed from records of their own
(planner/layouts/pipeline_actions.py, planner/layouts/pipeline_records.py), against the full replay.

The first backward of a stage in a step makes the stage's gradients; composed, it makes them as
recorded (by parameter name, a block's index counted within its stage, and phantom window),
and the live bytes must come to the record's net. The oracle is
``PipelineRankProgram(...).run_steps()``: every action of the rank's whole list op by op. Both
windows (first step, steady step) must be equal field by field, to the byte, for every rank.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts import pipeline_actions as pa
from planner.layouts import pipeline_records as pf
from planner.layouts import pipeline_replays as pp
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import build_schedule
from planner.machine import cache

CASES = [("1f1b", 4, 1), ("interleaved-1f1b", 3, 2), ("zb-h1", 4, 1), ("zb-h2", 3, 1),
         ("zb-v", 3, 2), ("gpipe", 3, 1), ("dualpipe-v", 3, 2), ("dualpipe-v", 4, 2)]


def _setup(seed: int, S: int, m: int):
    rng = random.Random(seed)
    family = rng.choice(["gpt2", "llama"])
    layers = S * rng.choice([1, 2, 8]) + rng.randint(0, S - 1)
    model = {"family": family, "num_layers": layers, "hidden_size": 32, "num_heads": 4,
             "vocab_size": 96, "max_sequence_length": 64}
    training = {"micro_batch_size": rng.choice([1, 2]), "sequence_length": rng.choice([8, 16]),
                "gradient_accumulation_steps": m,
                "precision": rng.choice(["fp32", "amp-bf16", "bf16"]),
                "optimizer": rng.choice(["adamw", "sgd"])}
    if rng.random() < 0.3:
        training["lora"] = {"rank": 2}
    req = MemoryRequest.model_validate({"model": model, "training": training})
    return resolve_model(req.model), req.training


@pytest.mark.parametrize("case", range(len(CASES) * 2))
def test_first_actions_composed_equal_the_full_replay(case: int, monkeypatch) -> None:
    name, p, v = CASES[case % len(CASES)]
    sched = build_schedule(name, p, p * 8, v)
    model, tr = _setup(case, sched.num_stages, sched.microbatches)
    made = []
    real_attach = pf.attach

    def counted(prog, st, recorded):
        made.append(len(recorded))
        return real_attach(prog, st, recorded)
    monkeypatch.setattr(pa, "attach", counted)
    cache.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), (name, rank)
    # composed first backwards made their stages' gradients (a frozen base under LoRA: the
    # adapters' alone)
    assert made and min(made) > 0, (name, made)
    (entries,) = pp._KINDS.values()
    assert any(k[0] in ("F0", "B0", "W0") and e.verified for k, e in entries.items())


def test_first_records_name_the_gradients_per_stage() -> None:
    """Two ranks holding stages of one role record their stages' first backward alike: the
    same gradients by their names within the stage (so one record serves both)."""
    sched = build_schedule("1f1b", 4, 32, 1)
    model, tr = _setup(3, sched.num_stages, sched.microbatches)
    model = model.model_copy(update={"num_layers": 8})
    records = []
    for rank in (1, 2):
        prog = PipelineRankProgram(model, tr, sched, rank)
        prog.step_no = 1
        st = prog.stages[0]
        prog.real_forward(st, 0)
        snap = pf.snapshot(prog)
        prog.real_backward(st, 0)
        records.append(pf.made_since(prog, st, snap))
    assert records[0] and records[0] == records[1]
    assert all(where == "g" and key.startswith(("b0.", "b1.")) for where, key, *_ in records[0])


def test_a_first_backward_that_cannot_make_its_gradients_falls_back(monkeypatch) -> None:
    """Where a recorded gradient has nowhere to go the composed backward raises
    ``Unmemoizable``; the rank's lists are then replayed op by op, with the same answer."""
    sched = build_schedule("1f1b", 4, 32, 1)
    model, tr = _setup(5, sched.num_stages, sched.microbatches)
    monkeypatch.setattr(pa, "attach", lambda prog, st, made: False)
    cache.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), rank


@pytest.mark.parametrize("seed", range(12))
def test_dualpipe_v_composed_equals_the_full_replay(seed: int) -> None:
    """DualPipeV takes some micro-batches of a stage back by B and others by I and W: its
    forwards are composed where the backward kinds that take them back are verified; every rank
    equals the full replay, and the ranks off the V's turn compose actions."""
    rng = random.Random(300 + seed)
    p = rng.choice([2, 3, 4, 5])
    sched = build_schedule("dualpipe-v", p, 2 * p * rng.choice([2, 3, 4]) + rng.choice([0, 1]), 2)
    model, tr = _setup(seed, sched.num_stages, sched.microbatches)
    cache.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), rank
    memo = pa.ActionMemo()
    from planner.layouts.pipeline_memory import rank_actions
    from planner.layouts.pipeline_periods import shortened_lists
    groups, lists = shortened_lists(rank_actions(sched, 0))
    if groups:

        def make(m, items, mb):
            return PipelineRankProgram(model, tr, sched, 0, machine=m, actions=items,
                                       microbatches=mb, compress_blocks=True)
        pp._replays(make, lists, pp.TraceMachine, memo)
        assert memo.composed > 0
