"""A pipeline schedule's action times where the per-rank relaxation would take hundreds of sweeps.

``planner/layouts/pipeline_sim.py`` relaxes every rank's times from lower bounds, rank after rank,
until nothing changes. Each sweep carries the longest path across the ranks once in its
direction, which settles most schedules in a few sweeps; but where that path wraps round the
ranks again and again (interleaved 1F1B or ZB-H1 with 16 stages a rank and uneven stages: the
forwards of a micro-batch go round the ranks 15 times) it takes hundreds, each re-running long
suffixes. ``settle`` is what takes over then.

Every wait between ranks is one step of a stage chain: a micro-batch's forwards follow its
stages (``next_stage``), its input-gradient backwards come back the other way. So the times
obey two kinds of chain at once: each rank's order (an action starts when the rank's previous
one has ended) and each micro-batch's stage chains (when its previous stage's action has ended,
plus the message). Along either kind, given the other kind's times, the whole chain is one
max-plus scan: end_k = P_k + max_(j <= k)(a_j + c_j - P_j), with ``a_j`` the other bound of
action j, ``c_j`` its cost and ``P`` the running sum of the costs (and messages) along the chain.
``settle`` alternates one sweep of rank chains (as the relaxation's: a rank re-run from its
first action whose time or input changed) with one sweep of every stage chain at once (a 2-D
cumulative maximum over stages x micro-batches), from lower bounds, until neither changes a time: the fixed point of the
schedule's equations, which its dependency graph (acyclic) makes unique. The longest path then
settles in as many alternations as it turns between the two kinds (three to five for the
schedules here), wherever it wraps.

Alternating two summation orders settles only in exact arithmetic, so the times are integers:
the costs and the message in units of 2**-k s, k the largest that keeps the sum of all costs
and messages (every time is at most that) below 2**61, half of int64's range (room for each
cost's rounding, and for the differences the scans take). Each cost is rounded to its unit, an
error below 2**-61 of the schedule's total per action; the times are then exact and
independent of the order of the work (``tests/test_pipeline_sim.py`` holds them equal to the
action-by-action event loop's).
"""

from __future__ import annotations

import math

import numpy as np

from planner.machine.deadline import check

__all__ = ["Readers", "consumers_of", "in_units", "seconds_of", "settle", "time_unit"]

# alternations, and actions scanned per action of the schedule (both sweeps, all rounds),
# before giving way to the event loop: at the limits, a setup's schedules settle in 3-5
# alternations, 3-7 scans each; stage costs far apart with messages slower than a stage make the
# path turn between ranks and stage chains thousands of times; a cycle never settles
MAX_ROUNDS, SETTLE_WORK = 64, 8


def consumers_of(s) -> list[list[int]]:
    """Per rank q, the ranks reading some action of q (a superset: stages next to q's): F
    waits on the previous stage, I/B on the next."""
    readers: list[set[int]] = [set() for _ in range(s.num_ranks)]
    for st, r in enumerate(s.stage_to_rank):
        for q in (s.prev_stage[st], s.next_stage[st]):
            if q >= 0:
                readers[s.stage_to_rank[q]].add(r)
    return [sorted(x) for x in readers]


class Readers:
    """Where a rank's re-run starts when another's times change: per pair of ranks (q, r), the
    positions of q that r reads, ascending, and the first index of r reading at or after each
    (a suffix minimum), built when first asked; ``first(q, r, changed)`` looks up (binary
    search) r's first action reading one at or after flat position ``changed`` (``inf``: none).
    """

    def __init__(self, offs: list[int], dep_pos: np.ndarray, inf: int) -> None:
        self.offs, self.dep_pos, self.inf = offs, dep_pos, inf
        self._reads: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def first(self, q: int, r: int, changed: int) -> int:
        got = self._reads.get((q, r))
        if got is None:
            offs = self.offs
            d = self.dep_pos[offs[r]:offs[r + 1]]
            i_q = np.flatnonzero((d >= offs[q]) & (d < offs[q + 1]))
            pos = d[i_q]
            if len(pos) > 1 and not bool((pos[1:] >= pos[:-1]).all()):
                o = np.argsort(pos, kind="stable")
                pos, i_q = pos[o], np.minimum.accumulate(i_q[o][::-1])[::-1]
            got = self._reads[q, r] = (pos, i_q)  # ascending in both
        pos, i_q = got
        j = int(np.searchsorted(pos, changed))
        return int(i_q[j]) if j < len(pos) else self.inf


def time_unit(cost: np.ndarray, n_all: int, comm_s: float) -> tuple[float, int] | None:
    """(units a second, the message in units): 2**k, k the largest that keeps the schedule's
    total (the sum of all costs and messages, above every time) below 2**61; None where a cost
    or the message would round to no unit."""
    bound = float(cost.sum()) + n_all * comm_s
    k = 61 - math.frexp(bound)[1]  # every time below 2**61 units of 2**-k s
    scale = math.ldexp(1.0, k)
    dl = int(round(comm_s * scale))
    if round(float(cost.min()) * scale) <= 0 or (comm_s > 0 and dl <= 0):
        return None
    return scale, dl


def in_units(cost: np.ndarray, scale: float) -> np.ndarray:
    """Costs in units of 1/scale s, each rounded to the nearest (``time_unit``'s): every way
    that times in units rounds them alike, so their times agree exactly."""
    return np.rint(cost * scale).astype(np.int64)


def settle(s, offs: list[int], flat: np.ndarray, dep_pos: np.ndarray, cost: np.ndarray,
           cross: np.ndarray, comm_s: float, consumers: list[list[int]] | None = None
           ) -> np.ndarray | None:
    """Ready times (end + outgoing message) by flat position, as ``pipeline_sim``'s relaxation
    gives them (its arguments, ``s`` the schedule; ``consumers``: ``consumers_of(s)`` where the
    caller has it); None where it does not apply (an action
    some chain needs that no rank runs, a cost too small for the unit, a cycle)."""
    p, S, m = s.num_ranks, s.num_stages, s.microbatches
    n_all = offs[p]
    if not n_all:
        return None
    unit = time_unit(cost, n_all, comm_s)
    if unit is None:
        return None
    scale, dl = unit

    def units(at) -> np.ndarray:  # the costs at ``at`` in units (made per use: none kept)
        return in_units(cost[at], scale)
    grids = _chains(s, flat, n_all, offs, units, cross, dl)
    if grids is None:
        return None
    # each action's end; E[n_all] = 0 (no input), E[n_all + 1] the ready times' last entry
    E = np.zeros(n_all + 2, dtype=np.int64)
    sent = np.concatenate([cross, [False]])[dep_pos]  # whether its input came by a message
    INF = n_all + 1
    lo = [0 if offs[r + 1] > offs[r] else INF for r in range(p)]  # first action to re-run
    consumers, readers = consumers or consumers_of(s), Readers(offs, dep_pos, INF)
    moved = np.zeros(n_all, dtype=bool)  # the actions a stage sweep changed
    budget = SETTLE_WORK * n_all
    for rnd in range(MAX_ROUNDS):
        check()  # (a request's work limit)
        changed = False
        for r in (range(p) if rnd % 2 == 0 else range(p - 1, -1, -1)):
            i0 = lo[r]
            if i0 == INF:
                continue
            lo[r] = INF
            a, b = offs[r], offs[r + 1]
            budget -= b - a - i0
            if budget < 0:
                return None
            c = units(slice(a + i0, b))
            Cl = np.cumsum(c)  # (the costs from i0 on: exact, so no running sum kept)
            x = E[dep_pos[a + i0:b]]
            if dl:
                x += sent[a + i0:b] * dl
            x -= Cl
            x += c
            if i0 and E[a + i0 - 1] > x[0]:
                x[0] = E[a + i0 - 1]
            new = np.maximum.accumulate(x)
            new += Cl
            old = E[a + i0:b]
            ne = new != old
            j = int(ne.argmax())
            if ne[j]:
                old[j:] = new[j:]
                changed = True
                for q in consumers[r]:  # (as the relaxation: its readers re-run this sweep)
                    f = readers.first(r, q, a + i0 + j)
                    if f < lo[q]:
                        lo[q] = f
        stirred = False
        for pos, prev, pref, cmp_ in grids:  # every stage chain at once, given the ranks' times
            budget -= pos.size
            y = E[prev]
            y += cmp_
            np.maximum.accumulate(y, axis=0, out=y)
            y += pref
            ne = y != E[pos]
            if ne.any():
                at = pos[ne]
                E[at] = y[ne]
                moved[at] = stirred = True
        if stirred:  # each rank re-run from the action after its first one changed
            changed = True
            for r in range(p):
                a, b = offs[r], offs[r + 1]
                j = int(moved[a:b].argmax()) if b > a else 0
                if b > a and moved[a + j]:
                    if j + 1 < b - a and j + 1 < lo[r]:
                        lo[r] = j + 1
                    moved[a:b] = False
        if not changed:
            return seconds_of(E, n_all, cross, dl, scale)
    return None


def seconds_of(E: np.ndarray, n_all: int, cross: np.ndarray, dl: int, scale: float) -> np.ndarray:
    """The ready times in seconds (end plus the message where it crosses ranks; the last two
    entries 0), written over ``E``'s own bytes a block at a time (no second array of the
    schedule's size)."""
    if dl:
        E[:n_all][cross] += dl
    E[n_all:] = 0
    out = E.view(np.float64)
    step = 1 << 16
    for a in range(0, n_all + 2, step):
        out[a:a + step] = E[a:a + step]  # (each block cast through numpy's own buffer)
    out /= scale
    return out


def _chains(s, flat: np.ndarray, n_all: int, offs: list[int], units, cross: np.ndarray,
            dl: int) -> list[tuple] | None:
    """Per stage chain and direction (forwards along ``next_stage``, input-gradient backwards
    against it): (the flat positions, stages x micro-batches; the position of each one's
    action before on its rank, ``n_all`` for a rank's first; the running sum P of costs and
    messages along the chain; c - P: one column where every micro-batch's are alike), or None
    where an action of one is run by no rank. Positions as int32 (fewer than 2**31)."""
    S, m = s.num_stages, s.microbatches
    pos_of = np.full(3 * S * m, -1, dtype=np.int32)
    pos_of[flat] = np.arange(n_all, dtype=np.int32)
    first_on_rank = np.zeros(n_all, dtype=bool)
    first_on_rank[[a for a, b in zip(offs[:-1], offs[1:]) if b > a]] = True
    out = []
    for first in (st for st in range(S) if s.prev_stage[st] < 0):
        chain = [first]
        while s.next_stage[chain[-1]] >= 0:
            chain.append(s.next_stage[chain[-1]])
        st = np.asarray(chain)
        for slot, order in ((0, st), (1, st[::-1])):
            pos = pos_of[(slot * S + order)[:, None] * m + np.arange(m)[None, :]]
            if (pos < 0).any():
                return None
            prev = pos - 1
            prev[first_on_rank[pos]] = n_all
            cc = units(pos)
            msg = cross[pos] * dl
            if (cc == cc[:, :1]).all() and (msg == msg[:, :1]).all():
                cc, msg = cc[:, :1], msg[:, :1]  # (the same for every micro-batch)
            pref = np.cumsum(cc, axis=0)
            pref[1:] += np.cumsum(msg[:-1], axis=0)
            out.append((pos, prev, pref, cc - pref))
    return out
