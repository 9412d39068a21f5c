"""Whether shortened lists are valid steps, without building them: one batch of array operations
for all the lists of a trial of ``pipeline_periods.shortened_lists``.

``shortened`` (planner/layouts/pipeline_periods.py) renumbers a shortened list action by action
and refuses it when it is not the action list of a step with fewer micro-batches. A trial of
``shortened_lists`` needs only the verdict for each of its lists (the lists of the last trial
kept are built once, by ``shortened`` itself). For lists of forwards and full backwards only
(F, B: 1F1B, interleaved 1F1B, GPipe, ...) the verdict is, for each list:

- the kept actions are the list's minus each run's dropped span (the spans are disjoint and in
  order, so the kept actions keep their order);
- one micro-batch count: every non-empty stream (a stage's forwards, its backwards) holds as
  many kept actions, and every stage as many backwards as forwards (a forward without its
  backward, or a backward without its forward, is refused);
- each (stage, micro-batch)'s actions are F then B: the k-th kept forward of a stage comes
  before its k-th kept backward (with the counts equal per stage, the streams sorted by stage
  line up the k-th forwards with the k-th backwards);
- the held warm-up forward and its backward (``Prepared.held``) both kept, with the same new
  micro-batch number (its rank among the kept actions of its stream).

Every micro-batch number is below the count (a rank in its stream), so ``shortened``'s last
bound holds by construction. Lists with input or weight backwards (I, W) are left to
``shortened`` (``None``: not decided here). tests/test_pipeline_never_seen_fast.py holds the
verdicts equal to ``shortened``'s over random runs and extra periods.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from itertools import combinations
from operator import add

import numpy as np

from planner.layouts.pipeline_runs import _LETTER

__all__ = ["all_valid", "balanced_group", "built"]

_MARK = ("|", -1, -1, 0)  # a cut marker (pipeline_periods)
_LETTERS = np.array(list(_LETTER), dtype=object)  # (pipeline_runs' codes, as an array)


class _Columns:
    """A list's actions as arrays: the stream (stage, plus the stage count for a backward) and
    the held (forward, backward) index pairs."""

    def __init__(self, prep) -> None:
        self.key = np.array(prep.key, dtype=np.int64)
        held = np.array(prep.held, dtype=np.int64).reshape(-1, 2)
        self.held_f, self.held_b = held[:, 0], held[:, 1]


def _columns(prep):
    """The columns of a Prepared list (built once), or None where it has I or W actions."""
    cols = prep.__dict__.get("_columns", False)
    if cols is False:
        kind = prep.actions.kind
        cols = None if len(kind) and int(kind.max()) > 1 else _Columns(prep)
        prep._columns = cols
    return cols


def all_valid(prep, runs: list, extras: list[dict]) -> bool | None:
    """Whether ``shortened(prep.actions, runs, e, prep)`` is a valid step (not None) for every
    ``e`` in ``extras``; None where this check does not apply (I or W actions, or an extra
    count past a run's dropped periods): ask ``shortened``."""
    cols = _columns(prep)
    if cols is None:
        return None
    n, nst, L = len(prep.actions), prep.nst, len(extras)
    mask = np.ones((L, n), dtype=bool)
    for li, e in enumerate(extras):
        row = mask[li]
        for r in runs:
            a, b = r.span(e.get(id(r), 0))
            if a > b:
                return None
            row[a:b] = False
    lid, idx = np.nonzero(mask)  # per list, the kept actions in order
    K = 2 * nst
    keys = cols.key[idx]
    ck = lid * K + keys
    cnt = np.bincount(ck, minlength=L * K).reshape(L, K)
    top = cnt.max(1)
    if not top.all() or ((cnt != 0) & (cnt != top[:, None])).any():
        return False  # no action, or two micro-batch counts
    if (cnt[:, :nst] != cnt[:, nst:]).any():
        return False  # a stage's forward without its backward, or the reverse
    order = np.argsort(ck, kind="stable")  # per list, per stream, in order
    fwd = keys[order] < nst
    if (order[fwd] >= order[~fwd]).any():
        return False  # a micro-batch's backward before its forward
    if len(cols.held_f):
        occ = _occurrences(ck, order)
        new_j = np.full((L, n), -1, dtype=np.int64)
        new_j[lid, idx] = occ
        jf, jb = new_j[:, cols.held_f], new_j[:, cols.held_b]
        if ((jf < 0) | (jf != jb)).any():
            return False
    return True


def _occurrences(ck: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per kept action, how many of its stream (``ck``: list and stream; ``order``: the stable
    sort by it) come before it: its micro-batch among the kept actions."""
    sk = ck[order]
    pos = np.arange(len(sk))
    first = np.ones(len(sk), dtype=bool)
    first[1:] = sk[1:] != sk[:-1]
    occ = np.empty(len(sk), dtype=np.int64)
    occ[order] = pos - np.maximum.accumulate(np.where(first, pos, 0))
    return occ


def built(prep, runs: list, extras: list[dict]) -> list:
    """``[shortened(prep.actions, runs, e, prep) for e in extras]`` for lists ``all_valid``
    found valid: each kept action with its rank among the kept actions of its stream as its
    micro-batch, and two cut markers per run (where its kept periods end, and where the
    replayed extra ones end)."""
    n, nst, L = len(prep.actions), prep.nst, len(extras)
    mask = np.ones((L, n), dtype=bool)
    for li, e in enumerate(extras):
        for r in runs:
            a, b = r.span(e.get(id(r), 0))
            mask[li, a:b] = False
    lid, idx = np.nonzero(mask)
    K = 2 * nst
    ck = lid * K + _columns(prep).key[idx]
    occ = _occurrences(ck, np.argsort(ck, kind="stable"))
    mbs = np.bincount(ck, minlength=L * K).reshape(L, K).max(1).tolist()
    ends = np.cumsum(np.bincount(lid, minlength=L)).tolist()
    # each kept action's (kind letter, stage, flag), from the list's columns at once
    acts = prep.actions
    letters = _LETTERS[acts.kind[idx]].tolist()
    stages = acts.stage[idx].tolist()
    flags = acts.flag[idx].tolist() if acts.flag is not None else [0] * len(idx)
    idx_l, occ_l = idx.tolist(), occ.tolist()
    out, s = [], 0
    for li, e in enumerate(extras):
        kept = idx_l[s:ends[li]]
        x = slice(s, ends[li])
        res = list(zip(letters[x], stages[x], occ_l[x], flags[x]))
        s = ends[li]
        marks = []
        for r in runs:
            a, _ = r.span(e.get(id(r), 0))
            marks += [bisect_left(kept, r.start + r.keep_before * r.period), bisect_left(kept, a)]
        for p in sorted(marks, reverse=True):
            res.insert(p, _MARK)
        out.append((res, mbs[li]))
    return out


@lru_cache(maxsize=64)
def _combos(k: int, size: int) -> np.ndarray:
    combos = list(combinations(range(k), size))
    return np.array(combos, dtype=np.int64).reshape(len(combos), size)


def balanced_group(first: tuple, dropped: int, rest: list[tuple], rest_dropped: list[int]):
    """(periods, indices into ``rest``) of the smallest group of up to 3 of ``rest`` that
    balances with ``first`` (one period's counts, flat: per stage of the rank, forwards, input
    backwards, I's, W's): summed, every stage's forwards equal its input backwards, the same
    number for every stage, and its W's its I's; of those of the smallest size, the first (in
    ``combinations`` order) dropping the most periods (the least of the group's ``dropped``);
    None when none does."""
    k = len(rest)
    # alone, or with one: a few checks, in Python
    if _balances(first):
        return dropped, ()
    best = None
    for i in range(k):
        if _balances(tuple(map(add, first, rest[i]))):
            n = min(dropped, rest_dropped[i])
            if best is None or n > best[0]:
                best = (n, (i,))
    if best is not None or k < 2:
        return best
    counts = np.array(rest, dtype=np.int64).reshape(k, -1, 4)
    drops = np.array(rest_dropped, dtype=np.int64)
    base = np.array(first, dtype=np.int64).reshape(-1, 4)
    for size in range(2, min(k, 3) + 1):  # with two or three: every group at once
        idx = _combos(k, size)
        tot = base + counts[idx].sum(1)  # (groups, stages, 4)
        f = tot[:, :, 0]
        ok = ((f == tot[:, :, 1]).all(1) & (tot[:, :, 2] == tot[:, :, 3]).all(1)
              & (f == f[:, :1]).all(1))
        if ok.any():
            n = np.minimum(dropped, drops[idx].min(1))
            best = int(np.argmax(np.where(ok, n, -1)))
            return int(n[best]), tuple(idx[best].tolist())
    return None


def _balances(tot: tuple) -> bool:
    """One group's summed counts (flat, 4 per stage) balance."""
    f = tot[0::4]
    return f == tot[1::4] and tot[2::4] == tot[3::4] and f.count(f[0]) == len(f)
