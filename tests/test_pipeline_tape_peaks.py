"""Where a taped loop's highest row can be (planner/layouts/pipeline_tape_peaks.py).

``kept`` drops the middle repetitions of every periodic stretch of a rank's action tokens; the
first highest of ``sum(values before j) + row(j)`` must never be dropped, whatever the values
(random tokens with many periodic stretches, values from a small range so that ties are
common). Then every rank of random setups of every taped schedule, with long periodic stretches
(up to eight rounds of micro-batches), against the full op-by-op replay, with the kept counts
dense and with every action kept (the form a rank of hundreds of stages takes).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.layouts import pipeline_tape as tp
from planner.layouts import pipeline_tape_peaks as tpk
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.machine import cache
from tests.pipeline_setups import random_setup


def _tokens(rng) -> np.ndarray:
    k = int(rng.integers(1, 5))
    parts = []
    for _ in range(int(rng.integers(1, 7))):
        if rng.random() < 0.7:  # a periodic stretch
            parts.append(np.tile(rng.integers(0, k, size=int(rng.integers(1, 5))),
                                 int(rng.integers(1, 9))))
        else:
            parts.append(rng.integers(0, k, size=int(rng.integers(1, 5))))
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(4))
def test_kept_never_drops_the_first_highest(seed: int) -> None:
    rng = np.random.default_rng(seed)
    dropped = 0
    for _ in range(1500):
        tok = _tokens(rng)
        at = set(tpk.kept(tok, 5).tolist())
        dropped += len(tok) - len(at)
        for _ in range(4):
            k = int(tok.max()) + 1
            net, row = rng.integers(-3, 4, size=k), rng.integers(-3, 4, size=k)
            steps = net[tok]
            live = np.cumsum(steps) - steps + row[tok]
            assert int(np.argmax(live)) in at, (tok, net, row)
    assert dropped > 10_000  # (the stretches are dropped: the test is not vacuous)


def _nested(rng) -> np.ndarray:
    """Tokens of rounds of blocks: each block a pair of kinds repeated, a round a few blocks
    (longer than ``kept``'s periods), rounds repeated, between warm-up-like stretches."""
    k = int(rng.integers(2, 6))
    parts = [rng.integers(0, k, size=int(rng.integers(0, 4)))]
    for _ in range(int(rng.integers(1, 3))):
        blocks = [np.tile(rng.integers(0, k, size=int(rng.integers(1, 3))),
                          int(rng.integers(3, 9))) for _ in range(int(rng.integers(2, 5)))]
        parts.append(np.tile(np.concatenate(blocks), int(rng.integers(1, 6))))
        parts.append(rng.integers(0, k, size=int(rng.integers(0, 3))))
    return np.concatenate(parts)


@pytest.mark.parametrize("seed", range(4))
def test_reduced_never_drops_the_first_highest(seed: int) -> None:
    """The kept actions (``reduced``), then fewer (``fewer``: the stretches of the kept list
    dropped too), with the counts before each, against the plain prefix sums; with
    coefficients besides the kind ids (GPipe's and 1F1B's held sizes) in half the cases."""
    rng = np.random.default_rng(10 + seed)
    dropped = 0
    for case in range(400):
        ids = _nested(rng)
        k = int(ids.max()) + 1
        X = None
        if case % 2:
            X = rng.integers(-1, 2, size=(k, 3))[ids]  # (a kind's coefficients alike)
        tok = ids if X is None else ids + k * ((X + 2) @ np.array([1, 4, 16]))
        at, before = tpk.reduced(tok, ids, k, X)
        assert before is not None
        steps = np.eye(k, dtype=np.int64)[ids] if X is None else \
            np.concatenate([np.eye(k, dtype=np.int64)[ids], X], 1)
        assert (before[:-1] == (np.cumsum(steps, 0) - steps)[at]).all()
        assert (before[-1] == steps.sum(0)).all()
        keep = tpk.fewer(tok[at], before)
        at, before = at[keep], before[keep]
        dropped += len(ids) - len(at)
        for _ in range(6):
            v = rng.integers(-3, 4, size=steps.shape[1])
            row = rng.integers(-3, 4, size=k)
            live = np.cumsum(steps @ v) - steps @ v + row[ids]
            best = int(np.argmax(live))
            assert best in set(at.tolist()), (ids.tolist(), v, row)
            assert live[at[int(np.argmax(before @ v + row[ids[at]]))]] == live[best]
    assert dropped > 20_000


def test_kept_keeps_what_is_not_periodic() -> None:
    assert tpk.kept(np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 3])).tolist() == [0, 1, 6, 7, 8, 9]
    assert tpk.kept(np.array([4, 2, 7, 1])).tolist() == [0, 1, 2, 3]
    assert tpk.kept(np.array([5] * 9)).tolist() == [0, 8]


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-h2", 1),
             ("zb-v", 2), ("dualpipe-v", 2)]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("seed", range(7))
def test_taped_ranks_of_long_stretches_equal_full_replay(seed: int, dense: bool,
                                                         monkeypatch) -> None:
    rng = random.Random(100 + seed)
    name, v = SCHEDULES[seed]
    while True:
        p = rng.choice([2, 3, 4])
        try:
            sched = build_schedule(name, p, rng.choice([6, 8]) * p, v)
        except ScheduleConstraintError:
            continue
        break
    model, tr = random_setup(rng, sched)
    monkeypatch.setattr(tp, "MIN_ACTIONS", 0)
    if not dense:
        monkeypatch.setattr(tpk, "_SMALL", -(1 << 40))
    cache.clear()
    try:
        for rank in range(sched.num_ranks):
            full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
            got = tp.taped_rank(model, tr, sched, rank, device="cuda")
            assert got is not None, rank
            assert (got.first, got.steady) == (full.first, full.steady), rank
            assert (tpk.peaks_of(sched, rank).before is not None) == dense
    finally:
        cache.clear()


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_alike_ranks_share_their_reduction(name: str, monkeypatch) -> None:
    """GPipe's ranks but the last read alike columns and bookkeeping: their kept actions and
    counts are worked out once (the ranks' own kind values kept), and every rank still equals
    the full replay; 1F1B's differ in their warm-ups and share none."""
    rng = random.Random(7)
    sched = build_schedule(name, 4, 24, 1)
    model, tr = random_setup(rng, sched)
    monkeypatch.setattr(tp, "MIN_ACTIONS", 0)
    cache.clear()
    try:
        peaks = [tpk.peaks_of(sched, rank) for rank in range(4)]
        shared = [pk.before is peaks[0].before for pk in peaks]
        assert shared == ([True, True, True, False] if name == "gpipe" else
                          [True, False, False, False])
        assert len({tuple(pk.vals) for pk in peaks}) == 4  # each rank's own stage
        for rank in range(4):
            full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
            got = tp.taped_rank(model, tr, sched, rank, device="cuda")
            assert (got.first, got.steady) == (full.first, full.steady), rank
    finally:
        cache.clear()
