"""A rank's shortened lists for a new micro-batch count, derived from two known counts.

For a fixed schedule, stage count, rank and block count, a rank's action list as a function of
the micro-batch count m is a warm-up, a steady state and a cool-down, each made of periods that
repeat more often as m grows. Past a threshold (and within a class of m: m ≡ a modulo b - a) the
search of ``planner/layouts/pipeline_runs.py`` finds the same runs at the same places of the
list, each with the same period, shift and kept periods; only the runs' starts and repetition
counts move, by the same amount per step of b - a. The shortened lists (every action outside the
left-out periods, renumbered) are then the same lists, and the periods each direction leaves out
are affine in m.

So two searched counts a < b of a rank whose lists are alike (same signature, runs that
correspond one to one and compare alike by the periods they leave out) give another count m
(between them first, else past b, else below a) by extrapolation: each run's start and repetitions and the list's length
``x_a + (m - a)·(x_b - x_a)/(b - a)`` where those are whole numbers, the lists and signature of a,
the periods left out extrapolated alike, the runs comparing as at a (the plain search orders its
runs and directions by those). The extrapolation is checked on m's own action list, as arrays, before it is
used (``_holds``): the list is as long as extrapolated; every run is periodic (kinds and stages
repeat, micro-batches shifted by the run's shift); the actions kept (outside the left-out
periods) have the kinds, stages and flags of a's kept actions, in order; no flagged action, and
no action of the micro-batch the 1F1B warm-up holds, lies in a left-out period, and the held
forward's backward keeps its place among the kept actions. Those are what the plain search's
lists of m with those runs would be built from (``shortened`` renumbers kept actions by their
kinds and stages alone), and what the affine form needs (``pipeline_periods``' docstring: alike
periods, pins outside them, the periods after every stage's first backward, which the kept
actions' order fixes). A check that fails leaves m to the plain search. The answers are
therefore those of the lists' replays, to the byte; where the plain search at m finds other runs
(it can, where the order of its candidates changes with m), the lists differ but are equally
exact, and keep the template compiled for a. tests/test_pipeline_families.py holds the derived
lists equal to ``shortened``'s on m's own list with the extrapolated runs, and to the plain
search where that is stable, over every schedule kind.
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_memory import DROP_WARM_WORK, HOLD_WARM_WORK
from planner.layouts.pipeline_orders import B_SLOT, F_SLOT

__all__ = ["Known", "columns", "derive", "derived_entry", "known", "record"]

MIN_DROPPED = 2  # (pipeline_periods.MIN_DROPPED)
_PER_RANK = 12  # searched counts kept per rank


class Known:
    """One searched micro-batch count of a rank: its RankLists, its list's length, its runs
    (group sizes; per run period, shift, kept periods before and after, and ``plan``'s kept
    periods before; starts and repetitions), how its runs compare (``_order``), the
    kinds/stages and flags of its kept actions, the held forward/backward pairs as indices
    among the kept actions, and its family (counts of the rank whose lists are alike)."""

    __slots__ = ("m", "lists", "n", "shape", "start", "reps", "kept_tok", "kept_flag", "held",
                 "origin", "order", "family")

    def __init__(self, m, lists, n, shape, start, reps, kept_tok, kept_flag, held, origin=()):
        self.m, self.lists, self.n, self.shape = m, lists, n, shape
        self.start, self.reps = start, reps
        self.origin = origin  # (period, periods left out) of split runs' ancestors
        self.order = _order(shape[1], reps, origin)
        self.kept_tok, self.kept_flag, self.held = kept_tok, kept_flag, held
        self.family = None


def columns(schedule, rank: int):
    """(tok, micro-batch, flag) arrays of the rank's actions: tok = kind (F 0, B 1, I 2, W 3)
    + 4·stage; flags as ``pipeline_memory.rank_actions`` sets them (1F1B only: None for the
    other schedules, which have none). Every rank's decoded at once, kept with the schedule
    (the last few schedules)."""
    hit = _COLUMNS.get(id(schedule))
    if hit is None or hit[0] is not schedule:
        hit = (schedule, _decoded(schedule))
        if len(_COLUMNS) >= _COLUMNS_MAX:
            _COLUMNS.pop(next(iter(_COLUMNS)), None)
        _COLUMNS[id(schedule)] = hit
    return hit[1][rank]


_COLUMNS: dict[int, tuple] = {}
_COLUMNS_MAX = 16


def _decoded(schedule) -> list:
    lengths = [len(o) for o in schedule.orders]
    codes = np.concatenate([np.asarray(o, dtype=np.int64) for o in schedule.orders])
    m = schedule.microbatches
    slot, rest = np.divmod(codes, schedule.num_stages * m)
    stage, mb = np.divmod(rest, m)
    full = np.frombuffer(schedule.full_backward, dtype=np.uint8)[rest] != 0
    kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
    cuts = np.cumsum(lengths)[:-1]
    toks, mbs = np.split(kind + 4 * stage, cuts), np.split(mb, cuts)
    if schedule.name != "1f1b":
        return [(t, j, None) for t, j in zip(toks, mbs)]
    S = schedule.num_stages
    warm = np.repeat([min(m, S - int(st[0])) if len(st) else 0
                      for st in np.split(stage, cuts)], lengths)
    hold = (kind == 0) & (stage < S - 1) & (mb == warm - 2)
    drop = ~hold & (kind == 1) & (mb == m - warm)
    flag = np.where(hold, HOLD_WARM_WORK, np.where(drop, DROP_WARM_WORK, 0))
    return list(zip(toks, mbs, np.split(flag, cuts)))


def _order(runs, reps, origin=()) -> tuple:
    """How the runs compare by the periods and the actions ``plan`` would leave out (the plain
    search sorts its runs and directions by those, and split runs by their ancestors' before
    the split: ``origin``): each run's rank among the distinct values of both. Derived only
    where that order is a's."""
    d = [r - fk - ka for (_, _, _, ka, fk), r in zip(runs, reps)] + [v for _, v in origin]
    da = [x * run[0] for x, run in zip(d, runs)] + [p * v for p, v in origin]
    out = []
    for v in (d, da):
        rank = {x: i for i, x in enumerate(sorted(set(v)))}
        out.append(tuple(map(rank.__getitem__, v)))
    return tuple(out)


def _kept_mask(n: int, runs, start, reps) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    for (period, _, kb, ka, _), s, r in zip(runs, start, reps):
        mask[s + kb * period:s + (r - ka) * period] = False
    return mask


def _held(tok, mb, flag, mask):
    """Each held forward and its backward (same stage and micro-batch) as indices among the
    kept actions; None where one of them is left out."""
    if flag is None:
        return ()
    out = []
    for i in np.flatnonzero(flag == HOLD_WARM_WORK).tolist():
        st = tok[i] >> 2
        b = np.flatnonzero(((tok == 4 * st + 1) | (tok == 4 * st + 2)) & (mb == mb[i]))
        if not len(b) or not mask[i] or not mask[b[0]]:
            return None
        b = int(b[0])
        out.append((int(np.count_nonzero(mask[:i])), int(np.count_nonzero(mask[:b]))))
    return tuple(out)


def known(m: int, lists, groups, cols) -> Known | None:
    """A searched count's record (None where it has no runs)."""
    if not groups:
        return None
    tok, mb, flag = cols
    runs = [r for g in groups for r in g]
    shape = (tuple(len(g) for g in groups),
             tuple((r.period, r.shift, r.keep_before, r.keep_after, r.first_keep) for r in runs))
    start = [r.start for r in runs]
    reps = [r.reps for r in runs]
    mask = _kept_mask(len(tok), shape[1], start, reps)
    held = _held(tok, mb, flag, mask)
    if held is None:
        return None
    origin = tuple((r.period, v) for r in runs for v in r.origin)
    return Known(m, lists, len(tok), shape, start, reps, tok[mask],
                 None if flag is None else flag[mask], held, origin)


def derived_entry(lists, how) -> Known:
    """A derived count's record (its kept actions are a's), in a's family."""
    ea, m, n, start, reps, origin = how
    entry = Known(m, lists, n, ea.shape, start, reps, ea.kept_tok, ea.kept_flag, ea.held,
                  origin)
    entry.family = ea.family
    return entry


def record(history: dict, entry: Known | None) -> None:
    """Keep a searched count (the oldest out past ``_PER_RANK``), in the family of the counts
    whose lists it shares (signature, runs and their order)."""
    if entry is None:
        return
    if len(history) >= _PER_RANK:
        history.pop(next(iter(history)))
    if entry.family is not None:
        history[entry.m] = entry
        return
    for e in list(history.values()):
        if (e.shape == entry.shape and e.order == entry.order
                and e.lists.signature == entry.lists.signature):
            entry.family = e.family
            break
    else:
        entry.family = entry.m
    history[entry.m] = entry


def derive(history: dict, m: int, cols_of):
    """(lists, dropped, how) for count m from two known counts a < b of the rank whose lists are
    alike (between them first, else the nearest pair below m, else the nearest above), where
    every run's start
    and repetitions and the list's length extrapolate to whole numbers, checked on m's own list
    (``cols_of()``: its columns); None when no pair applies or the check fails."""
    families: dict = {}
    for e in sorted(history.values(), key=lambda e: e.m):  # (a copy: others may record)
        families.setdefault(e.family, []).append(e)
    pairs = []
    for es in families.values():
        for i, ea in enumerate(es):
            for eb in es[i + 1:]:
                if ea.m > m:
                    pairs.append((2, ea.m, ea, eb))
                else:
                    pairs.append((0, eb.m - ea.m, ea, eb) if eb.m > m else (1, -ea.m, ea, eb))
    pairs.sort(key=lambda x: x[:2])
    for _, _, ea, eb in pairs[:_TRIES]:
        got = _extrapolated(ea, eb, m, cols_of)
        if got is not None:
            return got
    return None


_TRIES = 3


def _extrapolated(ea: Known, eb: Known, m: int, cols_of):
    num, den = m - ea.m, eb.m - ea.m
    n, r0 = divmod(ea.n * den + num * (eb.n - ea.n), den)
    if r0:
        return None
    start, reps, ov = [], [], []
    if len(ea.origin) != len(eb.origin):
        return None
    for xa, xb, out in ((ea.start, eb.start, start), (ea.reps, eb.reps, reps),
                        ([v for _, v in ea.origin], [v for _, v in eb.origin], ov)):
        for a, b in zip(xa, xb):
            x, r0 = divmod(a * den + num * (b - a), den)
            if r0:
                return None
            out.append(x)
    sizes, runs = ea.shape
    dropped = [r - kb - ka for (_, _, kb, ka, _), r in zip(runs, reps)]
    per_group, i = [], 0
    for size in sizes:
        d = dropped[i:i + size]
        if min(d) < MIN_DROPPED or max(d) != min(d):
            return None
        per_group.append(d[0])
        i += size
    origin = tuple((p, v) for (p, _), v in zip(ea.origin, ov))
    if _order(runs, reps, origin) != ea.order:
        return None
    tok, mb, flag = cols_of()
    if not _holds(ea, runs, start, reps, n, tok, mb, flag):
        return None
    return ea.lists, tuple(per_group), (ea, m, n, start, reps, origin)


def _holds(ea: Known, runs, start, reps, n, tok, mb, flag) -> bool:
    """The extrapolated runs on m's list: periodic, the kept actions a's, no flag or held
    micro-batch left out."""
    if len(tok) != n:
        return False
    lag = np.zeros(n, dtype=np.int64)
    shift = np.zeros(n, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    for (period, sh, kb, ka, _), s, r in zip(runs, start, reps):
        e = s + r * period
        if s < 0 or e > n:
            return False
        lag[s + period:e] = period
        shift[s + period:e] = sh
        mask[s + kb * period:s + (r - ka) * period] = False
    i = np.flatnonzero(lag)
    v = tok * (4 * n + 4) + mb  # (micro-batches and shifts are below n: one comparison)
    kept = tok[mask]
    if not ((v[i] - v[i - lag[i]] == shift[i]).all() and len(kept) == len(ea.kept_tok)
            and (kept == ea.kept_tok).all()):
        return False
    if flag is None:
        return ea.kept_flag is None
    if ea.kept_flag is None or not np.array_equal(flag[mask], ea.kept_flag) or flag[~mask].any():
        return False
    return _held(tok, mb, flag, mask) == ea.held
