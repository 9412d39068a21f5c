"""A pipeline rank's repeated actions composed per kind (planner/layouts/pipeline_actions.py)
against the full replay.

The oracle is ``PipelineRankProgram(...).run_steps()``: every action of the rank's whole list
replayed op by op on the plain step simulator. The estimate replays the shortened lists
(planner/layouts/pipeline_periods.py) and, for 1F1B, GPipe and interleaved 1F1B, composes every
forward and backward whose kind two earlier ones of the same step agreed on. Both peaks (first
step, steady step) must be equal field by field (total, every category, op, phase), to the byte,
for every rank of random setups: every schedule the replay runs (the ones not composed must be
unaffected), random stage and micro-batch counts (below, at and past the warm-up lengths),
layer counts (stages of 1-2 blocks, and of 7-9 where a stage's middle blocks are stood in
for), both families, every replayed precision and several optimizers.
"""

from __future__ import annotations

import random

import pytest

from planner.layouts import pipeline_actions as pa
from planner.layouts import pipeline_replays as pp
from planner.layouts.pipeline_memory import PipelineRankProgram, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.machine import cache
from tests.pipeline_setups import random_setup

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 3), ("gpipe", 1), ("interleaved-1f1b", 2),
             ("zb-h1", 1), ("zb-v", 2), ("dualpipe-v", 2)]


def _case(seed: int):
    rng = random.Random(seed)
    while True:
        name, v = SCHEDULES[seed % len(SCHEDULES)]
        p = rng.choice([2, 3, 4, 6])
        m = rng.choice([1, 2, p - 1, p, p + 1, 2 * p, 3 * p + 1, 5 * p, 8 * p + 3])
        try:
            sched = build_schedule(name, p, max(1, m), v)
        except ScheduleConstraintError:
            seed += len(SCHEDULES)
            continue
        return (name, *random_setup(rng, sched), sched)


@pytest.mark.parametrize("seed", range(24))
def test_composed_ranks_equal_full_replay(seed: int) -> None:
    name, model, tr, sched = _case(seed)
    cache.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
        got = pp.rank_step(model, tr, sched, rank, device="cuda")
        assert (got.first, got.steady) == (full.first, full.steady), (name, rank)


def _composed(model, tr, sched, rank: int) -> int:
    """Actions composed over the rank's shortened replays (-1: nothing to shorten)."""
    groups, lists = shortened_lists(rank_actions(sched, rank))
    if not groups:
        return -1
    memo = pa.ActionMemo()

    def make(m, items, mb):
        return PipelineRankProgram(model, tr, sched, rank, machine=m, actions=items,
                                   microbatches=mb, compress_blocks=True)
    pp._replays(make, lists, pp.TraceMachine, memo)
    return memo.composed


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2), ("zb-h1", 1),
                                    ("zb-h2", 1), ("zb-v", 2)])
def test_long_lists_are_mostly_composed(name: str, v: int) -> None:
    """Most actions of a 1F1B / GPipe / interleaved / zero-bubble rank's shortened replays are
    composed; the
    switch ``op_by_op`` composes none and answers the same."""
    _, model, tr, _ = _case(1)
    sched = build_schedule(name, 4, 64, v)
    for rank in range(4):  # the V's turn (stages handing tensors on their rank) included
        n = _composed(model, tr, sched, rank)
        total = sum(len(items) for items, _ in shortened_lists(rank_actions(sched, rank))[1])
        assert n > total // 3, (rank, n, total)
    with pa.op_by_op():
        assert _composed(model, tr, sched, 1) == 0
        cache.clear()
        slow = pp.rank_step(model, tr, sched, 1)
    cache.clear()
    fast = pp.rank_step(model, tr, sched, 1)
    assert (slow.first, slow.steady) == (fast.first, fast.steady)


def _every_rank_equals_full_replay(model, tr, sched) -> list[int]:
    """Each rank's shortened, composed replay against its full replay (caches cleared first);
    the actions composed per rank (``_composed``)."""
    cache.clear()
    composed = []
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), (sched.name, rank)
        composed.append(_composed(model, tr, sched, rank))
    return composed


@pytest.mark.parametrize("seed", range(4))
def test_interleaved_ranks_equal_full_replay(seed: int) -> None:
    """Interleaved 1F1B with several periods of micro-batches (its sends keep every output
    until the action loop ends), stages of 1-2 and of 7-9 blocks."""
    rng = random.Random(seed)
    p, v = rng.choice([(2, 2), (3, 2), (4, 2), (2, 3)])
    sched = build_schedule("interleaved-1f1b", p, p * rng.choice([6, 8, 10]), v)
    _, model, tr, _ = _case(2 + 8 * seed)
    S = sched.num_stages
    layers = S * (8 if seed % 2 else 1) + rng.randint(0, S - 1)
    model = model.model_copy(update={"num_layers": layers})
    tr = tr.model_copy(update={"gradient_accumulation_steps": sched.microbatches})
    composed = _every_rank_equals_full_replay(model, tr, sched)
    assert all(n != 0 for n in composed) and max(composed) > 0, composed  # -1: not shortened


def test_rank_classes_share_kinds() -> None:
    """The ranks of one setup share their kinds' records (keyed by stage roles): the middle
    ranks of a 1F1B pipeline check a middle stage's forward and backward once, and every rank
    still equals the full replay."""
    _, model, tr, _ = _case(1)
    sched = build_schedule("1f1b", 6, 30, 1)
    cache.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), rank
    (entries,) = pp._KINDS.values()
    roles = {k[1] for k in entries}
    assert len(roles) < sched.num_ranks and all(e.verified for e in entries.values())


def test_a_composed_action_that_does_not_add_up_falls_back(monkeypatch) -> None:
    """A composed backward that does not come to its recorded net bytes raises
    ``Unmemoizable``: the rank's lists are then replayed op by op, with the same answer."""
    _, model, tr, _ = _case(1)
    sched = build_schedule("1f1b", 4, 24, 1)

    def broken(self, prog, st, j, p, rec):
        raise pa.Unmemoizable(("B", st))
    cache.clear()
    monkeypatch.setattr(pa.ActionMemo, "_compose_backward", broken)
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        got = pp.rank_step(model, tr, sched, rank)
        assert (got.first, got.steady) == (full.first, full.steady), rank
    with pytest.raises(pa.Unmemoizable):
        _composed(model, tr, sched, 1)


@pytest.mark.parametrize("seed", range(8))
def test_zero_bubble_ranks_equal_full_replay(seed: int) -> None:
    """The zero-bubble schedules' split backward composed per kind (I and W after a composed
    forward): ZB-H1 (one and two virtual stages), ZB-H2 and ZB-V, micro-batch counts of several
    periods, stages of 1-2 blocks and of 7-8 (the middle ones stood in for in I and W); every
    rank equals the full replay, and the ranks whose lists are shortened compose actions."""
    rng = random.Random(1000 + seed)
    name, v = [("zb-h1", 1), ("zb-h1", 2), ("zb-h2", 1), ("zb-v", 2)][seed % 4]
    p = rng.choice([3, 4, 5])
    sched = build_schedule(name, p, p * rng.choice([6, 8]), v)
    _, model, tr, _ = _case(seed)
    S = sched.num_stages
    layers = S * rng.choice([1, 2, 7, 8]) + rng.randint(0, S - 1)
    model = model.model_copy(update={"num_layers": layers})
    tr = tr.model_copy(update={"gradient_accumulation_steps": sched.microbatches})
    composed = _every_rank_equals_full_replay(model, tr, sched)
    assert max(composed) > 0, (name, composed)


def test_a_kind_equal_to_the_last_steps_verified_record_is_verified_at_once() -> None:
    """A kind's first record of step 2 is verified at once where it equals step 1's record
    of that kind (one op-by-op replay fewer), and verifies step 1's where that was not yet
    (two occurrences that agree, one per step: a step's first actions occur once per step);
    a record that differs is not, and waits for a second occurrence of its own step."""
    memo = pa.ActionMemo({})
    rows = ((1, 2, 0, 0, 0),)
    rec = pa._Rec(rows, (("op", "forward", True),), (0, 0, 0, 3, 0))
    other = pa._Rec(rows, (("op", "forward", True),), (0, 0, 0, 4, 0))
    memo._note(("F", "mid", 1), rec)
    assert not memo.entries["F", "mid", 1].verified
    memo._note(("F", "mid", 1), rec)
    assert memo.entries["F", "mid", 1].verified
    memo._note(("F", "mid", 2), other)  # differs from step 1's: recorded, not verified
    assert not memo.entries["F", "mid", 2].verified
    memo._note(("F", "mid", 2), other)
    assert memo.entries["F", "mid", 2].verified
    memo._note(("B", "mid", 1), rec)  # the last step's record not verified yet: the two
    assert not memo.entries["B", "mid", 1].verified  # agree, and verify each other
    memo._note(("B", "mid", 2), rec)
    assert memo.entries["B", "mid", 2].verified and memo.entries["B", "mid", 1].verified
    memo._note(("W", "mid", 1), rec)  # they differ: neither is
    memo._note(("W", "mid", 2), other)
    assert not memo.entries["W", "mid", 2].verified and not memo.entries["W", "mid", 1].verified
    memo._note(("F", "end", 1), rec)
    memo._note(("F", "end", 1), rec)
    memo._note(("F", "end", 2), pa._Rec(rows, (("op", "forward", True),), (0, 0, 0, 3, 0)))
    assert memo.entries["F", "end", 2].verified  # equal to step 1's: at once


@pytest.mark.parametrize("seed", range(3))
def test_dualpipev_mixed_stages_compose_kinds_verified_in_time(seed: int, monkeypatch) -> None:
    """DualPipeV takes some micro-batches of a stage back by B and others by I and W: a forward
    there is composed where the kinds that take it back will be verified by the occurrences
    replayed before its own (``pipeline_records._in_time``), not only where they are verified
    already. Every rank equals the full replay with the rule and without it (``_in_time``
    always false: the old rule), and the rule composes more actions on some rank."""
    from planner.layouts import pipeline_records

    rng = random.Random(2000 + seed)
    p = rng.choice([2, 3, 4])
    sched = build_schedule("dualpipe-v", p, 2 * p * rng.choice([4, 6, 8]), 2)
    _, model, tr, _ = _case(seed)
    S = sched.num_stages
    model = model.model_copy(update={"num_layers": S * rng.choice([1, 2, 7])})
    tr = tr.model_copy(update={"gradient_accumulation_steps": sched.microbatches})
    composed = _every_rank_equals_full_replay(model, tr, sched)
    monkeypatch.setattr(pipeline_records, "_in_time", lambda *args: False)
    before = _every_rank_equals_full_replay(model, tr, sched)
    assert all(a >= b for a, b in zip(composed, before)) and composed != before, \
        (composed, before)
