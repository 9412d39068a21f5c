"""A pipeline schedule's action times, rank by rank and action by action (pure Python).

``planner/layouts/pipeline_sim.py``'s last way: each rank runs its list until its next action
waits on one not yet timed, and is parked until that one is. It is also what names a deadlock
(ranks left waiting on each other) and, given a part of the times already known, what times the
rest (``pipeline_sim_steady``: a schedule's warm-up and drain around its repeated rounds).
The times are floats in seconds or integers in a unit (``pipeline_sim_chains``), whichever the
costs are.
"""

from __future__ import annotations

from array import array

import numpy as np

from planner.layouts.pipeline_sim_chains import in_units
from planner.machine.deadline import check

__all__ = ["event_loop", "new_ready", "owners"]


def new_ready(n_all: int, integer: bool) -> array:
    """Ready times by flat position, all unknown (-1), for ``event_loop`` to fill: entry n_all
    is 0 (an action waiting on none), n_all + 1 never comes (an action no rank runs). Typed,
    4-8 bytes an entry (lists of Python numbers would take 30-40: 480 MiB for a schedule of 2
    million actions)."""
    ready = array("q" if integer else "d", [-1]) * (n_all + 2)
    ready[n_all] = 0
    return ready


def owners(p: int, offs: list[int]) -> array:
    """Each flat position's rank (-1 past the actions: an input that is none or never comes)."""
    return _typed("i", np.concatenate([np.repeat(np.arange(p, dtype=np.int32), np.diff(offs)),
                                       np.full(2, -1, np.int32)]))


def _typed(code: str, x: np.ndarray) -> array:
    out = array(code)
    out.frombytes(np.ascontiguousarray(x).tobytes())
    return out


def event_loop(p: int, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
               cross: np.ndarray, message, ready: array, start: list[int] | None = None,
               stop: list[int] | None = None, scale: float | None = None,
               owner: array | None = None) -> list[int]:
    """Times rank r's actions from flat position ``start[r]`` (default its first) up to
    ``stop[r]`` (default its last), writing ``ready`` (end plus the outgoing message: ``message``
    where ``cross``; see ``new_ready``): everything before ``start`` must be timed already.
    With ``scale`` (integer ``ready``), costs are counted in units of 1/scale s, rounded
    (``message`` is in units then). Returns, per rank, the first position not timed:
    ``stop[r]``, or the action it waits at (for one past another rank's stop, or never: a
    deadlock where every rank runs to its end). ``owner``: ``owners(p, offs)``, where a caller
    times a schedule in several calls."""
    n_all = offs[p]
    start = list(offs[:-1]) if start is None else start
    stop = list(offs[1:]) if stop is None else stop
    integer = ready.typecode == "q"
    code, kind = ("q", np.int64) if integer else ("d", np.float64)
    has_delay = bool(message)

    def costs(a: int, b: int) -> np.ndarray:  # (a slice at a time: none of the schedule's size)
        return in_units(cost[a:b], scale) if integer else cost[a:b]

    def delay(a: int, b: int) -> np.ndarray:
        return cross[a:b].astype(kind) * message
    # Per rank, an iterator over (position, position waited for, cost[, delay]) and the item it
    # stopped at (None: none pending).
    its = [zip(range(a, b), _typed("i", dep_pos[a:b].astype(np.int32)), _typed(code, costs(a, b)),
               *([_typed(code, delay(a, b))] if has_delay else []))
           for a, b in zip(start, stop)]
    owner = owner or owners(p, offs)
    pending: list[tuple | None] = [None] * p
    # when each rank is free: the end of the action before its start (0 at its first)
    free = [ready[a - 1] - (message if has_delay and cross[a - 1] else 0) if a > offs[r]
            else (0 if integer else 0.0) for r, a in enumerate(start)]
    waits: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    work = [r for r in range(p - 1, -1, -1) if stop[r] > start[r]]
    turns = 0
    while work:
        turns += 1
        if not turns & 0xFFFF:
            check()  # (a request's work limit)
        r = work.pop()
        t = free[r]
        hold = pending[r]
        if hold is not None:  # the action it stopped at: its input is there now
            e = ready[hold[1]]
            if e > t:
                t = e
            t += hold[2]
            ready[hold[0]] = t + hold[3] if has_delay else t
            pending[r] = None
        if not has_delay:
            for i, d, c in its[r]:
                e = ready[d]
                if e < 0:
                    pending[r] = (i, d, c)
                    break
                if e > t:
                    t = e
                t += c
                ready[i] = t
        else:
            for i, d, c, dl in its[r]:
                e = ready[d]
                if e < 0:
                    pending[r] = (i, d, c, dl)
                    break
                if e > t:
                    t = e
                t += c
                ready[i] = t + dl
        free[r] = t
        hold = pending[r]
        if hold is not None:
            d = hold[1]
            q = owner[d]
            if q >= 0:
                waits[q].append((d, r))
            i = hold[0]
        else:
            i = stop[r]
        wl = waits[r]
        if wl:
            keep = []
            for d, w in wl:
                if d < i:
                    work.append(w)
                else:
                    keep.append((d, w))
            waits[r] = keep
    return [pending[r][0] if pending[r] is not None else stop[r] for r in range(p)]
