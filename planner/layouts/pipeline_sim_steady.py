"""A pipeline schedule's action times from its repeated rounds: cost independent of micro-batches.

In a schedule's steady state every rank repeats one round of actions: rank r's action
``P_r`` places later is the same kind on the same stage, ``Q`` micro-batches on (1F1B: one F
and one B a round, Q = 1; interleaved 1F1B: a round of p micro-batches through all of a rank's
stages, Q = p). The times there obey the same equations round after round (same costs, same
waits, shifted), and max-plus equations like these become periodic after a transient: from
some round k on, the times of round t equal those of round t - c plus a constant (c rounds of
the critical cycle; Cohen et al. 1985, the cyclicity theorem of max-plus linear systems).

``repeat`` uses that, exactly:
1. it times the warm-up action by action (``pipeline_sim_loop``), a growing number of rounds,
   in integer units (``pipeline_sim_chains.time_unit``: sums exact, so a repeat is an equality,
   not a tolerance), until the last ``L + 1`` rounds (L: how many rounds back a round's actions
   read) equal those c rounds before, plus one constant;
2. it writes every later steady round as that repeat (one array expression a rank);
3. it times the drain action by action from there;
4. it checks every action's equation at once, ``end = max(end of the rank's action before,
   input's end + message) + cost``: a schedule's dependency graph is acyclic, so times meeting
   every equation are its only solution, the longest path. Where any does not hold (a repeat
   that would have broken later), or no repeat shows within a quarter of the schedule, it gives
   way (None) to the other ways of ``pipeline_sim.simulate``.
The work is the warm-up's and the drain's actions in Python plus a few array passes, whatever
the number of micro-batches (``benchmarks/pipeline_speed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.layouts.pipeline_sim_chains import in_units, seconds_of, time_unit
from planner.layouts.pipeline_sim_loop import event_loop, new_ready, owners
from planner.machine.deadline import check

__all__ = ["Rounds", "repeat", "rounds_of", "with_reach"]

# rounds a schedule's steady state must hold for ``repeat`` to apply, and the share of the
# schedule it times action by action (the warm-up rounds) before giving way: the setups' and
# most drawn costs' times repeat within a few rounds; some take a share of the schedule that
# grows with it (a quarter of ZB-V's 8,065 rounds on 64 ranks with stage costs far apart and
# free messages), and a share of 1/8 bounds what is spent before giving way to a scan (with
# 32 rounds or more, the fewest rounds a repeat can show in, L + 8, are about a quarter)
MIN_ROUNDS, WARMUP_SHARE = 32, 8


@dataclass(frozen=True)
class Rounds:
    q: int  # micro-batches a round moves on
    size: list[int]  # P_r: rank r's actions a round
    first: list[int]  # flat position of rank r's first steady action
    count: int  # K: steady rounds every rank holds
    back: int  # L: rounds back a steady action reads (1 at least: the rank's action before)
    ahead: int  # U: rounds ahead a steady action reads (another rank's numbering)


def _lag(o: np.ndarray, q: int, guess: int) -> int | None:
    """The places ``P`` near ``guess`` after which ``o``'s codes move on by q, mid-list (over
    two rounds), or None."""
    mid = len(o) // 2
    for P in dict.fromkeys(max(1, guess + d) for d in (0, 1, -1, 2, -2)):
        w = min(2 * P, len(o) - mid - P)
        if w > 0 and bool((o[mid + P:mid + P + w] - o[mid:mid + w] == q).all()):
            return P
    return None


def rounds_of(flat: np.ndarray, offs: list[int], m: int) -> Rounds | None:
    """The steady state of a schedule's per-rank orders (``flat``: action codes rank after
    rank; a code moves on by q when its micro-batch does), or None where the orders hold no
    single repeated round of MIN_ROUNDS rounds or more (GPipe: all forwards, then all
    backwards). A rank's round is about its share of the actions a micro-batch (DualPipe-V's
    ranks run some backwards whole, some split, in the warm-up and drain: 260-263 actions for
    64 micro-batches, a round of 4 in between)."""
    p = len(offs) - 1
    A = np.diff(np.asarray(offs))
    if p == 0 or A.min() <= 0:
        return None
    r0 = int(A.argmax())
    o0 = flat[offs[r0]:offs[r0 + 1]]
    q = 0
    for cand in range(1, m // MIN_ROUNDS + 1):  # the smallest q whose round repeats mid-rank
        guess = round(int(A[r0]) * cand / m)
        if guess > len(o0) // MIN_ROUNDS:  # (rounds only grow with q)
            return None
        if _lag(o0, cand, guess) is not None:
            q = cand
            break
    if not q:
        return None
    size, first, count = [], [], []
    for r in range(p):
        a, b = offs[r], offs[r + 1]
        o = flat[a:b]
        P = _lag(o, q, round(int(A[r]) * q / m))
        if P is None or 2 * P >= b - a:
            return None
        same = o[P:] - o[:-P] == q  # position j's next round is j + P
        mid = len(same) // 2
        if not same[mid]:
            return None
        bad = np.flatnonzero(~same)
        i = int(np.searchsorted(bad, mid))
        lo = int(bad[i - 1]) + 1 if i else 0
        hi = int(bad[i]) if i < len(bad) else len(same)
        size.append(P)
        first.append(a + lo)
        count.append((hi + P - lo) // P)
    K = min(count)
    if K < MIN_ROUNDS:
        return None
    return Rounds(q, size, first, K, 1, 0)


def with_reach(rd: Rounds, offs: list[int], dep_pos: np.ndarray) -> Rounds | None:
    """``rd`` with how far back and ahead its rounds read (from two rounds mid-schedule), or
    None where one reads outside the steady state there."""
    n_all = offs[-1]
    k = rd.count // 2
    lags = []
    starts, firsts, sizes = (np.asarray(x) for x in (offs[:-1], rd.first, rd.size))
    for P, f in zip(rd.size, rd.first):
        seg = dep_pos[f + k * P:f + (k + 2) * P].astype(np.int64)
        has = seg < n_all  # (n_all: waits on none)
        d = seg[has]
        q = np.searchsorted(starts, d, side="right") - 1
        kd = (d - firsts[q]) // sizes[q]
        if len(kd) and (kd.min() < 0 or kd.max() >= rd.count):
            return None
        lags.append(k + np.flatnonzero(has) // P - kd)
    lag = np.concatenate(lags) if lags else np.zeros(0, np.int64)
    back = max(1, int(lag.max()) if len(lag) else 1)
    ahead = max(0, -int(lag.min()) if len(lag) else 0)
    return Rounds(rd.q, rd.size, rd.first, rd.count, back, ahead)


def repeat(rd: Rounds, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
           cross: np.ndarray, comm_s: float) -> np.ndarray | None:
    """Ready times (end + outgoing message) by flat position, as ``pipeline_sim``'s other ways
    give them (their arguments; ``rd``: ``rounds_of`` and ``with_reach``), or None where it
    gives way (see the module's docstring)."""
    p, n_all = len(offs) - 1, offs[-1]
    unit = time_unit(cost, n_all, comm_s)
    if unit is None:
        return None
    scale, dl = unit
    ready = new_ready(n_all, integer=True)
    R = np.frombuffer(ready, dtype=np.int64)
    own = owners(p, offs)  # (once for the calls below)
    P, base, K, L, U = rd.size, rd.first, rd.count, rd.back, rd.ahead
    end_fill = K - U - 1  # rounds written as a repeat: up to here (the drain's inputs apart)
    if any(b0 + end_fill * s0 > b1 for b0, s0, b1 in zip(base, P, offs[1:])):
        return None  # (rounds past a rank's actions: not a steady state of these orders)
    cap = min(end_fill - 1, max(L + 8, int(n_all // (WARMUP_SHARE * sum(P)))))
    limit = min(cap, 2 * L + 8)
    ptr = list(offs[:-1])
    sigs: list[bytes] = []
    firsts: list[int] = []
    seen: dict[bytes, int] = {}
    found = None
    while found is None:
        check()  # (a request's work limit)
        stop = [min(base[r] + (limit + 1) * P[r], offs[r + 1]) for r in range(p)]
        ptr = event_loop(p, offs, dep_pos, cost, cross, dl, ready, ptr, stop, scale, own)
        done = min((ptr[r] - base[r]) // P[r] for r in range(p))  # rounds timed on every rank
        for k in range(len(sigs), max(done, 0)):
            vec = np.concatenate([R[base[r] + k * P[r]:base[r] + (k + 1) * P[r]]
                                  for r in range(p)])
            f0 = int(vec[0])
            vec -= f0
            sig = vec.tobytes()
            sigs.append(sig)
            firsts.append(f0)
            j = seen.get(sig)
            seen[sig] = k
            if j is None:
                continue
            c, lam = k - j, f0 - firsts[j]
            if k - c - L >= 0 and all(sigs[t] == sigs[t - c] and firsts[t] - firsts[t - c] == lam
                                      for t in range(k - L, k)):
                found = (k, c, lam)
                break
        if found is None:
            if limit >= cap:
                return None
            limit = min(2 * limit, cap)
    k, c, lam = found
    n = end_fill - k - 1  # rounds k + 1 .. end_fill - 1
    for r in range(p):
        if n <= 0:
            break
        w = c * P[r]
        block = R[base[r] + (k + 1 - c) * P[r]:base[r] + (k + 1) * P[r]].copy()
        dst = base[r] + (k + 1) * P[r]
        full, rem = divmod(n, c)
        if full:
            out = R[dst:dst + full * w].reshape(full, w)
            np.add(block[None, :], lam * np.arange(1, full + 1, dtype=np.int64)[:, None], out=out)
        if rem:
            a = dst + full * w
            R[a:a + rem * P[r]] = block[:rem * P[r]] + lam * (full + 1)
    start = [base[r] + end_fill * P[r] if n > 0 else ptr[r] for r in range(p)]
    ptr = event_loop(p, offs, dep_pos, cost, cross, dl, ready, start, None, scale, own)
    if any(x < b for x, b in zip(ptr, offs[1:])):
        return None  # (a deadlock: the event loop names it)
    if not _holds(R, offs, dep_pos, cost, cross, dl, scale):
        return None
    return seconds_of(R, n_all, cross, 0, scale)  # (the ready times as they are: dl 0)


def _holds(R: np.ndarray, offs: list[int], dep_pos: np.ndarray, cost: np.ndarray,
           cross: np.ndarray, dl: int, scale: float, block: int = 1 << 16) -> bool:
    """Whether the ready times ``R`` (in units) meet every action's equation,
    ``R_j - x_j dl = max(R_(j-1) - x_(j-1) dl, R_(dep_j)) + c_j`` (x: the flag of a message to
    the consumer; a rank's first action has no action before), a block of positions at a time
    (no array of the schedule's size)."""
    n_all = offs[-1]
    heads = np.asarray([a for a, b in zip(offs[:-1], offs[1:]) if b > a], dtype=np.int64)
    for a in range(0, n_all, block):
        b = min(a + block, n_all)
        x = cross[a:b].astype(np.int64) * dl
        end = R[a:b] - x
        prev = np.empty(b - a, dtype=np.int64)
        prev[1:] = end[:-1]
        prev[0] = R[a - 1] - (dl if a and cross[a - 1] else 0) if a else 0
        h = heads[(heads >= a) & (heads < b)] - a
        prev[h] = 0
        np.maximum(prev, R[dep_pos[a:b]], out=prev)
        prev += in_units(cost[a:b], scale)
        if not np.array_equal(prev, end):
            return False
    return True
