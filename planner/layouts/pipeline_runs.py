"""The periodic runs of a pipeline rank's action list: stretches where action ``i + P`` repeats
action ``i`` with the micro-batch index higher by one constant.

A rank's action list (``planner.layouts.pipeline_memory.rank_actions``) is a warm-up, a steady
state and a cool-down, each such a stretch. ``find_runs`` finds them in the list itself (kinds
and stages equal, micro-batches shifted by one constant), whatever the schedule, many candidate
periods at once as arrays, each first tested on every few actions (``_candidates``: a round of
a deep interleaved pipeline is a period of thousands of actions, and most periods hold no run);
``disjoint_runs`` keeps the ones covering most actions without overlap. ``planner.layouts.pipeline_periods`` decides which of their periods a shortened list
leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_SLOT = {"F": 0, "B": 1, "I": 1, "W": 2}
_MAX_PERIOD = 1 << 16
_CHUNK = 32  # periods find_runs tries at once (at most)


@dataclass
class Run:
    start: int  # index of the first action of its first period
    period: int  # actions per period
    shift: int  # micro-batch index added per period
    reps: int  # periods
    keep_before: int = 1
    keep_after: int = 1
    first_keep: int = 1  # keep_before as ``plan`` set it, before the directions' groups
    origin: tuple = ()  # a split run's: the periods its ancestors left out when split

    @property
    def dropped(self) -> int:
        return self.reps - self.keep_before - self.keep_after

    def span(self, extra: int = 0) -> tuple[int, int]:
        """Indices of the dropped actions, ``extra`` periods after the kept ones replayed."""
        return (self.start + (self.keep_before + extra) * self.period,
                self.start + (self.reps - self.keep_after) * self.period)


def find_runs(actions: list, max_period: int = _MAX_PERIOD, min_reps: int = 4) -> list[Run]:
    """Maximal periodic stretches (non-overlapping, the ones covering most actions first)."""
    n = len(actions)
    if n < 2 * min_reps:
        return []
    tok = np.array([_SLOT[a[0]] * 4 + (a[0] == "I") + 8 * a[1] for a in actions], dtype=np.int64)
    mb = np.array([a[2] for a in actions], dtype=np.int64)
    found = []
    best = (0, 1)  # (actions covered, period) of the longest run so far
    top = min(max_period, n // min_reps)
    P0, chunk = 1, 4
    while P0 <= top:  # periods P0 .. P1 - 1 at once, one row each
        P1 = min(top + 1, P0 + chunk)
        if 2 * best[0] >= n:  # (the loop below stops past twice the best period, unless a
            P1 = min(P1, max(P0 + 1, 2 * best[1] + 2))  # longer run turns up before)
        chunk = min(2 * chunk, _CHUNK)
        Ps = _candidates(tok, mb, np.arange(P0, P1), min_reps)
        if len(Ps):
            at = np.arange(n)[None, :] + Ps[:, None]  # action i + P (past the end: no match)
            inside = at < n
            at = np.where(inside, at, 0)
            good = inside & (tok[at] == tok[None, :])  # action i + P repeats action i ...
            d = mb[at] - mb[None, :]  # ... with this shift
            cont = good[:, 1:] & good[:, :-1] & (d[:, 1:] == d[:, :-1])
            first = good.copy()
            first[:, 1:] &= ~cont
            last = good.copy()
            last[:, :-1] &= ~cont
            rows, i0s = np.nonzero(first)
            i1s = np.nonzero(last)[1]  # (a stretch's first and last in the same row, in order)
            period = Ps[rows]
            reps_all = (i1s - i0s + 1 + period) // period
            shifts = d[rows, i0s]
            ok = (reps_all >= min_reps) & (shifts > 0)
            period, i0s, reps_all, shifts = period[ok], i0s[ok], reps_all[ok], shifts[ok]
        else:
            period = i0s = reps_all = shifts = ()
        stop = False
        k = 0
        for P in range(P0, P1):
            if 2 * best[0] >= n and P > 2 * best[1]:  # a run covers most of the list: enough
                stop = True
                break
            while k < len(period) and period[k] == P:
                reps = int(reps_all[k])
                found.append(Run(int(i0s[k]), P, int(shifts[k]), reps))
                best = max(best, (reps * P, P))
                k += 1
        if stop:
            break
        P0 = P1
    return disjoint_runs(found, min_reps)


def _candidates(tok: np.ndarray, mb: np.ndarray, Ps: np.ndarray, min_reps: int) -> np.ndarray:
    """The periods of ``Ps`` (increasing) that can hold a run, by a test on every S-th action
    alone (S a quarter of the smallest period): a run of period P repeats at least
    ``min_reps`` periods, a stretch of (min_reps - 1)·P actions that each repeat P actions on
    with one positive shift, so it holds K = ((min_reps - 1)·P) // S consecutive sampled
    actions that do, with equal shifts. A period without such K samples has no run (the test
    never leaves one out); the ones it keeps are searched action by action."""
    n = len(tok)
    S = int(Ps[0]) // 4
    if S <= 1:
        return Ps
    q = np.arange(0, n, S)
    at = q[None, :] + Ps[:, None]
    inside = at < n
    at = np.where(inside, at, 0)
    d = mb[at] - mb[q][None, :]
    ok = inside & (tok[at] == tok[q][None, :]) & (d > 0)
    cont = ok[:, 1:] & ok[:, :-1] & (d[:, 1:] == d[:, :-1])  # sample and the next alike
    need = ((min_reps - 1) * int(Ps[0])) // S - 1  # consecutive ``cont`` a run holds
    if need < 1:  # (min_reps 1: any period may hold a run)
        return Ps
    if cont.shape[1] < need:
        return Ps[:0]
    c = np.cumsum(cont, axis=1, dtype=np.int64)
    c = np.concatenate([np.zeros((len(Ps), 1), dtype=np.int64), c], axis=1)
    return Ps[((c[:, need:] - c[:, :-need]) == need).any(axis=1)]


def disjoint_runs(found: list[Run], min_reps: int) -> list[Run]:
    """The runs found, longest first, each trimmed to its longest stretch of whole periods no
    run taken before covers (at least ``min_reps`` of them), in the order they start."""
    found = sorted(found, key=lambda r: (-(r.reps - 2) * r.period, r.period, r.start))
    taken: list[Run] = []
    for r in found:  # each trimmed to its longest stretch of whole periods not yet taken
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


__all__ = ["Run", "disjoint_runs", "find_runs"]
