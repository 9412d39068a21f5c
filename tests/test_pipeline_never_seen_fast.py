"""The never-seen pipelined estimate's cheaper list step equals the plain one: the batch verdicts
of planner/layouts/pipeline_checks.py (``all_valid``) are ``shortened``'s, list for list, over
random runs and extra periods of real action lists, and ``shortened_lists`` (which builds only
the last trial's lists) gives the lists of the plain trial-by-trial search (every trial's lists
built by ``shortened``), over every rank of a grid of schedules and at seeded random points; the
directions' groups (``balanced_group``) are those of the plain search over every group of up to
four runs."""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from planner.layouts import pipeline_periods
from planner.layouts.pipeline_checks import all_valid, balanced_group
from planner.layouts.pipeline_memory import rank_actions
from planner.layouts.pipeline_periods import (
    Prepared,
    _counts,
    choose_directions,
    plan,
    shortened,
    shortened_lists,
)
from planner.layouts.pipeline_runs import Run, find_runs
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from tests.test_pipeline_lists import _runs


def _plain_shortened_lists(actions: list):
    """Every trial's lists built, the first invalid one ending the trial."""
    todo = plan(actions)

    def attempt(trial):
        runs = [r for x in trial for r in x]
        cand = []
        for e in [{}] + [{id(r): 1 for r in x} for x in trial] + [{id(r): 2 for r in runs}]:
            c = shortened(actions, runs, e)
            if c is None:
                return None
            cand.append(c)
        return cand

    return choose_directions(todo, attempt)


def _check(name, p, m, v):
    try:
        sched = build_schedule(name, p, m, v)
    except ScheduleConstraintError:
        return 0
    for rank in range(p):
        actions = rank_actions(sched, rank)
        groups, lists = shortened_lists(actions)
        want_groups, want_lists = _plain_shortened_lists(actions)
        assert lists == want_lists, (name, p, m, v, rank)
        assert _runs(groups) == _runs(want_groups), (name, p, m, v, rank)
    return 1


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
             ("interleaved-1f1b", 4), ("zb-h1", 1), ("dualpipe-v", 2)]


@pytest.mark.parametrize("name,v", SCHEDULES)
def test_lists_equal_the_plain_search_on_a_grid(name, v):
    done = 0
    for p in (2, 4, 8):
        for m in sorted({p, 2 * p, 3 * p, 4 * p, 5 * p, 7 * p, 8 * p, 6, 10}):
            done += _check(name, p, m, v)
    assert done >= 8


@pytest.mark.parametrize("batch", [0, 1 << 30])
def test_lists_equal_the_plain_search_whichever_check_runs(batch, monkeypatch):
    # every trial checked as arrays, or none (the lists' length picks otherwise)
    monkeypatch.setattr(pipeline_periods, "BATCH_ACTIONS", batch)
    for name, v in (("1f1b", 1), ("interleaved-1f1b", 2), ("gpipe", 1)):
        for p, m in ((2, 6), (4, 8), (4, 20), (8, 24), (8, 40)):
            _check(name, p, m, v)


def test_lists_equal_the_plain_search_at_random_points():
    rng = random.Random(20261206)
    done = 0
    while done < 30:
        name, v = rng.choice(SCHEDULES[:5])
        p = rng.choice([2, 3, 4, 6, 8, 16])
        m = rng.choice([p * rng.randint(1, 8), rng.randint(1, 10 * p)])
        done += _check(name, p, m, v)


def _verdicts(actions, runs, extras):
    return [shortened(actions, runs, e) is not None for e in extras]


def test_batch_verdicts_equal_shortened():
    # random subsets of the plan's runs and random kept periods and extra periods, each list's
    # verdict alone and a batch's (all valid or not); valid and refused lists both occur
    rng = random.Random(11)
    seen, checked = set(), 0
    for name, p, m, v in [("1f1b", 4, 16, 1), ("1f1b", 8, 48, 1), ("interleaved-1f1b", 4, 16, 2),
                          ("interleaved-1f1b", 8, 32, 2), ("interleaved-1f1b", 8, 56, 2),
                          ("gpipe", 4, 12, 1), ("interleaved-1f1b", 4, 24, 3)]:
        sched = build_schedule(name, p, m, v)
        for rank in range(p):
            actions = rank_actions(sched, rank)
            prep = Prepared(actions)
            runs = [r for g in plan(actions) for r in g]
            trials = []
            for _ in range(16):
                pick = [r for r in runs if rng.random() < 0.7]
                extras = [{id(r): rng.randint(0, 2) for r in pick if rng.random() < 0.5}
                          for _ in range(rng.randint(1, 4))]
                trials.append((pick, extras))
            for r in find_runs(actions, min_reps=3):
                for _ in range(4):
                    kb = rng.randint(1, max(1, r.reps - 2))
                    x = Run(r.start, r.period, r.shift, r.reps, kb, rng.randint(1, r.reps - kb))
                    if x.dropped < 1:
                        continue
                    trials.append(([x], [{id(x): rng.randint(0, min(2, x.dropped))}, {}]))
            for pick, extras in trials:
                want = _verdicts(actions, pick, extras)
                assert all_valid(prep, pick, extras) == all(want), (name, p, m, rank)
                for e, w in zip(extras, want):
                    assert all_valid(prep, pick, [e]) == w
                    seen.add(w)
                checked += 1
    assert seen == {True, False} and checked > 300


def test_batch_check_leaves_input_and_weight_backwards_to_shortened():
    sched = build_schedule("zb-h1", 4, 12, 1)
    actions = rank_actions(sched, 0)
    runs = [r for g in plan(actions) for r in g]
    assert all_valid(Prepared(actions), runs, [{}]) is None


def _uniform(stages: list[int], cs: list[dict]) -> bool:
    tot = {st: [0, 0, 0, 0] for st in stages}
    for c in cs:
        for st, v in c.items():
            if st not in tot:
                return False
            tot[st] = [a + b for a, b in zip(tot[st], v)]
    per = {f for f, b, i, w in tot.values()}
    return len(per) == 1 and all(f == b and i == w for f, b, i, w in tot.values())


def _plain_grouped(actions: list, runs: list[Run]) -> list[list[Run]]:
    """Every group of the first run with up to 3 of the next 12 tried, smallest first."""
    stages = sorted({st for _, st, _, _ in actions})
    loose = sorted(((r, _counts(actions, r)) for r in runs), key=lambda rc: -rc[0].dropped)
    groups: list[list[Run]] = []
    while loose:
        (r, c), rest = loose[0], loose[1:]
        best = None
        for size in range(4):
            for combo in combinations(range(min(len(rest), 12)), size):
                if _uniform(stages, [c] + [rest[i][1] for i in combo]):
                    n = min([r.dropped] + [rest[i][0].dropped for i in combo])
                    if best is None or n > best[0]:
                        best = (n, combo)
            if best is not None:
                break
        if best is None:
            loose = rest
            continue
        n, combo = best
        g = [r] + [rest[i][0] for i in combo]
        loose = [rest[i] for i in range(len(rest)) if i not in combo]
        for k, x in enumerate(g):
            spare = x.reps - x.keep_before - x.keep_after - n
            if spare >= pipeline_periods.SPLIT_MIN_SPARE and \
                    x.period <= pipeline_periods.SPLIT_MAX_PERIOD:
                # split: the periods this group leaves out with the kept ones around them,
                # and a run of the rest (one period kept at each end)
                head = x.keep_before + n + x.keep_after
                more = Run(x.start + head * x.period, x.period, x.shift, x.reps - head)
                x = g[k] = Run(x.start, x.period, x.shift, head, x.keep_before, x.keep_after)
                loose.append((more, _counts(actions, more)))
            x.keep_before = x.reps - x.keep_after - n
        groups.append(g)
        loose.sort(key=lambda rc: -rc[0].dropped)
    return groups


def _copy(runs):
    return [Run(r.start, r.period, r.shift, r.reps, r.keep_before, r.keep_after, r.first_keep)
            for r in runs]


def _spy_on_grouped(monkeypatch) -> list:
    """The runs ``plan`` hands to ``grouped``, a copy per call, in order."""
    seen: list = []
    real = pipeline_periods.grouped

    def spy(actions, runs):
        seen.append(_copy(runs))
        return real(actions, runs)
    monkeypatch.setattr(pipeline_periods, "grouped", spy)
    return seen


@pytest.mark.parametrize("name,v", SCHEDULES + [("zb-v", 2), ("dualpipe", 1), ("zb-h2", 1)])
def test_plan_groups_equal_the_plain_search(name, v, monkeypatch):
    seen = _spy_on_grouped(monkeypatch)
    done = 0
    for p in (2, 4, 8):
        for m in sorted({p, 2 * p, 3 * p, 5 * p, 8 * p, 6, 10}):
            try:
                sched = build_schedule(name, p, m, v)
            except ScheduleConstraintError:
                continue
            for rank in range(p):
                actions = rank_actions(sched, rank)
                got = plan(actions)
                want = _plain_worth(_plain_grouped(actions, seen[-1]), len(actions))
                assert _runs(got) == _runs(want), (name, p, m, rank)
            done += 1
    assert done >= 5


def _plain_worth(groups: list[list[Run]], n: int) -> list[list[Run]]:
    """Every direction after the first kept where its shortest list stays under LONG_LIST
    actions or the lists' actions in all (the shortest list k + 2 times, three periods of each
    direction) come to fewer with it."""
    def total(gs):
        left = n - sum(r.dropped * r.period for g in gs for r in g)
        return (len(gs) + 2) * left + 3 * sum(r.period for g in gs for r in g)
    kept: list[list[Run]] = []
    for g in groups:
        short = n - sum(r.dropped * r.period for x in kept + [g] for r in x) < \
            pipeline_periods.LONG_LIST
        if not kept or short or total(kept + [g]) < total(kept):
            kept.append(g)
    return kept


def test_long_lists_keep_only_the_directions_that_pay(monkeypatch):
    """A deep interleaved pipeline's shortened lists hold a few rounds (256 actions each at pp
    32, v 4): a further direction is kept only where the lists' actions in all come to fewer;
    the plan equals the plain search's with that rule, and never replays more actions."""
    seen = _spy_on_grouped(monkeypatch)
    sched = build_schedule("interleaved-1f1b", 32, 32 * 12, 4)
    dropped_some = 0
    for rank in (0, 3, 4, 17, 31):
        actions = rank_actions(sched, rank)
        got = plan(actions)
        every = _plain_grouped(actions, seen[-1])
        assert _runs(got) == _runs(_plain_worth(every, len(actions))), rank
        groups, lists = shortened_lists(actions)
        assert sum(len(items) for items, _ in lists) >= 1024 * 3
        dropped_some += len(got) < len(every)
        with monkeypatch.context() as mp:  # every direction kept: never fewer actions
            mp.setattr(pipeline_periods, "LONG_LIST", 10 ** 9)
            _, every_lists = shortened_lists(actions)
        assert sum(len(i) for i, _ in lists) <= sum(len(i) for i, _ in every_lists), rank
    assert dropped_some


def test_balanced_group_equals_every_group_tried():
    # random per-stage counts, sizes 0 to 3 all reached
    rng = random.Random(3)
    sizes = set()
    for _ in range(3000):
        nst = rng.randint(1, 3)

        def counts():
            return {st: [rng.choice([0, 0, 1, 1, 2]) for _ in range(4)] for st in range(nst)
                    if rng.random() < 0.8}
        c0 = counts()
        rest = [counts() for _ in range(rng.randint(0, 12))]
        d0, drops = rng.randint(2, 9), [rng.randint(2, 9) for _ in rest]
        want = None
        for size in range(4):
            for combo in combinations(range(len(rest)), size):
                if _uniform(list(range(nst)), [c0] + [rest[i] for i in combo]):
                    n = min([d0] + [drops[i] for i in combo])
                    if want is None or n > want[0]:
                        want = (n, combo)
            if want is not None:
                break

        def flat(c):
            return tuple(x for st in range(nst) for x in c.get(st, [0, 0, 0, 0]))
        got = balanced_group(flat(c0), d0, [flat(c) for c in rest], drops)
        assert got == want
        sizes.add(None if want is None else len(want[1]))
    assert sizes == {None, 0, 1, 2, 3}


def test_rank_actions_decode_as_the_schedule_does():
    from planner.layouts.pipeline_codes import decoded
    done = 0
    for name, v in SCHEDULES + [("zb-v", 2), ("dualpipe", 1), ("zb-h2", 1)]:
        for p in (2, 4, 8):
            for m in (p, 3 * p, 8 * p, 6):
                try:
                    sched = build_schedule(name, p, m, v)
                except ScheduleConstraintError:
                    continue
                for rank in range(sched.num_ranks):
                    got = decoded(sched, rank)
                    assert got == sched.actions(rank)
                    assert all(type(x) is int for a in got for x in a[1:])
                done += 1
    assert done >= 20


def test_rank_lists_signature_keys_as_its_tuple():
    from planner.layouts.pipeline_structure import _LISTS, rank_lists
    sched = build_schedule("interleaved-1f1b", 4, 16, 2)

    class M:  # rank_lists reads the block count only
        num_layers = 32
    _LISTS.clear()
    for rank in range(4):
        sig = rank_lists(sched, rank, M()).signature
        plain = tuple(sig)
        assert sig == plain and hash(sig) == hash(plain) == hash(sig)
        assert {plain: 1}[sig] == 1 and {sig: 2}[plain] == 2
        assert sig != tuple(plain[:-1])
    _LISTS.clear()
