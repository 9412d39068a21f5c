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

import functools
from array import array
from dataclasses import dataclass

import numpy as np

from planner.layouts.pipeline_orders import Schedule
from planner.layouts.pipeline_sim_chains import Readers, consumers_of, settle
from planner.layouts.pipeline_sim_loop import event_loop, new_ready
from planner.layouts.pipeline_sim_levels import levels_of, sweep
from planner.layouts.pipeline_sim_steady import repeat, rounds_of, with_reach
from planner.machine.deadline import check


class ScheduleDeadlock(RuntimeError):
    """The action lists wait on each other (an invalid hand-written order)."""


@dataclass(frozen=True)
class SimOutcome:
    makespan_s: float
    busy_s: list[float]
    first_start_s: list[float]
    last_end_s: list[float]
    peak_in_flight: list[int]
    flat_codes: np.ndarray  # every rank's actions, rank after rank
    start_flat: np.ndarray  # start and end times in that layout
    end_flat: np.ndarray
    n_codes: int  # size of the action-code space

    @property
    def bubble_fraction(self) -> float:
        total = len(self.busy_s) * self.makespan_s
        return 0.0 if total <= 0 else max(0.0, (total - sum(self.busy_s)) / total)

    def _by_code(self, x: np.ndarray) -> np.ndarray:
        out = np.full(self.n_codes, np.nan)
        out[self.flat_codes] = x
        out.flags.writeable = False  # kept: read by every caller alike
        return out

    @functools.cached_property
    def start_s(self) -> np.ndarray:
        """Start time by action code (NaN for codes no rank runs); built once."""
        return self._by_code(self.start_flat)

    @functools.cached_property
    def end_s(self) -> np.ndarray:
        return self._by_code(self.end_flat)


def _flat_arrays(s: Schedule, forward_s, input_s, weight_s, comm_s: float):
    """Every rank's actions laid out rank after rank, and per action: its code, cost, the flat
    position of the cross-stage action it waits for (n_all: none; n_all + 1: an action no rank
    runs), whether a message carries its end to that consumer (the delay: ``comm_s`` then), and
    its in-flight delta. Waits on the
    same stage (B after F at a pipeline's end, W after I) are kept by the rank's own order."""
    S, m = s.num_stages, s.microbatches
    Sm = S * m
    p = s.num_ranks
    offs = [0] * (p + 1)
    for r, o in enumerate(s.orders):
        offs[r + 1] = offs[r] + len(o)
    n_all = offs[p]
    flat = np.concatenate([np.frombuffer(o, dtype=np.int64) if isinstance(o, array)
                           else np.asarray(o, dtype=np.int64) for o in s.orders]) \
        if n_all else np.zeros(0, dtype=np.int64)
    # code = (slot * S + stage) * m + mb: per-(slot, stage) tables, gathered once (their index
    # as int32, and no micro-batch array: a schedule of millions of actions stays small)
    ss = (flat // m).astype(np.int32)
    f = np.asarray(forward_s, dtype=float)
    i = np.asarray(input_s, dtype=float)
    w = np.asarray(weight_s, dtype=float)
    cost = np.concatenate([f, i, w])[ss]
    # B = I + W where the backward is not split (Qi et al. 2023, §2: T_B = T_I + T_W)
    full_code = np.zeros(3 * Sm, dtype=bool)
    full_code[Sm:2 * Sm] = np.frombuffer(bytes(s.full_backward), dtype=np.uint8)
    full = full_code[flat]
    if full.any():
        cost[full] += np.concatenate([w, w, w])[ss[full]]
    rank = np.asarray(s.stage_to_rank)
    prev, nxt = np.asarray(s.prev_stage), np.asarray(s.next_stage)
    # the action waited for: F(prev stage) for F, I/B(next stage) for I/B, none for W; its code
    # is the action's own plus a shift per (slot, stage) (the micro-batch is the same)
    base = np.concatenate([np.where(prev >= 0, prev * m, -1),
                           np.where(nxt >= 0, (S + nxt) * m, -1), np.full(S, -1)])
    shift = np.where(base >= 0, base - np.arange(3 * S) * m, 0).astype(np.int32)
    has_dep = (base >= 0)[ss]
    # positions as int32 (3 * Sm < 2**31 within the documented limits): half the bytes
    pos_of = np.full(3 * Sm, n_all + 1, dtype=np.int32)  # codes no rank runs: never ready
    pos_of[flat] = np.arange(n_all, dtype=np.int32)
    dep = shift[ss]
    np.add(dep, flat, out=dep, casting="same_kind")  # (actions without one: their own code)
    dep_pos = pos_of[dep]
    del pos_of, dep
    dep_pos[~has_dep] = n_all
    # whether its end reaches its consumer through a message (the delay: that times comm_s;
    # a flag a byte, not a float: schedules of millions of actions)
    if comm_s > 0:
        f_cross = (nxt >= 0) & (rank[np.maximum(nxt, 0)] != rank)  # F(s) feeds F(next) elsewhere
        b_cross = (prev >= 0) & (rank[np.maximum(prev, 0)] != rank)  # I(s) feeds I(prev) elsewhere
        cross = np.concatenate([f_cross, b_cross, np.zeros(S, bool)])[ss]
    else:
        cross = np.zeros(n_all, bool)
    # in flight: +1 at F, -1 at the last backward action of (stage, mb): B, or W when split
    delta = np.concatenate([np.ones(S, np.int8), np.zeros(S, np.int8),
                            np.full(S, -1, np.int8)])[ss]
    delta[full] = -1
    return offs, flat, dep_pos, cost, cross, delta, 3 * Sm


def simulate(s: Schedule, forward_s, input_s, weight_s, comm_s: float = 0.0) -> SimOutcome:
    """Times every action of ``s``; costs are per virtual stage (length ``s.num_stages``).

    An action ends at ``max(end of the rank's previous action, ready time of the action it waits
    for) + cost``: the longest path through the dependency graph. Five ways to compute it,
    with the same result (up to rounding):
    - ``pipeline_sim_steady.repeat`` (first, from ``STEADY_FROM`` actions, where the orders
      repeat one round of actions a rank): the warm-up and the drain action by action in
      integer units, the steady rounds between written as the repeat their times fall into,
      every action's equation then checked at once; it gives way where no repeat shows early
      or a check fails.
    - ``pipeline_sim_levels`` (from ``LEVELS_FROM`` ranks, where the relaxation gives way:
      instead of the stage chains): every action's level (its place on the longest chain of
      waits, the times with unit costs) found, then one pass over the levels, each level's
      actions at once: the event loop's times to the bit.
    - ``_relax_by_rank`` (first otherwise): every rank's times come from one vectorised max-plus scan
      over its list given its inputs' ready times, starting from lower bounds (0) and re-run,
      sweeping the ranks forwards and backwards, until nothing changes. Each sweep carries a
      critical path across all ranks in one direction, so pipelines settle in a few sweeps (see
      ``benchmarks/pipeline_speed.py``). It needs every cost > 0: then a deadlock (a cycle)
      never settles and is caught by the sweep limit.
    - ``pipeline_sim_chains.settle``: where the relaxation has re-run ``RELAX_WORK`` actions per
      action without settling (a longest path that wraps round the ranks many times; instead
      of it where a rank holds ``CHAINS_FIRST`` stages or more and ranks wait: unequal stages
      or messages; where the stage chains give way, so would it; not after the repeated
      rounds gave way, where they give way too), the rank scans alternate with
      scans along every micro-batch's stage chains at once, in integer time units, and settle in
      a few alternations.
    - ``_event_loop``: ranks run action by action in pure Python, a rank parked when its next
      action waits on one not yet timed. Used when neither settles, and it is what reports a
      deadlock.
    """
    offs, flat, dep_pos, cost, cross, delta, n_codes = _flat_arrays(
        s, forward_s, input_s, weight_s, comm_s)
    p, n_all = s.num_ranks, offs[s.num_ranks]
    ready = None
    if n_all and not bool((dep_pos > n_all).any()) and float(cost.min()) > 0.0:
        readers = consumers_of(s)
        ways = [lambda: _relax_by_rank(p, offs, dep_pos, cost, cross, readers, comm_s),
                lambda: settle(s, offs, flat, dep_pos, cost, cross, comm_s, readers)]
        # paths wrap round the ranks v - 1 times; ranks wait there but where stages are alike
        if s.virtual_stages >= CHAINS_FIRST and (comm_s > 0 or any(  # and messages free
                len(set(x)) > 1 for x in (forward_s, input_s, weight_s))):
            ways = ways[1:]
        rd = rounds_of(flat, offs, s.microbatches) if n_all >= STEADY_FROM else None
        rd = rd and with_reach(rd, offs, dep_pos)
        if n_all >= LEVELS_ACTIONS and p >= LEVELS_FROM:  # deep: wide levels
            # (the relaxation, or the stage chains where they go first; then the levels)
            ways = [ways[0], lambda: by_levels(p, offs, dep_pos, cost, cross, comm_s, readers,
                                               levels=s.levels)]
            if s.levels is not None or n_all >= WIDE * max(np.diff(offs).tolist()):
                ways = ways[1:]  # (levels at least a rank's actions: wide enough to go first)
        if rd:  # a long steady state: its rounds repeat, whatever the number of micro-batches
            if len(ways) == 2 and p < LEVELS_FROM:
                # where no repeat shows early (times that drift round after round: stage
                # costs far apart), the stage chains after the relaxation have given way too
                # (benchmarks/worst_case.py's far-apart candidates): the event loop, not them
                ways = ways[:1]
            ways.insert(0, lambda: repeat(rd, offs, dep_pos, cost, cross, comm_s))
        for way in ways:
            ready = way()
            if ready is not None:
                break
    if ready is None:
        ready = _event_loop(s, offs, dep_pos, cost, cross, comm_s)
    del dep_pos
    end = ready[:n_all]  # (in place: the ready times are not read again)
    if comm_s > 0:
        end[cross] -= comm_s
    del cross
    start = end - cost
    if not n_all:
        z = [0.0] * p
        return SimOutcome(0.0, z, z, z, [0] * p, flat, start, end, n_codes)
    heads = np.asarray(offs[:-1])
    nonempty = np.diff(offs) > 0
    h = np.minimum(heads, n_all - 1)
    tails = np.maximum(np.asarray(offs[1:]) - 1, 0)
    busy = np.where(nonempty, np.add.reduceat(cost, h), 0.0)
    first = np.where(nonempty, start[h], 0.0)
    last = np.where(nonempty, end[tails], 0.0)
    live = np.cumsum(delta, dtype=np.int32)  # (|in flight| <= the actions < 2**31)
    base = np.concatenate([[0], live])[heads]
    peak = np.where(nonempty, np.maximum.reduceat(live, h) - base, 0)
    return SimOutcome(float(last.max()), busy.tolist(), first.tolist(), last.tolist(),
                      [int(x) for x in peak], flat, start, end, n_codes)


# The relaxation gives way (to ``pipeline_sim_chains.settle``) after MAX_SWEEPS sweeps or
# RELAX_WORK actions re-run per action of the schedule (RELAX_FLOOR at least: a small schedule's
# sweeps cost little): at the limits, a setup's schedules settle re-running 2-16 each (GPipe,
# 1F1B 2-4; the V shapes 8-16, as cheap in the stage chains); those whose longest path wraps
# round the ranks again and again need hundreds of sweeps, 30-60 re-runs each. From CHAINS_FIRST
# stages a rank the stage chains go first: as fast or faster at the limits from 4 on, three to
# four times from 8 on (benchmarks/pipeline_speed.py).
MAX_SWEEPS, RELAX_WORK, RELAX_FLOOR, CHAINS_FIRST = 96, 8, 1 << 22, 4
# From STEADY_FROM actions on, a schedule with a long steady state is first timed from its
# repeated rounds (``pipeline_sim_steady.repeat``): its warm-up and drain action by action, the
# rest a repeat; below, the scans are as fast or faster (benchmarks/pipeline_speed.py's first
# table: ZB-V on 64 ranks at m 512, 197k actions, 13 ms by the relaxation, 24 ms by the rounds).
# From LEVELS_FROM ranks and LEVELS_ACTIONS actions on, the relaxation gives way to the levels
# (``pipeline_sim_levels``), not to the stage chains: a bounded cost, 0.15-0.45 s at the
# limits, where the scans take 0.25-0.5 s to give way (stage costs far apart, a link slower than
# a stage: benchmarks/worst_case.py); the levels go first where they hold WIDE actions each or
# more on average (a pass over narrow levels costs more than the relaxation where it settles:
# GPipe on 64 ranks).
STEADY_FROM, LEVELS_FROM, LEVELS_ACTIONS, WIDE = 1 << 18, 64, 1 << 15, 256


def by_levels(p, offs, dep_pos, cost, cross, comm_s, readers, relax=None, levels=None
              ) -> np.ndarray | None:
    """``pipeline_sim_levels``' ready times, or None where the unit-cost levels do not settle
    (``relax``: the per-rank relaxation that finds them, ``_relax_by_rank``; ``levels``: the
    schedule's own, where its builder gives them)."""
    lv = levels or levels_of(relax or _relax_by_rank, p, offs, dep_pos, readers)
    return None if lv is None else sweep(offs, dep_pos, cost, cross, comm_s, *lv)


def _relax_by_rank(p: int, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
                   cross: np.ndarray, consumers: list[list[int]] | None = None,
                   comm_s: float = 1.0) -> np.ndarray | None:
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
    segs = []
    for r in range(p):
        a, b = offs[r], offs[r + 1]
        c = cost[a:b]
        C = np.cumsum(c)
        segs.append((a, b, dep_pos[a:b], C, c, cross[a:b]))
    # consumers[q]: ranks reading some action of q (q itself too: stages on one rank, V shape);
    # a superset is fine (a lookup then finds nothing)
    if consumers is None:
        owner = np.repeat(np.arange(p), np.diff(offs))
        reads_from = np.zeros((p, p), dtype=bool)
        has = dep_pos < n_all
        reads_from[owner[dep_pos[has]], owner[has]] = True
        consumers = [np.flatnonzero(row).tolist() for row in reads_from]
    INF = n_all + 1
    first_reader = Readers(offs, dep_pos, INF).first
    lo = [0 if offs[r + 1] > offs[r] else INF for r in range(p)]  # first index to re-run
    fwd, bwd = list(range(p)), list(range(p - 1, -1, -1))
    budget = max(RELAX_WORK * n_all, RELAX_FLOOR)  # actions re-run, all sweeps together
    for sweep in range(MAX_SWEEPS):
        if min(lo) == INF:
            return ready
        check()  # (a request's work limit)
        for r in (fwd if sweep % 2 == 0 else bwd):
            i0 = lo[r]
            if i0 == INF:
                continue
            lo[r] = INF
            a, b, d, C, c, dl = segs[r]
            budget -= b - a - i0
            if budget < 0:
                return None
            Cp = C[i0:] - c[i0:]  # (the costs before each action: made when run, not kept)
            x = ready[d[i0:]]
            x -= Cp
            if i0:  # the action before i0 ends at ready - delay; it bounds the rest from below
                prev = ready[a + i0 - 1] - dl[i0 - 1] * comm_s - Cp[0]
                if prev > x[0]:
                    x[0] = prev
            new = np.maximum.accumulate(x)
            new += C[i0:]
            if comm_s:
                new += dl[i0:] * comm_s
            old = ready[a + i0:b]
            ne = new != old
            k = int(ne.argmax())
            if not ne[k]:
                continue
            old[k:] = new[k:]
            changed = a + i0 + k
            for c in consumers[r]:
                if lo[c]:  # (0: c re-runs from its start anyway)
                    f = first_reader(r, c, changed)
                    if f < lo[c]:
                        lo[c] = f
    return ready if min(lo) == INF else None


def _event_loop(s: Schedule, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
                cross: np.ndarray, comm_s: float) -> np.ndarray:
    """Ready times by flat position, rank by rank and action by action
    (``pipeline_sim_loop``). Raises ScheduleDeadlock when ranks wait on each other."""
    p = s.num_ranks
    ready = new_ready(offs[p], integer=False)
    ptr = event_loop(p, offs, dep_pos, cost, cross, comm_s, ready)
    stuck = {r: s.decode(s.orders[r][ptr[r] - offs[r]]) for r in range(p)
             if ptr[r] < offs[r + 1]}
    if stuck:
        raise ScheduleDeadlock(f"schedule {s.name} deadlocks; ranks wait at {stuck}")
    return np.frombuffer(ready, dtype=np.float64)


def peak_in_flight(s: Schedule, ranks: list[int] | None = None) -> list[int]:
    """Per rank (of ``ranks``, default all), the most (virtual stage, micro-batch) activations
    live at once. Depends on the order only, not on the costs: a rank runs its actions one
    after another."""
    S, m = s.num_stages, s.microbatches
    Sm = S * m
    out = []
    for seq in (s.orders if ranks is None else [s.orders[r] for r in ranks]):
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
