"""The periodic runs and shortened lists of pipeline ranks (planner/layouts/pipeline_periods.py:
``find_runs``, ``shortened``, ``shortened_lists``) equal, run for run and list for list, those
of the reference implementation below (one period at a time, a dictionary per stream), over a
grid of schedules, stage counts, virtual stages, micro-batch counts and every rank, and at
seeded random points."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.layouts.pipeline_memory import rank_actions
from planner.layouts.pipeline_periods import (
    HOLD_WARM_WORK,
    choose_directions,
    plan,
    shortened,
    shortened_lists,
)
from planner.layouts.pipeline_runs import (
    _MAX_PERIOD,
    _SLOT,
    Actions,
    Run,
    disjoint_runs,
    find_runs,
)
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from tests.test_pipeline_families import KINDS, rank_columns


def _ref_shortened(actions: list, runs: list[Run], extra: dict[int, int]) -> tuple[list, int] | None:
    """The list with each run's dropped periods left out (``extra[id(run)]`` of them replayed
    after its kept ones, between two cut markers), micro-batches renumbered per stream; with
    the micro-batch count, or None when it is not a valid step."""
    cuts: dict[int, tuple[int, int]] = {}  # open position -> (close position, resume position)
    for r in runs:
        x = extra.get(id(r), 0)
        a, b = r.span(x)
        cuts[r.start + r.keep_before * r.period] = (a, b)
    res = []
    nxt: dict[tuple[int, int], int] = {}
    inputs: dict[int, list[int]] = {}
    new_j: dict[int, int] = {}  # original index -> renumbered micro-batch
    mb_limit = len(actions)  # an impossible micro-batch: the list is refused
    i, n, close, resume = 0, len(actions), -1, -1
    while i < n:
        if i in cuts:
            close, resume = cuts[i]
            res.append(("|", -1, -1, 0))
        if i == close:
            res.append(("|", -1, -1, 0))
            i, close = resume, -1
            continue
        k, st, _, flag = actions[i]
        if k == "W":  # the k-th weight backward of a stage follows its k-th input backward
            n_w = nxt.get((2, st), 0)
            nxt[2, st] = n_w + 1
            ins = inputs.get(st, [])
            j = ins[n_w] if n_w < len(ins) else mb_limit
        else:
            key = (_SLOT[k], st)
            j = nxt.get(key, 0)
            nxt[key] = j + 1
            if k == "I":
                inputs.setdefault(st, []).append(j)
        res.append((k, st, j, flag))
        new_j[i] = j
        i += 1
    if close >= 0:
        res.append(("|", -1, -1, 0))
    mbs = {v for (slot, _), v in nxt.items() if slot < 2}
    if len(mbs) != 1:
        return None
    mb = mbs.pop()
    return (res, mb) if _ref_valid(res, mb) and _ref_held_paired(actions, new_j) else None


def _ref_held_paired(actions: list, new_j: dict[int, int]) -> bool:
    """The micro-batch whose output the 1F1B warm-up holds (its backward does not free it)
    keeps its forward and backward under one number."""
    held = [(i, st, j) for i, (k, st, j, flag) in enumerate(actions) if flag == HOLD_WARM_WORK]
    for i, st, j in held:
        b = next(x for x, (k, s2, j2, _) in enumerate(actions)
                 if k in ("B", "I") and s2 == st and j2 == j)
        if new_j.get(i, -1) != new_j.get(b, -2):
            return False
    return True


def _ref_valid(items: list, mb: int) -> bool:
    seen: dict[tuple[int, int], str] = {}
    for k, st, j, _ in items:
        if k == "|":
            continue
        if j >= mb:
            return False
        done = seen.get((st, j), "")
        if (k == "F" and done) or (k in ("B", "I") and done != "F") or (k == "W" and done != "FI"):
            return False
        seen[st, j] = done + k
    return all(v in ("FB", "FIW") for v in seen.values())


def _ref_shortened_lists(actions: list) -> tuple[list[list[Run]], list]:
    """The directions kept and the lists to replay: none of the dropped periods, one more in
    one direction, two more in all. Directions are added one by one while every list stays a
    valid step; one that does not is tried merged with a later one (both then drop the same
    number of periods: the 1F1B warm-up's held micro-batch keeps its forward and backward
    paired only when the periods dropped before each are as many)."""
    todo = plan(actions)

    def attempt(trial):
        runs = [r for x in trial for r in x]
        cand = [_ref_shortened(actions, runs, {})]
        cand += [_ref_shortened(actions, runs, {id(r): 1 for r in x}) for x in trial]
        cand.append(_ref_shortened(actions, runs, {id(r): 2 for r in runs}))
        return cand if all(c is not None for c in cand) else None

    return choose_directions(todo, attempt)


def _ref_find_runs(actions: list, max_period: int = _MAX_PERIOD, min_reps: int = 4) -> list[Run]:
    """Maximal periodic stretches (non-overlapping, the ones covering most actions first)."""
    n = len(actions)
    if n < 2 * min_reps:
        return []
    ids: dict = {}  # one token per (kind, stage)
    tok = np.array([ids.setdefault(a[:2], len(ids)) for a in actions], dtype=np.int64)
    mb = np.array([a[2] for a in actions], dtype=np.int64)
    found = []
    best = (0, 1)  # (actions covered, period) of the longest run so far
    for P in range(1, min(max_period, n // min_reps) + 1):
        if 2 * best[0] >= n and P > 2 * best[1]:  # a run covers most of the list: enough
            break
        good = tok[P:] == tok[:-P]  # action i + P repeats action i ...
        d = mb[P:] - mb[:-P]  # ... with this shift
        cont = good[1:] & good[:-1] & (d[1:] == d[:-1])
        first = good.copy()
        first[1:] &= ~cont
        last = good.copy()
        last[:-1] &= ~cont
        for i0, i1 in zip(np.nonzero(first)[0], np.nonzero(last)[0]):
            reps = (i1 - i0 + 1 + P) // P  # actions i0 .. i1 + P
            if reps >= min_reps and d[i0] > 0:
                found.append(Run(int(i0), P, int(d[i0]), int(reps)))
                if int(reps) * P > best[0]:
                    best = (int(reps) * P, P)
    return _ref_disjoint_runs(found, min_reps)


def _ref_disjoint_runs(found: list[Run], min_reps: int) -> list[Run]:
    """Longest first, each trimmed against every run taken before."""
    found = sorted(found, key=lambda r: (-(r.reps - 2) * r.period, r.period, r.start))
    taken: list[Run] = []
    for r in found:
        a, b = r.start, r.start + r.reps * r.period
        free = [(a, b)]
        for t in taken:
            ta, tb = t.start, t.start + t.reps * t.period
            free = [piece for x, y in free for piece in ((x, min(y, ta)), (max(x, tb), y))
                    if piece[0] < piece[1]]
        best = None
        for x, y in free:
            x = a + -(-(x - a) // r.period) * r.period
            reps = (y - x) // r.period
            if reps >= min_reps and (best is None or reps > best.reps):
                best = Run(x, r.period, r.shift, reps)
        if best is not None:
            taken.append(best)
    return sorted(taken, key=lambda r: r.start)


def test_disjoint_runs_equal_the_reference_on_random_runs():
    """Overlapping random runs (some inside others, some meeting several): trimmed alike."""
    rng = random.Random(5)
    for _ in range(300):
        found = [Run(rng.randint(0, 400), rng.choice([1, 2, 3, 6, 32]), 1, rng.randint(1, 40))
                 for _ in range(rng.randint(1, 40))]
        for min_reps in (1, 2, 4):
            assert (_runs([disjoint_runs(found, min_reps)])
                    == _runs([_ref_disjoint_runs(found, min_reps)]))


def _runs(groups):
    return [[(r.start, r.period, r.shift, r.reps, r.keep_before, r.keep_after) for r in g]
            for g in groups]


def _check(name, p, m, v):
    try:
        sched = build_schedule(name, p, m, v)
    except ScheduleConstraintError:
        return 0
    for rank in range(p):
        actions = rank_actions(sched, rank)
        assert _runs([find_runs(actions)]) == _runs([_ref_find_runs(actions)])
        for max_period, min_reps in ((3, 4), (8, 2)):
            assert (_runs([find_runs(actions, max_period, min_reps)])
                    == _runs([_ref_find_runs(actions, max_period, min_reps)]))
        groups, lists = shortened_lists(actions)
        want_groups, want_lists = _ref_shortened_lists(actions)
        assert lists == want_lists, (name, p, m, v, rank)
        assert _runs(groups) == _runs(want_groups), (name, p, m, v, rank)
        for items, mb in lists:  # plain Python values, as the replays and the keys expect
            assert type(mb) is int
            assert all(type(x) is int for it in items for x in it[1:])
    return 1


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
             ("zb-h1", 1), ("zb-h1", 2), ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2),
             ("dualpipe", 1)]


@pytest.mark.parametrize("name,v", SCHEDULES)
def test_shortened_lists_equal_the_reference_on_a_grid(name, v):
    done = 0
    for p in (2, 4, 8):
        for m in sorted({p, 2 * p, 3 * p, 4 * p, 5 * p, 8 * p, 6, 10, 12}):
            done += _check(name, p, m, v)
    assert done >= 10


def test_shortened_lists_equal_the_reference_at_random_points():
    rng = random.Random(20261205)
    done = 0
    while done < 24:
        name, v = rng.choice(SCHEDULES)
        p = rng.choice([2, 3, 4, 6, 8, 16])
        m = rng.choice([p * rng.randint(1, 8), rng.randint(1, 10 * p)])
        done += _check(name, p, m, v)


def test_shortened_refuses_what_the_reference_refuses():
    # random runs (the plan's, and any periodic run with random kept periods) and extra periods
    # over real lists: the same list, or None, from both; both outcomes occur
    rng = random.Random(7)
    outcomes = set()
    for name, p, m, v in [("1f1b", 4, 16, 1), ("interleaved-1f1b", 4, 16, 2), ("zb-h1", 4, 12, 1),
                          ("zb-v", 4, 16, 2), ("gpipe", 4, 12, 1)]:
        sched = build_schedule(name, p, m, v)
        for rank in range(p):
            actions = rank_actions(sched, rank)
            runs = [r for g in plan(actions) for r in g]
            for _ in range(12):
                pick = [r for r in runs if rng.random() < 0.6]
                extra = {id(r): rng.randint(0, 2) for r in pick if rng.random() < 0.5}
                got = shortened(actions, pick, extra)
                assert got == _ref_shortened(actions, pick, extra)
                outcomes.add(got is None)
            for r in find_runs(actions, min_reps=3):
                for _ in range(4):
                    kb = rng.randint(1, max(1, r.reps - 2))
                    x = Run(r.start, r.period, r.shift, r.reps, kb, rng.randint(1, r.reps - kb))
                    if x.dropped < 1:  # (nothing left out: the cut would reopen itself)
                        continue
                    extra = {id(x): rng.randint(0, min(2, x.dropped))} if rng.random() < 0.5 else {}
                    got = shortened(actions, [x], extra)
                    assert got == _ref_shortened(actions, [x], extra)
                    outcomes.add(got is None)
    assert outcomes == {True, False}


def test_find_runs_equals_the_reference_on_long_lists():
    """Long periods (a round of a deep interleaved pipeline, the V shapes' steady states), where
    ``find_runs`` tests most periods on every few actions before it searches them action by
    action: the same runs as the reference, on deep schedules' ranks and on random lists with
    runs of random periods (up to 300 actions), repetitions and shifts planted in noise."""
    for name, p, m, v in [("interleaved-1f1b", 16, 160, 2), ("interleaved-1f1b", 8, 96, 4),
                          ("zb-v", 16, 64, 2), ("dualpipe-v", 16, 64, 2), ("1f1b", 32, 256, 1),
                          ("zb-h1", 16, 128, 1)]:
        sched = build_schedule(name, p, m, v)
        for rank in (0, p // 2, p - 1):
            actions = rank_actions(sched, rank)
            for min_reps in (2, 3, 4):
                assert (_runs([find_runs(actions, min_reps=min_reps)])
                        == _runs([_ref_find_runs(actions, min_reps=min_reps)])), (name, rank)
    rng = random.Random(11)
    kinds = ["F", "B", "I", "W"]
    for _ in range(40):
        actions: list = []
        while len(actions) < 3000:
            if rng.random() < 0.5:  # noise
                actions += [(rng.choice(kinds), rng.randrange(3), rng.randrange(50), 0)
                            for _ in range(rng.randint(1, 200))]
            else:  # a periodic stretch, possibly cut short mid-period
                P, shift = rng.randint(1, 300), rng.randint(1, 4)
                period = [(rng.choice(kinds), rng.randrange(3), rng.randrange(20), 0)
                          for _ in range(P)]
                reps = rng.randint(2, 8)
                actions += [(k, st, j + r * shift, 0) for r in range(reps)
                            for k, st, j, _ in period][:reps * P - rng.randrange(P)]
        for min_reps in (2, 3, 4):
            assert (_runs([find_runs(actions, min_reps=min_reps)])
                    == _runs([_ref_find_runs(actions, min_reps=min_reps)]))


@pytest.mark.parametrize("name,v", KINDS)
def test_the_search_on_decoded_columns_equals_the_search_on_the_list(name, v):
    """``rank_lists`` searches a rank's ``Actions`` made from the schedule's decoded columns,
    not its list of tuples: the same items, runs and lists."""
    done = 0
    for p, m, rank, (tok, mb, flag), actions in rank_columns(
            name, v, ((2, 8), (4, 13), (4, 24), (8, 40))):
        cols = Actions(tok & 3, tok >> 2, mb, flag)
        assert list(cols) == actions and cols[3:9] == actions[3:9]
        assert _runs([find_runs(cols)]) == _runs([find_runs(actions)])
        got, want = shortened_lists(cols), shortened_lists(actions)
        assert _runs(got[0]) == _runs(want[0]) and got[1] == want[1], (name, p, m, rank)
        done += 1
    assert done >= 10
