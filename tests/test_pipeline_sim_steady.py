"""The steady-state way of the timing simulation (``planner/layouts/pipeline_sim_steady.py``)
against the action-by-action event loop: the same time for every action, up to the rounding of
the integer units (the event loop sums floats one at a time)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner.layouts import pipeline_sim as ps
from planner.layouts import pipeline_sim_steady as steady
from planner.layouts.pipeline_schedules import build_schedule
from planner.layouts.pipeline_sim_chains import time_unit
from planner.layouts.pipeline_sim_loop import event_loop, new_ready
from tests.test_pipeline_sim import _event_loop, _simulated


def _inputs(s, f, i, w, comm):
    offs, flat, dep_pos, cost, cross, _, _ = ps._flat_arrays(s, f, i, w, comm)
    return offs, flat, dep_pos, cost, cross


def _repeat(s, f, i, w, comm):
    """``repeat``'s ready times, or None where it gives way (or the orders hold no rounds)."""
    offs, flat, dep_pos, cost, cross = _inputs(s, f, i, w, comm)
    rd = steady.rounds_of(flat, offs, s.microbatches)
    rd = rd and steady.with_reach(rd, offs, dep_pos)
    return rd and steady.repeat(rd, offs, dep_pos, cost, cross, comm)


def _loop_ready(s, f, i, w, comm):
    offs, _, dep_pos, cost, cross = _inputs(s, f, i, w, comm)
    return ps._event_loop(s, offs, dep_pos, cost, cross, comm), offs[-1]


def _far_apart(S: int, seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(rng.uniform(0.05, 4), 3) for _ in range(S)] for _ in range(3)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4),
                        ("zb-h1", 1), ("zb-h1", 2), ("zb-h2", 1), ("zb-v", 2),
                        ("dualpipe-v", 2), ("dualpipe", 1)]),
       st.integers(2, 6), st.integers(6, 96), st.randoms(use_true_random=False),
       st.sampled_from([0.0, 0.01, 0.7, 5.0]), st.booleans())
def test_repeated_rounds_equal_event_loop(sched, p, k, rnd, comm, alike) -> None:
    """Random per-stage costs (or a setup's: alike but the last stage's) and links: where the
    rounds repeat early enough, every action's time equals the event loop's; where not, it
    gives way (None). Drawn with a steady state of 16 rounds or more (MIN_ROUNDS is 32 in
    use: 16 here makes more of the small schedules drawn take this way)."""
    name, v = sched
    if name == "dualpipe" and p % 2:
        p += 1  # (two pipelines of p / 2 ranks each way)
    s = build_schedule(name, p, (2 if name.startswith("dualpipe") else 1) * p * k, v)
    S = s.num_stages
    if alike:
        f, i, w = [0.14] * (S - 1) + [0.57], [0.18] * (S - 1) + [0.5], [0.1] * S
    else:
        f, i, w = ([rnd.uniform(0.05, 4) for _ in range(S)] for _ in range(3))
    was, steady.MIN_ROUNDS = steady.MIN_ROUNDS, 16
    try:
        got = _repeat(s, f, i, w, comm)
    finally:
        steady.MIN_ROUNDS = was
    if got is None:
        return
    slow, n_all = _loop_ready(s, f, i, w, comm)
    assert got[:n_all] == pytest.approx(slow[:n_all], rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("name,p,v,m,comm", [
    ("interleaved-1f1b", 8, 4, 4096, 5.0),  # the caller's costs far apart and a slow link
    ("interleaved-1f1b", 4, 8, 4096, 0.0093),
    ("1f1b", 16, 1, 8192, 5.0),  # a repeat every 13 rounds, after 61
    ("zb-h1", 8, 1, 16384, 0.7),
    ("zb-h2", 8, 1, 16384, 0.0),
    ("zb-v", 8, 2, 8192, 5.0),
    ("dualpipe-v", 8, 2, 16384, 5.0),
    ("dualpipe", 8, 1, 32768, 0.7)])
def test_a_long_schedule_is_timed_from_its_repeated_rounds(name, p, v, m, comm) -> None:
    """From STEADY_FROM actions on, ``simulate`` times a schedule with a steady state from its
    repeated rounds alone (no other way), and every action's start and end equal the event
    loop's."""
    s = build_schedule(name, p, m, v)
    f, i, w = _far_apart(s.num_stages, 2)
    assert sum(len(o) for o in s.orders) >= ps.STEADY_FROM
    fast, used = _simulated(s, f, i, w, comm)
    assert used == ["steady"]
    slow = _event_loop(s, f, i, w, comm)
    # each time within 1e-10 of the makespan: the units' rounding is 2**-61 of the schedule's
    # total an action, the event loop's float sums round at each of up to 500k actions a path
    # (seen: 1e-12 of the makespan at most)
    tol = 1e-10 * slow.makespan_s
    assert fast.makespan_s == pytest.approx(slow.makespan_s, rel=1e-12)
    np.testing.assert_allclose(fast.start_flat, slow.start_flat, rtol=0, atol=tol)
    np.testing.assert_allclose(fast.end_flat, slow.end_flat, rtol=0, atol=tol)
    assert fast.busy_s == pytest.approx(slow.busy_s, rel=1e-12)
    assert fast.peak_in_flight == slow.peak_in_flight


def test_the_rounds_a_schedule_repeats() -> None:
    """GPipe (all forwards, then all backwards) holds no repeated round; 1F1B's round is one F
    and one B, interleaved 1F1B's p micro-batches through a rank's v stages (2 v p actions),
    DualPipe-V's a B and an F on each of a rank's two stages (its warm-up and drain split some
    backwards in two: no round is a rank's share of its actions a micro-batch)."""
    def rounds(name, p, m, v=1):
        s = build_schedule(name, p, m, v)
        offs, flat, *_ = _inputs(s, [1.0] * s.num_stages, [1.0] * s.num_stages,
                                 [1.0] * s.num_stages, 0.0)
        return steady.rounds_of(flat, offs, m)
    assert rounds("gpipe", 8, 256) is None
    dv = rounds("dualpipe-v", 8, 256, 2)
    assert (dv.q, dv.size) == (1, [4] * 8) and dv.count >= 256 - 32
    one = rounds("1f1b", 8, 256)
    assert (one.q, one.size) == (1, [2] * 8) and one.count >= 256 - 8
    inter = rounds("interleaved-1f1b", 4, 256, 4)
    assert (inter.q, inter.size) == (4, [32] * 4)


def test_the_equations_check_rejects_any_time_off_by_one_unit() -> None:
    """The check that makes a repeat an answer: integer times from the event loop meet every
    equation; one time one unit off anywhere (a rank's first action, mid-rank, its last) fails
    it."""
    s = build_schedule("interleaved-1f1b", 4, 64, 2)
    offs, _, dep_pos, cost, cross = _inputs(s, *_far_apart(s.num_stages, 3), 0.7)
    scale, dl = time_unit(cost, offs[-1], 0.7)
    ready = new_ready(offs[-1], integer=True)
    assert event_loop(s.num_ranks, offs, dep_pos, cost, cross, dl, ready,
                      scale=scale) == offs[1:]
    R = np.frombuffer(ready, dtype=np.int64)
    assert steady._holds(R, offs, dep_pos, cost, cross, dl, scale, block=100)
    for j in (offs[1], offs[2] + 37, offs[-1] - 1):
        for d in (1, -1):
            R[j] += d
            assert not steady._holds(R, offs, dep_pos, cost, cross, dl, scale, block=100)
            R[j] -= d


def test_no_repeat_within_the_warm_up_share_gives_way(monkeypatch) -> None:
    """1F1B, 16 ranks, slow links: the times repeat every 13 rounds only after 61. With the
    warm-up limited to a few rounds, ``repeat`` gives way, and ``simulate``'s other ways time the
    schedule as the event loop."""
    s = build_schedule("1f1b", 16, 8192)
    f, i, w = _far_apart(16, 2)
    assert _repeat(s, f, i, w, 5.0) is not None
    monkeypatch.setattr(steady, "WARMUP_SHARE", 10 ** 6)  # (L + 8 rounds at most)
    assert _repeat(s, f, i, w, 5.0) is None
    fast, used = _simulated(s, f, i, w, 5.0)
    assert used[0] == "steady" and len(used) > 1
    slow = _event_loop(s, f, i, w, 5.0)
    np.testing.assert_allclose(fast.end_flat, slow.end_flat, rtol=0, atol=1e-10 * slow.makespan_s)


# ---- level by level (planner/layouts/pipeline_sim_levels.py) -------------------------------
@settings(max_examples=40, deadline=None)
@given(st.sampled_from([("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4),
                        ("zb-h1", 1), ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2),
                        ("dualpipe", 1)]),
       st.integers(2, 24), st.integers(1, 6), st.randoms(use_true_random=False),
       st.sampled_from([0.0, 0.01, 0.7, 5.0]))
def test_levels_time_every_action_as_the_event_loop_to_the_bit(sched, p, k, rnd, comm) -> None:
    """One pass over the levels does each action's operations in the event loop's order: the
    same floats, not just close ones."""
    name, v = sched
    if name == "dualpipe" and p % 2:
        p += 1
    s = build_schedule(name, p, (2 if name.startswith("dualpipe") else 1) * p * k, v)
    f, i, w = ([rnd.uniform(0.05, 4) for _ in range(s.num_stages)] for _ in range(3))
    offs, _, dep_pos, cost, cross = _inputs(s, f, i, w, comm)
    got = ps.by_levels(s.num_ranks, offs, dep_pos, cost, cross, comm, None)
    slow, n_all = _loop_ready(s, f, i, w, comm)
    assert got is not None
    assert got[:n_all].tolist() == slow[:n_all].tolist()


@pytest.mark.parametrize("name,p,v,m,seed,ways", [
    ("gpipe", 256, 1, 64, 4, ["levels"]),
    ("zb-h2", 256, 1, 256, 4, ["levels"]),  # (the levels its builder's steps give)
    ("zb-v", 256, 2, 32, 4, ["levels"]),
    # fewer than WIDE actions a level (and too few to try the rounds): the relaxation gives way
    # (RELAX_WORK re-runs an action, RELAX_FLOOR at least)
    ("1f1b", 64, 1, 256, 5, ["relax", "levels"])])
def test_a_deep_schedule_is_timed_level_by_level(name, p, v, m, seed, ways) -> None:
    """From LEVELS_FROM ranks, a schedule whose rounds do not repeat (GPipe; about as many
    ranks as micro-batches) is timed level by level (first where levels are wide; else where
    the relaxation gives way soon: stage costs far apart and a slow link), not by the stage
    chains: the event loop's times to the bit."""
    s = build_schedule(name, p, m, v)
    f, i, w = _far_apart(s.num_stages, seed)
    assert p >= ps.LEVELS_FROM
    assert (s.levels is not None) == (name == "zb-h2")
    fast, used = _simulated(s, f, i, w, 5.0)
    assert used == ways
    slow = _event_loop(s, f, i, w, 5.0)
    assert fast.end_flat.tolist() == slow.end_flat.tolist()
    assert fast.makespan_s == slow.makespan_s


def test_a_repeat_written_where_the_orders_do_not_repeat_is_caught_by_the_check() -> None:
    """The check is what makes a repeat an answer. 1F1B's last rank with one F moved ahead of
    the B before it three quarters of the way in (a valid order, no longer one round all
    through), timed with the rounds found on the plain schedule: ``repeat`` writes times there
    that break their equations and gives way; ``simulate`` still times it as the event loop.
    Rounds claimed past a rank's actions give way too."""
    import dataclasses
    from array import array
    s = build_schedule("1f1b", 8, 512)
    f, i, w = _far_apart(8, 2)
    offs, flat, dep_pos, cost, cross = _inputs(s, f, i, w, 0.7)
    rd = steady.with_reach(steady.rounds_of(flat, offs, s.microbatches), offs, dep_pos)
    assert steady.repeat(rd, offs, dep_pos, cost, cross, 0.7) is not None
    assert steady.repeat(dataclasses.replace(rd, count=rd.count + 40), offs, dep_pos, cost,
                         cross, 0.7) is None
    last = list(s.orders[7])
    j = 3 * len(last) // 4 & ~1  # (an F at even places: F(j/2), B(j/2), F(j/2 + 1), ...)
    assert [s.decode(c)[0] for c in last[j:j + 3]] == ["F", "B", "F"]
    last[j + 1], last[j + 2] = last[j + 2], last[j + 1]
    moved = dataclasses.replace(s, orders=[*s.orders[:7], array("q", last)])
    offs2, flat2, dep2, cost2, cross2 = _inputs(moved, f, i, w, 0.7)
    assert steady.rounds_of(flat2, offs2, 512) is not None  # (its own rounds end earlier)
    assert steady.repeat(rd, offs2, dep2, cost2, cross2, 0.7) is None
    fast = ps.simulate(moved, f, i, w, 0.7)
    slow = _event_loop(moved, f, i, w, 0.7)
    np.testing.assert_allclose(fast.end_flat, slow.end_flat, rtol=0, atol=1e-10 * slow.makespan_s)
