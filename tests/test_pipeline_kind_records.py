"""Verified action records shared between a layout's rank compiles
(planner/layouts/pipeline_kind_records.py), against the full replay and against compiles alone.

The oracle is ``PipelineRankProgram(...).run_steps()`` (every action of the rank's whole list
replayed op by op). Each seed compiles every rank of a layout, for two micro-batch counts and
two models each, in one shared store: the later compiles import the kinds the earlier ones
verified (their middle stages' forwards and backwards). Every template, evaluated for the
model it was compiled at and for a new model, must equal the replay field by field, and equal a
template compiled alone (no store) at the same model.
"""

from __future__ import annotations

import random

import pytest

from planner.layouts import pipeline_kind_records as pk
from planner.layouts.pipeline_actions import _same as same_record
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_structure import compile_pipeline_structure, rank_lists
from planner.machine import cache
from planner.step.structure import structure_of
from tests.test_pipeline_structure import SETTINGS, _arch, _same, _setup

SCHEDULES = [("1f1b", 1), ("interleaved-1f1b", 2), ("gpipe", 1), ("zb-h1", 1), ("zb-h2", 1),
             ("zb-v", 2), ("1f1b", 1), ("interleaved-1f1b", 2)]


def _compile(model, tr, sched, rank, layout):
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    rl = rank_lists(sched, rank, model)
    tpl = compile_pipeline_structure(model, tr, sched, rank, "cuda", names, dom[0], values, rl,
                                     layout=layout)
    return tpl, (*values, *rl.dropped)


@pytest.mark.parametrize("seed", range(12))
def test_shared_records_equal_the_replay_and_a_compile_alone(seed: int) -> None:
    rng = random.Random(100 + seed)
    name, v = SCHEDULES[seed % len(SCHEDULES)]
    family, gqa = [("gpt2", False), ("llama", False), ("llama", True)][seed % 3]
    setting = SETTINGS[seed % len(SETTINGS)]
    p = 2 if name == "zb-v" else rng.choice([3, 4])
    cache.clear()
    layout = ("test", seed)
    before = pk.COUNTS["imported"]
    layers = None
    compiled = 0
    for m in sorted({p * k + (rng.choice([0, 1]) if v == 1 else 0) for k in (2, 3)}):
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        layers = layers or sched.num_stages * rng.randint(1, 2)
        for _ in range(2):
            model, tr = _setup(_arch(family, gqa, rng, layers), setting, m, rng)
            other, tr2 = _setup(_arch(family, gqa, rng, layers), setting, m, rng)
            for rank in range(sched.num_ranks):
                tpl, vals = _compile(model, tr, sched, rank, layout)
                compiled += 1
                full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
                assert _same(tpl.evaluate(vals), full), (name, m, rank)
                alone, _ = _compile(model, tr, sched, rank, None)
                assert tpl.evaluate(vals) == alone.evaluate(vals)
                dom, _, ovals = structure_of(other, tr2.micro_batch_size, tr2.sequence_length)
                ovals = (*ovals, *rank_lists(sched, rank, other).dropped)
                if dom == structure_of(model, tr.micro_batch_size, tr.sequence_length)[0] \
                        and (tpl.admits is None or tpl.admits(*ovals)):
                    want = PipelineRankProgram(other, tr2, sched, rank, device="cuda").run_steps()
                    assert _same(tpl.evaluate(ovals), want), (name, m, rank, "new model")
    assert compiled
    assert pk.COUNTS["imported"] > before  # the later compiles composed from shared kinds


def test_records_detach_and_bind_back_unchanged() -> None:
    """A record over the dimensions alone, bound to another compile's space (more period
    variables), is the same record term by term."""
    rng = random.Random(7)
    model, tr = _setup(_arch("llama", True, rng, 8), SETTINGS[0], 12, rng)
    sched = build_schedule("1f1b", 4, 12, 1)
    cache.clear()
    _compile(model, tr, sched, 1, ("detach",))
    kinds = pk._STORE[("detach",)]
    assert kinds
    from planner.step.structure import _symbolic_sizes
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    sp, _ = _symbolic_sizes(names, dom[0], (*values, 3, 5), (("n0", 0), ("n1", 0)))
    pad = (0, 0)
    polys = 0
    for rec, plan, guards, verified in kinds.values():
        bound = pk._bind(rec, sp, pad)
        assert same_record(pk._detach(bound, len(names)), rec)
        assert pk._detach(pk._bind(plan, sp, pad), len(names)) == plan
        # a verified record is kept without its rows (a composed action draws the plan); one
        # to verify (a step's first action of a kind, recorded once) with them
        assert bool(rec.rows) != verified
        for x in bound.net:
            if hasattr(x, "sp"):
                assert x.sp is sp and all(len(e) == sp.n for e in x.t)
                polys += 1
    assert polys


def test_a_witness_that_decides_a_guard_otherwise_imports_nothing() -> None:
    """Shared kinds whose guards the importing compile's witness answers otherwise are not
    imported (it replays them, as alone), and its template still equals the replay."""
    rng = random.Random(8)
    model, tr = _setup(_arch("gpt2", False, rng, 8), SETTINGS[0], 12, rng)
    sched = build_schedule("1f1b", 4, 12, 1)
    cache.clear()
    layout = ("flipped",)
    _compile(model, tr, sched, 1, layout)
    kinds = pk._STORE[layout]
    # one false guard for every kind: the constant 1 said to be negative
    names = structure_of(model, tr.micro_batch_size, tr.sequence_length)[1]
    false = (pk._Terms([((0,) * len(names), 1)]), -1)
    for kind, (rec, plan, guards, verified) in list(kinds.items()):
        kinds[kind] = (rec, plan, (*guards, false), verified)
    before = pk.COUNTS["imported"]
    tpl, vals = _compile(model, tr, sched, 2, layout)
    assert pk.COUNTS["imported"] == before
    full = PipelineRankProgram(model, tr, sched, 2, device="cuda").run_steps()
    assert _same(tpl.evaluate(vals), full)
