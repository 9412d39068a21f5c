"""The optimized schedule builders and simulator against the originals (tests/pipeline_reference.py):
identical action orders, and identical times, busy totals and in-flight peaks, bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner import pipeline_schedules as schedules
from planner.pipeline_schedules import build_schedule
from planner.pipeline_sim import ScheduleDeadlock, simulate
from tests import pipeline_reference as ref

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v", "dualpipe"]


def _fields(s) -> tuple:
    return (s.name, s.num_ranks, s.virtual_stages, s.num_stages, s.microbatches, s.stage_to_rank,
            s.prev_stage, s.next_stage, s.orders, bytes(s.full_backward))


def _build(mod, name: str, p: int, m: int, v: int):
    try:
        return mod.build_schedule(name, p, m, v)
    except ValueError as e:
        return repr(e)


@pytest.mark.parametrize("name", SCHEDULES)
def test_orders_match_reference(name: str) -> None:
    for p in (1, 2, 3, 4, 5, 8):
        for m in (1, 2, 3, 4, 6, 8, 9, 12, 16, 17, 24, 32):
            for v in (1, 2, 3, 4):
                new, old = _build(schedules, name, p, m, v), _build(ref, name, p, m, v)
                if isinstance(old, str) or isinstance(new, str):
                    assert new == old, (name, p, m, v)
                else:
                    assert _fields(new) == _fields(old), (name, p, m, v)


def _same_outcome(a, b) -> None:
    assert a.makespan_s == b.makespan_s
    assert a.busy_s == b.busy_s
    assert a.first_start_s == b.first_start_s
    assert a.last_end_s == b.last_end_s
    assert a.peak_in_flight == b.peak_in_flight
    assert np.array_equal(a.start_s, b.start_s)
    assert np.array_equal(a.end_s, b.end_s)


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        name = rng.choice(SCHEDULES)
        v = {"interleaved-1f1b": rng.choice([2, 3, 4]), "zb-h1": rng.choice([1, 2, 3]),
             "zb-v": 2, "dualpipe-v": 2}.get(name, 1)
        p = rng.choice([2, 4, 6]) if name == "dualpipe" else rng.randint(1, 9)
        m = rng.randint(1, 40)
        try:
            sched = build_schedule(name, p, m, v)
        except ValueError:
            continue
        S = sched.num_stages
        costs = [[rng.choice([1.0, rng.uniform(0.05, 3.0)]) for _ in range(S)] for _ in range(3)]
        comm = rng.choice([0.0, 0.0, rng.uniform(0.0, 0.5), 1e-3])
        yield sched, costs, comm


@pytest.mark.parametrize("seed", range(4))
def test_simulation_matches_reference(seed: int) -> None:
    n = 0
    for sched, (f, i, w), comm in _cases(80, seed):
        _same_outcome(simulate(sched, f, i, w, comm), ref.simulate(sched, f, i, w, comm))
        n += 1
    assert n > 20


def test_large_case_matches_reference() -> None:
    for name, v in (("zb-v", 2), ("interleaved-1f1b", 2), ("dualpipe", 1)):
        sched = build_schedule(name, 16, 64, v)
        assert _fields(sched) == _fields(ref.build_schedule(name, 16, 64, v))
        c = [0.7 + 0.01 * s for s in range(sched.num_stages)]
        _same_outcome(simulate(sched, c, c[::-1], c, 0.013), ref.simulate(sched, c, c[::-1], c, 0.013))


def test_deadlock_reported_like_reference() -> None:
    sched = build_schedule("1f1b", 3, 4)
    bad = type(sched)(**{**sched.__dict__, "orders": [list(reversed(o)) for o in sched.orders]})
    with pytest.raises(ScheduleDeadlock) as new:
        simulate(bad, [1.0] * 3, [1.0] * 3, [1.0] * 3)
    with pytest.raises(ref.ScheduleDeadlock) as old:
        ref.simulate(bad, [1.0] * 3, [1.0] * 3, [1.0] * 3)
    assert str(new.value) == str(old.value)
