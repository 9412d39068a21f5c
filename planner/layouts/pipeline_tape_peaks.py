"""Where a taped loop's highest row can be: a few of a rank's actions, found once per layout.

A taped loop (planner/layouts/pipeline_tape.py) draws, at each action j, the live bytes at its
start plus its kind's recorded row: ``start + P_j·v + d(c_j)``, where ``P_j`` counts the
actions before j per kind id (and, for GPipe and 1F1B, the per-action coefficients of what
their bookkeeping holds: ``pipeline_tape_single.extras`` is linear in a forward's output and the
two input gradients), ``v`` holds each kind's net bytes (and those three sizes), and ``d(c)`` a
kind's recorded row. Only ``v`` and ``d`` depend on the model; the counts are the layout's.

Inside a stretch of the rank's list whose tokens (kind id and coefficients) repeat with a
period p, the action o places into its r-th repetition is the same action as at r = 0 plus r
periods' nets: its total is affine in r, so at any ``v`` it is at most the larger of its first
and last repetitions' (and when equal to it, the first repetition's is as high and earlier, or
the last's is higher). So no action of a middle repetition is ever a loop's first highest row
(every action it drops has, at each ``v``, a kept one at least as high and earlier or higher;
the relation is a strict order, so the first highest itself is never dropped), and ``Peaks``
keeps the others: the first and last repetitions of each periodic stretch, for periods up to
``MAX_PERIOD`` (two for GPipe, 1F1B and interleaved 1F1B), and everything else. A model's
loop then reads a few dozen to a few thousand kept actions instead of every one (interleaved
pp 64 v 4 m 4096: 1,540 of 32,768 a rank). A taped template (every kept action a row:
planner/layouts/pipeline_tape_template.py) takes the kept actions as a list of their own
and drops its periodic stretches too (``fewer``: 100 of those 1,540).
``tests/test_pipeline_tape_peaks.py`` holds the first highest among the kept actions for any
values, and every taped rank equal to the full replay.
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_codes import decoded_columns
from planner.layouts.pipeline_schedules import rank_stages
from planner.layouts.pipeline_tape_records import as_keyed
from planner.layouts.pipeline_tape_single import SINGLE, extras

__all__ = ["MAX_PERIOD", "Peaks", "clear", "columns", "kept", "peaks_of"]

MAX_PERIOD = 6  # the zero-bubble schedules' longest (ZB-V's F, I, W of two stages)
_PERIODS = {"gpipe": 2, "1f1b": 2, "interleaved-1f1b": 2}  # (their steady pairs; any is exact)
_MAX_PERIOD_KEPT = 64  # the periods looked for among kept actions (interleaved: four blocks)
_SMALL = 1 << 16  # (kept counts this small are dense, however few the actions)
_COEF = 1 << 12  # (a held coefficient's range, in a token)


def kept(tok: np.ndarray, max_period: int = MAX_PERIOD) -> np.ndarray:
    """The positions of ``tok`` (a token per action, >= 0) that can be a first highest row:
    every one but the middle repetitions of each stretch periodic with a period up to
    ``max_period`` (the module docstring). All periods at once: ``eq[p - 1, j]`` is whether
    token j + p equals token j, and each run of it over [a, b) is a stretch [a, b + p) of
    period p."""
    n, W = len(tok), max_period
    eq = np.zeros((W, n + 2), dtype=bool)  # (a False either side of each period's row)
    for p in range(1, min(W, n - 1) + 1):
        np.equal(tok[:-p], tok[p:], out=eq[p - 1, 1:n - p + 1])
    flat = eq.ravel()
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    p = edges[0::2] // (n + 2) + 1
    a, b = edges[0::2] % (n + 2), edges[1::2] % (n + 2)
    reps = (b - a + p) // p
    big = reps >= 3
    drop = np.bincount(a[big] + p[big], minlength=n + 1)[:n + 1]
    drop -= np.bincount(a[big] + (reps[big] - 1) * p[big], minlength=n + 1)[:n + 1]
    return np.flatnonzero(np.cumsum(drop[:n]) == 0)


class Peaks:
    """A rank's taped layout: ``vals`` and ``counts`` as ``columns`` gives them,
    ``n`` actions, and the kept ones: each one's kind id (``ids``) and the counts before it per
    kind id, then (GPipe, 1F1B) the coefficients of a forward's output, the step's first
    backward's input gradient and the others' (``before``). Where those counts would take more
    room than the rank's actions (a rank of hundreds of stages whose periods are longer than
    ``MAX_PERIOD``), ``before`` is None and every action is kept: ``ids`` and the coefficients
    (``held``) per action, the counts summed where asked."""

    __slots__ = ("_fewer", "_tok", "before", "counts", "held", "held_change", "held_sent", "ids",
                 "n", "vals")

    def __init__(self, vals, counts, n, ids, before, held, held_change=None,
                 held_sent=(), tok=None) -> None:
        self.vals, self.counts, self.n = vals, counts, n
        self.ids, self.before, self.held = ids, before, held
        # (the kept actions' tokens and counts, then the totals: ``fewer``'s arguments; its answer)
        self._tok, self._fewer = tok, None
        # (GPipe, 1F1B) the three held sizes' coefficients in the loop's change of the live
        # bytes, and how many send works left at its end hold each
        self.held_change, self.held_sent = held_change, held_sent

    def first_highest(self, net_tot, drawn_tot, held_tot=None) -> int:
        """The kept action whose row is the loop's first highest (its index among the kept):
        ``net_tot``/``drawn_tot`` per kind id, ``held_tot`` the three held sizes."""
        if self.before is None:
            steps = net_tot[self.ids]
            if held_tot is not None:
                steps = steps + self.held @ held_tot
            live = np.cumsum(steps)
            live -= steps
        else:
            k = len(net_tot)
            live = self.before[:, :k] @ net_tot
            if held_tot is not None:
                live += self.before[:, k:] @ held_tot
        live += drawn_tot[self.ids]
        return int(np.argmax(live))

    def fewer(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind ids, counts before) of fewer kept actions (``fewer``), for a template; the
        dense form's alone."""
        if self._fewer is None:
            keep = fewer(*self._tok)
            self._fewer = (self.ids[keep], np.ascontiguousarray(self.before[keep]))
        return self._fewer

    def before_at(self, j: int):
        """The counts before kept action ``j`` (per kind id, then the held coefficients)."""
        if self.before is not None:
            return self.before[j]
        got = np.bincount(self.ids[:j], minlength=len(self.counts))
        if self.held is not None:
            got = np.concatenate((got, self.held[:j].sum(0)))
        return got


def columns(schedule, rank: int) -> tuple:
    """The rank's actions as ``ActionMemo`` keys them: (each one's kind id, 2 x the index of
    its kind + 4 x stage among ``vals``, plus 1 for the step's first of its kind on its stage;
    ``vals``; each kind id's count; each one's kind, 0 to 3; its micro-batch). Kept for the
    last two ranks."""
    key = (id(schedule), rank)
    got = _COLUMNS.get(key)
    if got is not None and got[0] is schedule:
        return got[1]
    kind, stage, mb = decoded_columns(schedule, rank)
    tok = as_keyed(kind, stage)
    mb = mb[tok >= 0]
    tok = tok[tok >= 0]
    vals = np.nonzero(np.bincount(tok))[0] if len(tok) else np.zeros(0, dtype=np.int64)
    lut = np.zeros(int(vals[-1]) + 1 if len(vals) else 1, dtype=np.int64)
    lut[vals] = np.arange(len(vals))
    idx = lut[tok]
    first = np.full(len(vals), len(tok), dtype=np.int64)
    np.minimum.at(first, idx, np.arange(len(tok)))
    ids = idx * 2
    ids[first] += 1  # the step's first action of its kind and stage: a kind of its own
    got = (ids, vals.tolist(), np.bincount(ids, minlength=2 * len(vals)),
           (tok & 3).astype(np.int8), mb.astype(np.int32))
    if len(_COLUMNS) >= 2:  # (a rank's, read by its skeleton's two steps and its rows)
        _COLUMNS.pop(next(iter(_COLUMNS)))
    _COLUMNS[key] = (schedule, got)
    return got


_COLUMNS: dict[tuple, tuple] = {}


_PEAKS: dict[tuple, tuple] = {}
_TOTAL = [0]  # their sizes (``_size``) summed
_PEAKS_SIZE = 1 << 22  # the kept ranks' counts, all together (32 MiB)


def peaks_of(schedule, rank: int) -> Peaks:
    """The rank's ``Peaks``, kept per schedule and rank (the ranks of the last few
    layouts). GPipe's and 1F1B's reduction reads the rank's stage only as whether it is the
    last and (1F1B) its warm-up length: ranks alike in those and in their columns share it
    (GPipe's all but the last), each with its own kind values."""
    key = (id(schedule), rank)
    got = _PEAKS.get(key)
    if got is not None and got[0] is schedule:
        return got[1]
    ids, vals, counts, kinds, mbs = columns(schedule, rank)
    name = schedule.name
    alike = None
    stage = rank_stages(schedule)[rank][0] if name in SINGLE else None
    if stage is not None:  # GPipe's ranks but the last alike: their reduction once
        S, m = schedule.num_stages, schedule.microbatches
        # (what ``extras`` reads of the stage: whether it is the last, 1F1B's warm-up)
        alike = (name, m, stage == S - 1, min(m, S - stage) if name == "1f1b" else 0,
                 len(counts), ids.tobytes(), kinds.tobytes(), mbs.tobytes())
        parts = _ALIKE.get(alike)
    if alike is None or parts is None:
        parts = _reduce(name, schedule, stage, ids, len(counts), kinds, mbs)
        if alike is not None:
            if len(_ALIKE) >= _ALIKE_MAX:
                try:  # (another thread may take it first)
                    _ALIKE.pop(next(iter(_ALIKE)), None)
                except (StopIteration, RuntimeError):
                    pass
            _ALIKE[alike] = parts
    got = Peaks(vals, counts, len(ids), *parts)
    size = _size(got)
    while _PEAKS and _TOTAL[0] + size > _PEAKS_SIZE:
        try:  # (another thread may take it first)
            _TOTAL[0] -= _size(_PEAKS.pop(next(iter(_PEAKS)))[1])
        except (KeyError, StopIteration, RuntimeError):
            break
    _PEAKS[key] = (schedule, got)
    _TOTAL[0] += size
    return got


def _reduce(name: str, schedule, stage: int | None, ids, k: int, kinds, mbs) -> tuple:
    """``Peaks``' fields after ``n``: the rank's kept actions and the counts before each (with
    GPipe's and 1F1B's held coefficients; ``stage``: their rank's, None for the others)."""
    tok, X, held_change, held_sent = ids, None, None, ()
    if stage is not None:
        X, end, sent = extras(name, stage, schedule.num_stages, schedule.microbatches,
                              kinds, mbs, (1, 0), ((1, 1), (1, 2)))
        X = X[:, :3]
        held_change = [int(x) for x in X.sum(0) + end[:3]]
        held_sent = [0, sent.count((1, 1)), sent.count((1, 2))]
        if np.abs(X).max(initial=0) >= _COEF:
            raise ValueError("held coefficients out of range")
        tok = ids + k * ((X + _COEF) @ np.array([1, 2 * _COEF, 4 * _COEF * _COEF]))
    at, before = reduced(tok, ids, k, X, _PERIODS.get(name, MAX_PERIOD))
    if before is None:  # (dense counts larger than the actions: kept all)
        return ids, None, X, held_change, held_sent
    return ids[at], before[:-1], None, held_change, held_sent, (tok[at], before)


_ALIKE: dict[tuple, tuple] = {}  # GPipe's and 1F1B's reductions by what they read
_ALIKE_MAX = 16


def reduced(tok: np.ndarray, ids: np.ndarray, k: int, X: np.ndarray | None = None,
            max_period: int = MAX_PERIOD) -> tuple[np.ndarray, np.ndarray | None]:
    """(the kept actions, the counts before each: per kind id of ``ids`` (``k`` of them), then
    the columns of ``X``) of a list of action tokens ``tok`` (``ids`` and the rows of ``X``
    alike for alike tokens); the counts None where they would take more room than the actions
    (every action kept then). ``max_period``: the longest period looked for (any is exact;
    a longer one keeps fewer actions where the schedule repeats with it)."""
    n = len(tok)
    at = kept(tok, max_period)
    rows = len(at) + 1
    if rows * (k + 3) > 2 * n + _SMALL:
        return np.arange(n), None
    c = _counted(at, n)
    before = np.bincount(c * k + ids, minlength=rows * k).reshape(rows, k)
    np.cumsum(before, axis=0, out=before)
    if X is not None:  # (the coefficients summed before each kept action, then in all)
        held = np.cumsum(X, axis=0)
        held = np.concatenate([held[at] - X[at], held[-1:]])
        before = np.concatenate([before, held], 1)
    return at, before


def fewer(tok: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Of ``reduced``'s kept actions (their tokens ``tok``; ``before``: the counts before each,
    then after the last), the ones kept when they are taken as a list of their own: each
    one's token its own and the counts up to the next, its periodic stretches dropped alike,
    until none is left (interleaved 1F1B: a round's blocks of pairs, then four blocks); their
    indices among the kept. Worth it where every kept action is a template's row
    (planner/layouts/pipeline_tape_template.py); a concrete loop reads them all at once."""
    at = np.arange(len(tok))
    while len(at) > 2:
        step = np.diff(before, axis=0)
        _, tok2 = np.unique(np.concatenate([step, tok[at][:, None]], 1), axis=0,
                            return_inverse=True)
        again = kept(tok2.reshape(-1), _MAX_PERIOD_KEPT)
        if len(again) == len(at):
            break
        at, before = at[again], np.concatenate([before[again], before[-1:]])
    return at


def _counted(at: np.ndarray, n: int) -> np.ndarray:
    """Per action, how many of the kept actions ``at`` are at or before it (the actions
    before the i-th kept one are those counted at most i)."""
    c = np.zeros(n, dtype=np.int64)
    c[at] = 1
    return np.cumsum(c, out=c)


def _size(pk: Peaks) -> int:
    return pk.ids.size * 4 + (0 if pk.before is None else 2 * pk.before.size) \
        + (0 if pk.held is None else pk.held.size)


def clear() -> None:
    _COLUMNS.clear()
    _PEAKS.clear()
    _ALIKE.clear()
    _TOTAL[0] = 0
