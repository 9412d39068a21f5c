"""A rank's shortened lists derived from two other ranks' of the same schedule
(planner/layouts/pipeline_structure.py: ``_of_other_ranks``), against the plain search and the
full replay.

The middle ranks of a deep pipeline have lists alike up to their stages' names, with runs whose
starts and repetitions are affine in the rank: ``rank_lists`` derives them (the micro-batch
count's derivation of planner/layouts/pipeline_families.py with the rank in its place), checks
the derivation on the rank's own list, and renames the stages. Over every schedule kind and a
few deep pipelines, taking the ranks in order as an estimate does: a derived rank's lists,
periods left out and signature equal the plain search's (``shortened_lists`` on its own list),
or, where the search splits its runs otherwise (the derivation keeps the ranks' runs, checked
periodic on the list), the rank's steps from the derived lists equal the full replay to the
byte. The ranks' estimates from ``rank_lists`` equal the full replay for every rank, derived or
searched.
"""

from __future__ import annotations

import pytest

from planner.layouts import pipeline_replays as pp
from planner.layouts import pipeline_structure as pst
from planner.layouts.pipeline_memory import PipelineRankProgram, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.machine import cache
from tests.test_pipeline_families import KINDS, _plain
from tests.test_pipeline_first_actions import _setup

class _Model:  # rank_lists reads the block count only
    num_layers = 128


SIZES = ((8, 24), (8, 64), (16, 48), (16, 100), (32, 128))
# the kinds whose middle ranks share a family at these sizes
DERIVING = {("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("zb-v", 2)}


def _fresh() -> None:
    pst._LISTS.clear()
    pst._KNOWN.clear()
    pst._RANKS_KNOWN.clear()


def _steps_equal(sched, rank: int, lists) -> bool:
    model, tr = _setup(rank, sched.num_stages, sched.microbatches)
    model = model.model_copy(update={"num_layers": sched.num_stages})
    cache.clear()
    full = PipelineRankProgram(model, tr, sched, rank).run_steps()
    got = pp.rank_step(model, tr, sched, rank, given=lists)
    return (got.first, got.steady) == (full.first, full.steady)


@pytest.mark.parametrize("name,v", KINDS)
def test_ranks_derived_from_other_ranks_hold(name: str, v: int) -> None:
    derived = same = 0
    for p, m in SIZES:
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        _fresh()
        for rank in range(sched.num_ranks):
            before = pst.COUNTS["ranks"]
            rl = pst.rank_lists(sched, rank, _Model)
            if pst.COUNTS["ranks"] == before:
                continue
            derived += 1
            sig, dropped, lists = _plain(sched, rank, _Model)
            if (rl.signature, rl.dropped, rl.lists) == (sig, dropped, lists):
                same += 1
                continue
            # the search split the runs otherwise: equally exact
            assert _steps_equal(sched, rank, rl), (name, v, p, m, rank)
    _fresh()
    if (name, v) in DERIVING:
        assert derived >= 4 and same >= 0.8 * derived, (name, derived, same)


@pytest.mark.parametrize("name,v,p,m", [("1f1b", 1, 16, 48), ("zb-h1", 1, 24, 96),
                                        ("zb-v", 2, 32, 128), ("gpipe", 1, 16, 32)])
def test_rank_estimates_from_derived_lists_equal_the_full_replay(name, v, p, m) -> None:
    sched = build_schedule(name, p, m, v)
    model, tr = _setup(p + m, sched.num_stages, m)
    model = model.model_copy(update={"num_layers": sched.num_stages})
    _fresh()
    cache.clear()
    before = pst.COUNTS["ranks"]
    derived = []
    got = {}
    for rank in range(sched.num_ranks):
        n = pst.COUNTS["ranks"]
        lists = pst.rank_lists(sched, rank, model)
        if pst.COUNTS["ranks"] != n:
            derived.append(rank)
        got[rank] = pp.rank_step(model, tr, sched, rank, given=lists)
    assert pst.COUNTS["ranks"] - before >= 3, (name, derived)
    for rank in sorted({0, sched.num_ranks - 1, *derived[::3], derived[-1]}):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        assert (got[rank].first, got[rank].steady) == (full.first, full.steady), (name, rank)
    _fresh()


@pytest.mark.parametrize("name,p,m,ranks", [("zb-v", 16, 48, (0, 3, 7)),
                                            ("dualpipe-v", 16, 48, (1, 6, 15))])
def test_ranks_with_split_runs_equal_the_full_replay(name, p, m, ranks) -> None:
    """V shapes deep enough that a direction splits its warm-up (pipeline_periods._split): the
    estimate from the rank's lists equals the full replay."""
    sched = build_schedule(name, p, m, 2)
    model, tr = _setup(p * m, sched.num_stages, m)
    model = model.model_copy(update={"num_layers": sched.num_stages})
    _fresh()
    cache.clear()
    for rank in ranks:
        lists = pst.rank_lists(sched, rank, model)
        assert any(x.origin for g in shortened_lists(rank_actions(sched, rank))[0] for x in g), \
            (name, rank)
        got = pp.rank_step(model, tr, sched, rank, given=lists)
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        assert (got.first, got.steady) == (full.first, full.steady), (name, rank)
    _fresh()
