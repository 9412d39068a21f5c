"""The periodic runs of a pipeline rank's action list: stretches where action ``i + P`` repeats
action ``i`` with the micro-batch index higher by one constant.

A rank's action list (``planner.layouts.pipeline_memory.rank_actions``) is a warm-up, a steady
state and a cool-down, each such a stretch. ``find_runs`` finds them in the list itself (kinds
and stages equal, micro-batches shifted by one constant), whatever the schedule, many candidate
periods at once as arrays; ``disjoint_runs`` keeps the ones covering most actions without
overlap. ``planner.layouts.pipeline_periods`` decides which of their periods a shortened list
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
        Ps = np.arange(P0, P1)[:, None]
        at = np.arange(n)[None, :] + Ps  # action i + P (past the end: no match)
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
        reps_all = (i1s - i0s + 1 + rows + P0) // (rows + P0)
        shifts = d[rows, i0s]
        ok = (reps_all >= min_reps) & (shifts > 0)
        rows, i0s, reps_all, shifts = rows[ok], i0s[ok], reps_all[ok], shifts[ok]
        stop = False
        k = 0
        for P in range(P0, P1):
            if 2 * best[0] >= n and P > 2 * best[1]:  # a run covers most of the list: enough
                stop = True
                break
            while k < len(rows) and rows[k] == P - P0:
                reps = int(reps_all[k])
                found.append(Run(int(i0s[k]), P, int(shifts[k]), reps))
                best = max(best, (reps * P, P))
                k += 1
        if stop:
            break
        P0 = P1
    return disjoint_runs(found, min_reps)


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
