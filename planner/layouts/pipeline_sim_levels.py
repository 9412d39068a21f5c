"""A pipeline schedule's action times level by level: deep pipelines with costs far apart.

Where the longest path turns between ranks again and again (stage costs far apart, a link
slower than a stage), ``pipeline_sim``'s scans re-run long stretches for every turn, and the
action-by-action event loop pays Python's cost for each of millions of actions. But the order
in which actions can be timed does not depend on the costs: give every action its level, the
number of actions on the longest chain of waits that ends at it (the schedule's times with
every cost 1 and free messages, which the per-rank relaxation settles in a few sweeps: the
schedules are built for even stages). An action's inputs (the rank's action before it, the
action it waits for) are on lower levels, so one pass over the levels, each level's actions at
once (``end = max(end of the action before, input's end + message) + cost``, array
expressions), times every action: the same operations as the event loop's, in the same order
for each action, so the same times to the bit. Its cost is a few array passes plus a constant
per level, so it pays where levels are wide: many ranks (deep pipelines), not many actions a
rank (those repeat: ``pipeline_sim_steady``).
"""

from __future__ import annotations

import numpy as np

from planner.machine.deadline import check

__all__ = ["levels_of", "sweep"]


def levels_of(relax, p: int, offs: list[int], dep_pos: np.ndarray, readers
              ) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions in level order, int32; the index in that order where each level starts, and
    the end), or None where the unit-cost times do not settle (``relax``: the per-rank
    relaxation, ``pipeline_sim._relax_by_rank``)."""
    n_all = offs[p]
    lv = relax(p, offs, dep_pos, np.ones(n_all), np.zeros(n_all, dtype=bool), readers, 0.0)
    if lv is None:
        return None
    top = int(lv[:n_all].max()) if n_all else 0  # (exact: sums of ones below 2**53)
    level = lv[:n_all].astype(np.uint16 if top < 1 << 16 else np.int32)
    del lv
    order = np.argsort(level, kind="stable").astype(np.int32)  # (radix sort: small integers)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(level, minlength=top + 1)[1:])])
    return order, bounds


def sweep(offs: list[int], dep_pos: np.ndarray, cost: np.ndarray, cross: np.ndarray,
          comm_s: float, order: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Ready times (end + outgoing message) by flat position, as the event loop gives them,
    level by level (``levels_of``)."""
    n_all = offs[-1]
    first = np.zeros(n_all + 1, dtype=bool)
    first[[a for a, b in zip(offs[:-1], offs[1:]) if b > a]] = True
    before = order - 1  # the rank's action before each (n_all: none; end[n_all] is 0)
    before[first[order]] = n_all
    del first
    waits = dep_pos[order]  # (n_all: none; n_all + 1 never comes, excluded by the caller)
    sent = np.concatenate([cross, [False, False]])[waits] if comm_s > 0 else None
    end = np.zeros(n_all + 2)
    for k, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        if not k & 0x3FF:
            check()  # (a request's work limit)
        at = order[a:b]
        x = end[before[a:b]]
        y = end[waits[a:b]]
        if sent is not None:
            y[sent[a:b]] += comm_s
        np.maximum(x, y, out=x)
        x += cost[at]
        end[at] = x
    end[n_all:] = 0.0
    if comm_s > 0:
        end[:n_all][cross] += comm_s
    return end
