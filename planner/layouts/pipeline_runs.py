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

from bisect import bisect_right
from collections.abc import Sequence
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
    cols = Actions.of(actions)
    tok, mb = cols.kind + 4 * cols.stage, cols.mb  # (a kind and stage alike: tokens equal)
    found: list[tuple[int, int, int, int]] = []  # (start, period, shift, reps)
    best = (0, 1)  # (actions covered, period) of the longest run so far
    top = min(max_period, n // min_reps)
    P0, chunk = 1, 4
    while P0 <= top:  # periods P0 .. P1 - 1: first screened at once (``_candidates``)
        P1 = min(top + 1, P0 + chunk)
        if 2 * best[0] >= n:  # (the loop below stops past twice the best period, unless a
            P1 = min(P1, max(P0 + 1, 2 * best[1] + 2))  # longer run turns up before)
        chunk = min(2 * chunk, _CHUNK)
        maybe = set(_candidates(tok, mb, np.arange(P0, P1), min_reps).tolist())
        stop = False
        for P in range(P0, P1):
            if 2 * best[0] >= n and P > 2 * best[1]:  # a run covers most of the list: enough
                stop = True
                break
            if P not in maybe:
                continue
            good = tok[P:] == tok[:-P]  # action i + P repeats action i ...
            d = mb[P:] - mb[:-P]  # ... with this shift
            cont = good[1:] & good[:-1] & (d[1:] == d[:-1])
            first = good.copy()
            first[1:] &= ~cont
            last = good.copy()
            last[:-1] &= ~cont
            i0s = np.flatnonzero(first)
            i1s = np.flatnonzero(last)  # (a stretch's first and last, in order)
            reps = (i1s - i0s + 1 + P) // P  # actions i0 .. i1 + P
            shifts = d[i0s]
            ok = (reps >= min_reps) & (shifts > 0)
            for i0, r, sh in zip(i0s[ok].tolist(), reps[ok].tolist(), shifts[ok].tolist()):
                found.append((i0, P, sh, r))
                if r * P > best[0]:  # (a run met again at a multiple of its period: the first)
                    best = (r * P, P)
        if stop:
            break
        P0 = P1
    return disjoint_runs(found, min_reps)


_LETTER = "FBIW"  # an action's kind code (F 0, B 1, I 2, W 3) -> its letter
_CODE = np.zeros(256, dtype=np.int64)  # a kind's letter (its byte) -> its code
for _i, _k in enumerate(_LETTER):
    _CODE[ord(_k)] = _i


class Actions(Sequence):
    """A rank's action list as columns (``kind``: F 0, B 1, I 2, W 3; ``stage``; ``mb``;
    ``flag``, None where no action has one), its items ``(kind, stage, micro-batch, flag)`` as
    ``pipeline_memory.rank_actions`` gives them, built on demand where no list of them is
    given: the search reads the columns and only the few actions a shortened list keeps."""

    def __init__(self, kind, stage, mb, flag, items: list | None = None) -> None:
        self.kind, self.stage, self.mb, self.flag = kind, stage, mb, flag
        self.items = items
        if items is None:
            self._k, self._s, self._j = kind.tolist(), stage.tolist(), mb.tolist()
            self._f = None if flag is None else flag.tolist()

    @classmethod
    def of(cls, actions) -> Actions:
        """``actions`` (a list of items, or Actions already) as Actions."""
        if isinstance(actions, Actions):
            return actions
        if not actions:
            e = np.zeros(0, dtype=np.int64)
            return cls(e, e, e, None, list(actions))
        kinds, stages, mbs, flags = zip(*actions)
        letters = np.frombuffer("".join(kinds).encode("ascii"), dtype=np.uint8)
        flag = np.array(flags, dtype=np.int64)
        return cls(_CODE[letters], np.array(stages, dtype=np.int64),
                   np.array(mbs, dtype=np.int64), flag if flag.any() else None, actions)

    def __len__(self) -> int:
        return len(self.kind)

    def __getitem__(self, i):
        if self.items is not None:
            return self.items[i]
        if isinstance(i, slice):
            return [self[x] for x in range(*i.indices(len(self.kind)))]
        return (_LETTER[self._k[i]], self._s[i], self._j[i], 0 if self._f is None else self._f[i])

    def __iter__(self):
        if self.items is not None:
            return iter(self.items)
        return (self[i] for i in range(len(self.kind)))


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


def disjoint_runs(found: list, min_reps: int) -> list[Run]:
    """The runs found (``Run`` or (start, period, shift, reps)), longest first, each trimmed
    to its longest stretch of whole periods no run taken before covers (at least ``min_reps``
    of them), in the order they start."""
    rows = [(r.start, r.period, r.shift, r.reps) if isinstance(r, Run) else r for r in found]
    rows.sort(key=lambda r: (-(r[3] - 2) * r[1], r[1], r[0]))
    starts: list[int] = []  # the runs taken, disjoint: their starts and ends, by start
    ends: list[int] = []
    taken: list[Run] = []
    for a0, period, shift, reps in rows:
        b0 = a0 + reps * period
        j = bisect_right(starts, a0) - 1  # the last taken run starting at or before a0
        if j >= 0 and ends[j] >= b0:  # inside it: nothing left
            continue
        free = []  # the stretch less the taken runs it meets, in order
        x = a0
        j = max(j, 0)
        while j < len(starts) and starts[j] < b0:
            if ends[j] > x:
                if starts[j] > x:
                    free.append((x, starts[j]))
                x = ends[j]
            j += 1
        if x < b0:
            free.append((x, b0))
        best = None
        for x, y in free:
            x = a0 + -(-(x - a0) // period) * period
            n = (y - x) // period
            if n >= min_reps and (best is None or n > best.reps):
                best = Run(x, period, shift, n)
        if best is not None:
            k = bisect_right(starts, best.start)
            starts.insert(k, best.start)
            ends.insert(k, best.start + best.reps * best.period)
            taken.append(best)
    return sorted(taken, key=lambda r: r.start)


__all__ = ["Actions", "Run", "disjoint_runs", "find_runs"]
