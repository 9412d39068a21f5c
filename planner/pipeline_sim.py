"""Event simulation of a pipeline schedule's per-rank action lists.

Each rank runs its list in order; an action starts when the rank is free and its input is there:
- F of stage s: F of the previous stage of the same micro-batch has ended (plus one message);
- I (or B) of stage s: I/B of the next stage has ended (plus one message); on a pipeline's last
  stage, its own F (the loss is computed at the end of that F);
- W: its own I (same rank, already earlier in the list).
A message between stages on different ranks costs ``p2p_latency_s + bytes / bandwidth`` and
overlaps with computation (asynchronous send/recv, as torch's pipelining runtime posts them);
stages on the same rank pass tensors for free.

Conventions
- makespan_s: from the first action's start (time 0) to the last action's end, over all ranks.
- bubble fraction: idle rank-time inside that iteration over total rank-time,
  (p · makespan − Σ busy) / (p · makespan). With this convention GPipe and 1F1B give
  (p−1)/(m+p−1) (Narayanan et al. 2021, §2.2.1, eq. for the pipeline bubble).
- in flight: a micro-batch's activations on a stage are live from the start of its F until the
  end of its last backward action (B, or W when the backward is split: W still needs the stage's
  inputs). The per-rank peak counts (virtual stage, micro-batch) pairs, i.e. units of one
  virtual stage's activations for one micro-batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from planner.pipeline_schedules import Schedule


class ScheduleDeadlock(RuntimeError):
    """The action lists wait on each other (an invalid hand-written order)."""


@dataclass(frozen=True)
class SimOutcome:
    makespan_s: float
    busy_s: list[float]
    first_start_s: list[float]
    last_end_s: list[float]
    peak_in_flight: list[int]
    start_s: np.ndarray  # by action code
    end_s: np.ndarray

    @property
    def bubble_fraction(self) -> float:
        total = len(self.busy_s) * self.makespan_s
        return 0.0 if total <= 0 else max(0.0, (total - sum(self.busy_s)) / total)


def _code_arrays(s: Schedule, forward_s, input_s, weight_s, comm_s: float):
    """Per action code: duration, the cross-stage action it waits for (-1: none) and the message
    delay from its end to its consumer on the neighbouring stage. Waits on the same stage (B after
    F at a pipeline's end, W after I) are kept by the rank's own order and need no entry."""
    S, m = s.num_stages, s.microbatches
    f = np.asarray(forward_s, dtype=float)[:, None]
    i = np.asarray(input_s, dtype=float)[:, None]
    w = np.asarray(weight_s, dtype=float)[:, None]
    full = np.frombuffer(bytes(s.full_backward), dtype=np.uint8).reshape(S, m).astype(bool)
    cost = np.empty((3, S, m))
    cost[0] = f
    cost[1] = np.where(full, i + w, i)  # B = I + W (Qi et al. 2023, §2: T_B = T_I + T_W)
    cost[2] = w
    mb = np.arange(m)[None, :]
    rank = np.asarray(s.stage_to_rank)
    prev, nxt = np.asarray(s.prev_stage), np.asarray(s.next_stage)
    dep = np.full((3, S, m), -1, dtype=np.int64)
    dep[0] = np.where(prev[:, None] >= 0, prev[:, None] * m + mb, -1)
    dep[1] = np.where(nxt[:, None] >= 0, (S + nxt[:, None]) * m + mb, -1)
    out_delay = np.zeros((3, S, m))
    f_cross = (nxt >= 0) & (rank[np.maximum(nxt, 0)] != rank)  # F(s) feeds F(next) elsewhere
    b_cross = (prev >= 0) & (rank[np.maximum(prev, 0)] != rank)  # I(s) feeds I(prev) elsewhere
    out_delay[0] = np.where(f_cross[:, None], comm_s, 0.0)
    out_delay[1] = np.where(b_cross[:, None], comm_s, 0.0)
    # In-flight delta: +1 at F, -1 at the last backward action of (stage, mb).
    delta = np.zeros((3, S, m), dtype=np.int64)
    delta[0] = 1
    delta[1] = np.where(full, -1, 0)
    delta[2] = np.where(full, 0, -1)
    return cost.ravel(), dep.ravel(), out_delay.ravel(), delta.ravel()


def simulate(s: Schedule, forward_s, input_s, weight_s, comm_s: float = 0.0) -> SimOutcome:
    """Times every action of ``s``; costs are per virtual stage (length ``s.num_stages``).

    An action ends at ``max(end of the rank's previous action, ready time of the action it waits
    for) + cost``: the longest path through the dependency graph. Two ways to compute it, with
    the same result:
    - ``_relax_by_rank`` (used first): every rank's times come from one vectorised max-plus scan
      over its whole list given its inputs' ready times, starting from lower bounds (0) and
      re-run, sweeping the ranks forwards and backwards, until nothing changes. Each sweep
      carries a critical path across all ranks in one direction, so pipelines settle in a few
      sweeps (see ``benchmarks/pipeline_speed.py``). It needs every cost > 0: then a deadlock (a
      cycle) never settles and is caught by the sweep limit.
    - ``_event_loop``: ranks run action by action in pure Python, a rank parked when its next
      action waits on one not yet timed. Used when the relaxation does not settle within its
      sweep limit, and it is what reports a deadlock.
    """
    cost_a, dep_a, delay_a, delta_a = _code_arrays(s, forward_s, input_s, weight_s, comm_s)
    p = s.num_ranks
    orders = s.orders
    lens = [len(o) for o in orders]
    offs = [0] * (p + 1)
    for r in range(p):
        offs[r + 1] = offs[r] + lens[r]
    n_all = offs[p]
    flat = np.fromiter(itertools.chain.from_iterable(orders), dtype=np.int64, count=n_all)
    # pos_of[code]: where an action sits in ``flat``; n_all (a sentinel whose ready time is 0.0)
    # for "waits on nothing" and for actions no rank runs (a wait on those never ends).
    pos_of = np.full(len(cost_a) + 1, n_all, dtype=np.int64)
    pos_of[flat] = np.arange(n_all, dtype=np.int64)
    dep_f = dep_a[flat]
    dep_pos_np = np.where(dep_f >= 0, pos_of[dep_f], n_all)
    unrun = (dep_f >= 0) & (dep_pos_np == n_all)
    dep_pos_np[unrun] = n_all + 1  # ready time stays -1: a wait that never ends
    cost_f = cost_a[flat]
    delay_f = delay_a[flat]
    ready = None
    if n_all and not unrun.any() and float(cost_f.min()) > 0.0:
        ready = _relax_by_rank(p, offs, dep_pos_np, cost_f, delay_f)
    if ready is None:
        ready = _event_loop(s, offs, dep_pos_np, cost_f, delay_f if comm_s > 0 else None)
    return _outcome(s, offs, flat, ready, cost_a, delay_a, delta_a, cost_f)


# Sweeps after which the relaxation gives way to the event loop. The schedules here settle in
# 2-7 sweeps with uniform costs and free links, in up to ~40 with slow links
# (benchmarks/pipeline_speed.py; tests/test_pipeline_sim.py).
MAX_SWEEPS = 96


def _relax_by_rank(p: int, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
                   delay: np.ndarray) -> np.ndarray | None:
    """Ready times (end + outgoing message) by flat position, or None when the sweeps do not
    settle. For one rank with ready times R_j of its inputs and costs c_j, the recurrence
    e_i = max(e_(i-1), R_i) + c_i (e_(-1) = 0, R >= 0) is e_i = C_i + max_(j<=i)(R_j - C_(j-1))
    with C the running sum of costs: one cumulative maximum. Ready times start at 0 (a lower
    bound) and only grow, so the first state where no rank changes is the longest-path solution.

    A rank is re-run only from its first action whose input changed: when rank q's times change
    from its k-th action on, each consumer of q looks up (binary search over the positions it
    reads from q, with a suffix minimum of its own indices) the first of its actions that reads
    one of them. Slow links make corrections travel as a front through the lists, so most
    re-runs touch a suffix."""
    n_all = offs[p]
    ready = np.zeros(n_all + 2)
    owner = np.repeat(np.arange(p), np.diff(offs))
    segs = []
    # reads[q]: (consumer r, positions in q that r reads, ascending; first index of r reading
    # at or after each of them). r itself too: stages on one rank (V shape) feed each other.
    reads: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in range(p)]
    for r in range(p):
        a, b = offs[r], offs[r + 1]
        d = dep_pos[a:b]
        c = cost[a:b]
        C = np.cumsum(c)
        segs.append((a, b, d, C, C - c, delay[a:b]))
        idx = np.flatnonzero(d < n_all)
        own = owner[d[idx]]
        for q in np.flatnonzero(np.bincount(own, minlength=p)).tolist():
            sel = own == q
            pos, i_q = d[idx[sel]], idx[sel]
            if len(pos) > 1 and not bool((pos[1:] >= pos[:-1]).all()):
                o = np.argsort(pos, kind="stable")
                pos, i_q = pos[o], np.minimum.accumulate(i_q[o][::-1])[::-1]
            reads[q].append((r, pos, i_q))  # ascending in both: i_q is its own suffix minimum
    INF = n_all + 1
    lo = [0 if offs[r + 1] > offs[r] else INF for r in range(p)]  # first index to re-run
    fwd, bwd = list(range(p)), list(range(p - 1, -1, -1))
    for sweep in range(MAX_SWEEPS):
        if min(lo) == INF:
            return ready
        for r in (fwd if sweep % 2 == 0 else bwd):
            i0 = lo[r]
            if i0 == INF:
                continue
            lo[r] = INF
            a, b, d, C, Cp, dl = segs[r]
            x = ready[d[i0:]]
            x -= Cp[i0:]
            if i0:  # the action before i0 ends at ready - delay; it bounds the rest from below
                prev = ready[a + i0 - 1] - dl[i0 - 1] - Cp[i0]
                if prev > x[0]:
                    x[0] = prev
            new = np.maximum.accumulate(x)
            new += C[i0:]
            new += dl[i0:]
            old = ready[a + i0:b]
            ne = new != old
            k = int(ne.argmax())
            if not ne[k]:
                continue
            old[k:] = new[k:]
            changed = a + i0 + k
            for c, pos, first in reads[r]:
                j = int(np.searchsorted(pos, changed))
                if j < len(pos):
                    f = int(first[j])
                    if f < lo[c]:
                        lo[c] = f
    return ready if min(lo) == INF else None


def _event_loop(s: Schedule, offs: list[int], dep_pos_np: np.ndarray, cost_f: np.ndarray,
                delay_np: np.ndarray | None) -> np.ndarray:
    """Ready times by flat position, rank by rank and action by action (see ``simulate``).
    Raises ScheduleDeadlock when ranks wait on each other."""
    p = s.num_ranks
    orders = s.orders
    lens = [offs[r + 1] - offs[r] for r in range(p)]
    n_all = offs[p]
    dep_pos = dep_pos_np.tolist()
    cost = cost_f.tolist()
    delay = delay_np.tolist() if delay_np is not None else None
    owner = np.repeat(np.arange(p), lens).tolist() + [-1, -1]
    # ready[i]: when the action at flat position i is usable by its consumer (its end plus the
    # message); -1 while it has not run.
    ready = [-1.0] * n_all + [0.0, -1.0]
    # Per rank, an iterator over (position, position waited for, cost[, delay]) and the item it
    # stopped at (None: none pending).
    if delay is None:
        its = [zip(range(offs[r], offs[r + 1]), dep_pos[offs[r]:offs[r + 1]],
                   cost[offs[r]:offs[r + 1]]) for r in range(p)]
    else:
        its = [zip(range(offs[r], offs[r + 1]), dep_pos[offs[r]:offs[r + 1]],
                   cost[offs[r]:offs[r + 1]], delay[offs[r]:offs[r + 1]]) for r in range(p)]
    pending: list[tuple | None] = [None] * p
    done = [False] * p
    free = [0.0] * p
    waits: list[list[tuple[int, int]]] = [[] for _ in range(p)]
    work = [r for r in range(p - 1, -1, -1) if lens[r]]
    for r in range(p):
        done[r] = not lens[r]
    while work:
        r = work.pop()
        t = free[r]
        hold = pending[r]
        if hold is not None:  # the action it stopped at: its input is there now
            e = ready[hold[1]]
            if e > t:
                t = e
            t += hold[2]
            ready[hold[0]] = t if delay is None else t + hold[3]
            pending[r] = None
        i = -1
        if delay is None:
            for i, d, c in its[r]:
                e = ready[d]
                if e < 0.0:
                    pending[r] = (i, d, c)
                    break
                if e > t:
                    t = e
                t += c
                ready[i] = t
            else:
                done[r] = True
        else:
            for i, d, c, dl in its[r]:
                e = ready[d]
                if e < 0.0:
                    pending[r] = (i, d, c, dl)
                    break
                if e > t:
                    t = e
                t += c
                ready[i] = t + dl
            else:
                done[r] = True
        free[r] = t
        hold = pending[r]
        if hold is not None:
            d = hold[1]
            q = owner[d]
            if q >= 0:
                waits[q].append((d, r))
            i = hold[0]
        else:
            i = offs[r + 1]
        wl = waits[r]
        if wl:
            keep = []
            for d, w in wl:
                if d < i:
                    work.append(w)
                else:
                    keep.append((d, w))
            waits[r] = keep
    ptr = [pending[r][0] if pending[r] is not None else offs[r + 1] for r in range(p)]
    stuck = {r: s.decode(orders[r][ptr[r] - offs[r]]) for r in range(p) if ptr[r] < offs[r + 1]}
    if stuck:
        raise ScheduleDeadlock(f"schedule {s.name} deadlocks; ranks wait at {stuck}")
    return np.asarray(ready)


def _outcome(s: Schedule, offs: list[int], flat: np.ndarray, ready: np.ndarray,
             cost_a: np.ndarray, delay_a: np.ndarray, delta_a: np.ndarray,
             cost_f: np.ndarray) -> SimOutcome:
    p, n_all = s.num_ranks, offs[s.num_ranks]
    ready_code = np.full(len(cost_a), -1.0)
    ready_code[flat] = ready[:n_all]
    end_np = ready_code - delay_a
    start_np = end_np - cost_a
    end_f = end_np[flat]
    start_f = start_np[flat]
    live = np.cumsum(delta_a[flat])
    busy, first, last, peak = [], [], [], []
    for r in range(p):
        a, b = offs[r], offs[r + 1]
        if a == b:
            busy.append(0.0); first.append(0.0); last.append(0.0); peak.append(0)
            continue
        busy.append(float(cost_f[a:b].sum()))
        first.append(float(start_f[a]))
        last.append(float(end_f[b - 1]))
        base = int(live[a - 1]) if a else 0
        peak.append(int(live[a:b].max()) - base)
    return SimOutcome(max(last) if last else 0.0, busy, first, last, peak, start_np, end_np)


def peak_in_flight(s: Schedule) -> list[int]:
    """Per rank, the most (virtual stage, micro-batch) activations live at once. Depends on the
    order only, not on the costs: a rank runs its actions one after another."""
    S, m = s.num_stages, s.microbatches
    Sm = S * m
    out = []
    for seq in s.orders:
        c = best = 0
        for a in seq:
            if a < Sm:
                c += 1
                if c > best:
                    best = c
            elif a < 2 * Sm:
                if s.full_backward[a - Sm]:
                    c -= 1
            else:
                c -= 1
        out.append(best)
    return out
