"""A pipeline rank's action loop taped (planner/layouts/pipeline_tape.py) against the full
replay.

The oracle is ``PipelineRankProgram(...).run_steps()``: every action of the rank's whole list
replayed op by op on the plain step simulator, every block of every stage. The tape evaluates
the loop from the kinds' records (replays of lists kept to a few micro-batches) in a few array
operations. Both peaks (first step, steady step) must be equal field by field (total, every category, op,
phase), to the byte, for every rank of random setups of every schedule it takes (GPipe, 1F1B,
interleaved 1F1B, ZB-H1 with one or two stages per rank, ZB-H2, ZB-V, DualPipeV): stage and micro-batch
counts (fewer micro-batches than ranks, one round, several), stages of 1-2 blocks and of 7-9
(whose middle blocks are stood in for), both families, every replayed precision and several
optimizers.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts import pipeline_actions as pa
from planner.layouts import pipeline_codes, pipelined
from planner.layouts import pipeline_tape as tp
from planner.layouts import pipeline_tape_records as tpr
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.machine import cache
from tests.pipeline_setups import random_setup

# every schedule the tape takes, with the stages per rank each allows
SCHEDULES = [("gpipe", (1,)), ("1f1b", (1,)), ("interleaved-1f1b", (2, 3, 4)), ("zb-h1", (1, 2)),
             ("zb-h2", (1,)), ("zb-v", (2,)), ("dualpipe-v", (2,))]


def _case(seed: int):
    rng = random.Random(seed)
    name, vs = SCHEDULES[seed % len(SCHEDULES)]
    while True:
        p, v = rng.choice([2, 3, 4, 6]), rng.choice(vs)
        m = rng.choice([2, 4, 7, p, 2 * p, 2 * p + 1, 3 * p, 5 * p])
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        return (*random_setup(rng, sched), sched)


@pytest.fixture
def every_list(monkeypatch):
    """Every list taped, however short (the planner tapes the long ones alone)."""
    monkeypatch.setattr(tp, "MIN_ACTIONS", 0)
    cache.clear()
    yield
    cache.clear()


@pytest.mark.parametrize("seed", range(42))
def test_taped_ranks_equal_full_replay(seed: int, every_list) -> None:
    model, tr, sched = _case(seed)
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
        got = tp.taped_rank(model, tr, sched, rank, device="cuda")
        assert got is not None, rank
        assert (got.first, got.steady) == (full.first, full.steady), rank


def _setup(layers: int = 6, **training):
    req = MemoryRequest.model_validate(
        {"model": {"family": "llama", "num_layers": layers, "hidden_size": 32, "num_heads": 4,
                   "num_kv_heads": 2, "vocab_size": 96, "max_sequence_length": 64},
         "training": {"micro_batch_size": 2, "sequence_length": 16,
                      "gradient_accumulation_steps": 96} | training,
         "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": "interleaved-1f1b",
                         "virtual_pipeline_stages": 3}})
    return resolve_model(req.model), req.training, req.parallelism


@pytest.mark.parametrize("name", ["interleaved-1f1b", "1f1b"])
def test_the_planner_tapes_long_lists(monkeypatch, name: str) -> None:
    """Ranks of 512 actions or more are taped on POST /v1/memory's path (no template, no
    shortened list; GPipe and 1F1B past ``DEEP`` ranks), and every rank's peaks are the full
    replay's."""
    monkeypatch.setattr(tp, "DEEP", 1)
    v = 3 if name == "interleaved-1f1b" else 1
    m = 96 if v == 3 else 288
    model, tr, par = _setup(gradient_accumulation_steps=m)
    par = par.model_copy(update={"pipeline_schedule": name, "virtual_pipeline_stages": v})
    sched = build_schedule(name, 2, m, v)
    assert all(len(o) >= tp.MIN_ACTIONS for o in sched.orders)
    cache.clear()
    calls = []
    real = tp.loop
    monkeypatch.setattr(tp, "loop", lambda prog: calls.append(prog.rank) or real(prog))
    worst, peaks, _, _ = pipelined.pipelined_estimate(model, tr, par, "cuda")
    assert sorted(set(calls)) == [0, 1]
    for pk in peaks:
        full = PipelineRankProgram(model, tr, sched, pk.rank, device="cuda").run_steps()
        assert (pk.first, pk.steady) == (full.first, full.steady), pk.rank
    assert worst.steady.total == max(pk.steady.total for pk in peaks)
    # the same setup at other sizes: taped again, no rank template compiled
    def compile_rank(*args, **kwargs):
        raise AssertionError("compiled")
    monkeypatch.setattr(pipelined, "compile_rank", compile_rank)
    calls.clear()
    for b in (3, 4):
        pipelined.pipelined_estimate(model, tr.model_copy(update={"micro_batch_size": b}), par,
                                     "cuda")
    assert len(calls) == 8  # two ranks, two steps, two sizes
    cache.clear()


def test_op_by_op_and_dualpipe_are_not_taped(every_list) -> None:
    model, tr, _ = _setup()
    sched = build_schedule("interleaved-1f1b", 2, 96, 3)
    with pa.op_by_op():  # composing off: nothing to tape from
        assert tp.taped_rank(model, tr, sched, 0) is None
    assert tp.taped_rank(model, tr, build_schedule("dualpipe", 2, 64, 1), 0) is None


def test_unverified_kinds_are_not_taped(every_list, monkeypatch) -> None:
    """A record no second occurrence verified (a step's first forward of a stage occurs once a
    step: the second step's verifies it) leaves the rank to the replay."""
    model, tr, _ = _setup()
    sched = build_schedule("interleaved-1f1b", 2, 8, 3)
    def within_steps(self, key, rec) -> None:  # no verification across the two steps
        e = self.entries.get(key)
        if e is None:
            last = self.entries.get((*key[:2], key[2] - 1))
            self.entries[key] = pa._Entry(rec, last is not None and last.verified
                                          and pa._same(last.rec, rec))
        elif not e.verified and not e.bad:
            e.verified, e.bad = (True, False) if pa._same(e.rec, rec) else (False, True)
    with monkeypatch.context() as mp:
        mp.setattr(pa.ActionMemo, "_note", within_steps)
        assert tp.taped_rank(model, tr, sched, 0) is None
    cache.clear()
    assert tp.taped_rank(model, tr, sched, 0) is not None


def test_a_kept_list_holds_every_kind_twice() -> None:
    """``record_list``: every kind of the rank's list as ``ActionMemo`` keys it (on the first
    stage an I does nothing and a W is a B), twice where the list has it twice, and each kind's
    first action's micro-batch ahead of the others' as in the list; renumbered in order."""
    def keyed(k, st):
        if st == 0 and k == "I":
            return None
        return ("B" if st == 0 and k == "W" else k, st)

    for name, p, m, v in (("dualpipe-v", 8, 40, 2), ("zb-v", 6, 30, 2), ("zb-h1", 4, 16, 2),
                          ("zb-h2", 4, 16, 1), ("interleaved-1f1b", 4, 32, 4)):
        sched = build_schedule(name, p, m, v)
        for rank in range(p):
            items, mb = tpr.record_list(sched, rank)
            full = [(pipeline_codes.NAMES[k], st, j) for k, st, j in
                    zip(*(a.tolist() for a in pipeline_codes.decoded_columns(sched, rank)))]
            kept = [keyed(k, st) for k, st, _, _ in items]
            every = [keyed(k, st) for k, st, _ in full]
            for kind in set(every) - {None}:
                assert kept.count(kind) >= min(2, every.count(kind)), (name, rank, kind)
            # the kinds' first actions in the list's order
            order = [k for i, k in enumerate(every) if k is not None and k not in every[:i]]
            assert [k for i, k in enumerate(kept) if k is not None and k not in kept[:i]] == order
            assert sorted({j for *_, j, _ in items}) == list(range(mb))
