"""A rank's shortened lists for a new micro-batch count, derived from two known counts.

For a fixed schedule, stage count, rank and block count, a rank's action list as a function of
the micro-batch count m is a warm-up, a steady state and a cool-down, each made of periods that
repeat more often as m grows. Past a threshold (and within a class of m: m ≡ a modulo b - a) the
search of ``planner/layouts/pipeline_periods.py`` finds the same runs at the same places of the
list, each with the same period, shift and kept periods; only the runs' starts and repetition
counts move, by the same amount per step of b - a. The shortened lists (every action outside the
left-out periods, renumbered) are then the same lists, and the periods each direction leaves out
are affine in m.

So two searched counts a < b of a rank whose lists are alike (same signature, runs that
correspond one to one) give every count m = a + k·(b - a), k >= 1, by extrapolation: each run's
start and repetitions ``x_a + k·(x_b - x_a)``, the lists and signature of a, the periods left out
extrapolated alike. The extrapolation is checked on m's own action list, as arrays, before it is
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
from planner.layouts.pipeline_schedules import B_SLOT, F_SLOT

__all__ = ["Known", "columns", "derive", "known", "record"]

MIN_DROPPED = 2  # (pipeline_periods.MIN_DROPPED)
_PER_RANK = 12  # searched counts kept per rank


class Known:
    """One searched micro-batch count of a rank: its RankLists, its list's length, its runs
    (group sizes; per run start, period, shift, repetitions, kept periods before and after),
    the kinds/stages and flags of its kept actions, and the held forward/backward pairs as
    indices among the kept actions."""

    __slots__ = ("m", "lists", "n", "shape", "start", "reps", "kept_tok", "kept_flag", "held",
                 "order")

    def __init__(self, m, lists, n, shape, start, reps, kept_tok, kept_flag, held):
        self.m, self.lists, self.n, self.shape = m, lists, n, shape
        self.order = _order(shape[1], reps)
        self.start, self.reps = start, reps
        self.kept_tok, self.kept_flag, self.held = kept_tok, kept_flag, held


def columns(schedule, rank: int):
    """(tok, micro-batch, flag) arrays of the rank's actions: tok = kind (F 0, B 1, I 2, W 3)
    + 4·stage; flags as ``pipeline_memory.rank_actions`` sets them (1F1B only)."""
    codes = np.asarray(schedule.orders[rank], dtype=np.int64)
    m = schedule.microbatches
    slot, rest = np.divmod(codes, schedule.num_stages * m)
    stage, mb = np.divmod(rest, m)
    full = np.frombuffer(bytes(schedule.full_backward), dtype=np.uint8)[rest] != 0
    kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
    flag = np.zeros(len(codes), dtype=np.int64)
    if schedule.name == "1f1b" and len(codes):
        S = schedule.num_stages
        warm = min(m, S - int(stage[0]))
        hold = (kind == 0) & (stage < S - 1) & (mb == warm - 2)
        drop = ~hold & (kind == 1) & (mb == m - warm)
        flag[hold] = HOLD_WARM_WORK
        flag[drop] = DROP_WARM_WORK
    return kind + 4 * stage, mb, flag


def _order(runs, reps) -> bytes:
    """How the runs compare by the periods and actions they leave out (the plain search sorts
    its runs and directions by those): derived only where that order is a's."""
    d = np.array([r - fk - ka for (_, _, _, ka, fk), r in zip(runs, reps.tolist())],
                 dtype=np.int64)
    x = np.stack([d, d * np.array([r[0] for r in runs], dtype=np.int64)])
    return np.sign(x[:, :, None] - x[:, None, :]).astype(np.int8).tobytes()


def _kept_mask(n: int, runs, start, reps) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    for (period, _, kb, ka, _), s, r in zip(runs, start, reps):
        mask[s + kb * period:s + (r - ka) * period] = False
    return mask


def _held(tok, mb, flag, mask):
    """Each held forward and its backward (same stage and micro-batch) as indices among the
    kept actions; None where one of them is left out."""
    out = []
    pos = np.cumsum(mask) - 1
    for i in np.nonzero(flag == HOLD_WARM_WORK)[0].tolist():
        st = tok[i] >> 2
        b = np.nonzero(((tok == 4 * st + 1) | (tok == 4 * st + 2)) & (mb == mb[i]))[0]
        if not len(b) or not mask[i] or not mask[b[0]]:
            return None
        out.append((int(pos[i]), int(pos[b[0]])))
    return tuple(out)


def known(m: int, lists, groups, cols) -> Known | None:
    """A searched count's record (None where it has no runs)."""
    if not groups:
        return None
    tok, mb, flag = cols
    runs = [r for g in groups for r in g]
    shape = (tuple(len(g) for g in groups),
             tuple((r.period, r.shift, r.keep_before, r.keep_after, r.first_keep) for r in runs))
    start = np.array([r.start for r in runs], dtype=np.int64)
    reps = np.array([r.reps for r in runs], dtype=np.int64)
    mask = _kept_mask(len(tok), shape[1], start, reps)
    held = _held(tok, mb, flag, mask)
    if held is None:
        return None
    return Known(m, lists, len(tok), shape, start, reps, tok[mask], flag[mask], held)


def record(history: dict, entry: Known | None) -> None:
    if entry is None:
        return
    if len(history) >= _PER_RANK:
        history.pop(next(iter(history)))
    history[entry.m] = entry


def derive(history: dict, m: int, cols_of):
    """(lists, dropped) for count m from two known counts a < b <= m of the rank (m - a a
    multiple of b - a) whose lists are alike, checked on m's own list (``cols_of()``: its
    columns); None when no pair applies or the check fails."""
    pair = None
    history = dict(history)  # (another thread may record meanwhile)
    ms = sorted(history)
    for i, a in enumerate(ms):
        if a >= m:
            break
        ea = history[a]
        for b in ms[i + 1:]:
            if b > m:
                break
            if (m - a) % (b - a):
                continue
            eb = history[b]
            if eb.lists.signature != ea.lists.signature or eb.shape != ea.shape:
                continue
            if pair is None or a > pair[0].m:
                pair = (ea, eb)
    if pair is None:
        return None
    ea, eb = pair
    k = (m - ea.m) // (eb.m - ea.m)
    n = ea.n + k * (eb.n - ea.n)
    start = ea.start + k * (eb.start - ea.start)
    reps = ea.reps + k * (eb.reps - ea.reps)
    sizes, runs = ea.shape
    dropped = [int(r) - kb - ka for (_, _, kb, ka, _), r in zip(runs, reps.tolist())]
    per_group, i = [], 0
    for size in sizes:
        d = dropped[i:i + size]
        if min(d) < MIN_DROPPED or max(d) != min(d):
            return None
        per_group.append(d[0])
        i += size
    if _order(runs, reps) != ea.order or eb.order != ea.order:
        return None
    tok, mb, flag = cols_of()
    if not _holds(ea, runs, start, reps, n, tok, mb, flag):
        return None
    return ea.lists, tuple(per_group)


def _holds(ea: Known, runs, start, reps, n, tok, mb, flag) -> bool:
    if len(tok) != n:
        return False
    for (period, shift, _, _, _), s, r in zip(runs, start.tolist(), reps.tolist()):
        e = s + r * period
        if s < 0 or e > n:
            return False
        if not (np.array_equal(tok[s + period:e], tok[s:e - period])
                and (mb[s + period:e] - mb[s:e - period] == shift).all()):
            return False
    mask = _kept_mask(n, runs, start, reps)
    if not (np.array_equal(tok[mask], ea.kept_tok) and np.array_equal(flag[mask], ea.kept_flag)):
        return False
    if flag[~mask].any():
        return False
    return _held(tok, mb, flag, mask) == ea.held
