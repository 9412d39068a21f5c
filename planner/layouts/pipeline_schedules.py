"""Pipeline schedules as per-rank action lists.

A schedule is, for every rank, the order in which it runs forward (F), backward (B) or — when the
backward is split as in Qi et al. 2023 ("Zero Bubble Pipeline Parallelism", §2) — backward for
inputs (I) and backward for weights (W), each on one (virtual stage, micro-batch).

The orders of the schedules PyTorch ships (``torch.distributed.pipelining.schedules``) are
reproduced action for action; ``tests/test_pipeline_schedules.py`` compares them with torch's own
``pipeline_order``. Compute only: sends and receives are implied by the stage-to-rank mapping
(F of stage s needs F of stage s-1; I/B of stage s needs I/B of stage s+1) and the simulator
charges them as point-to-point messages.

Actions are int codes on the ``Schedule`` record of ``planner.layouts.pipeline_orders``, which
also holds the looped and V-shaped stage placements. The schedules whose ranks hold two stages of
a V or of two opposite pipelines (ZB-V, DualPipeV, DualPipe) are built in
``planner.layouts.pipeline_vshaped``; the others here, with every schedule's constraints and the
entry point (``build_schedule``, memoised by ``schedule_of``).
"""

from __future__ import annotations

import threading

import numpy as np

from planner.layouts.pipeline_orders import Schedule, _loop_mapping, _make
from planner.layouts.pipeline_vshaped import _dualpipe, _dualpipe_v, _zb_v
from planner.layouts.pipeline_zb_h2 import orders as zb_h2_orders


class ScheduleConstraintError(ValueError):
    """A schedule's precondition does not hold; ``field`` names the request field at fault."""

    def __init__(self, rule: str, field: str) -> None:
        super().__init__(rule)
        self.rule, self.field = rule, field


# ---- single stage per rank -------------------------------------------------------------------
def _gpipe(p: int, m: int) -> Schedule:
    # All forwards, then all backwards (Huang et al. 2019, "GPipe", Fig. 2c; torch ScheduleGPipe).
    j = np.arange(m, dtype=np.int64)
    orders = [np.concatenate((r * m + j, (p + r) * m + j)) for r in range(p)]
    return _make("gpipe", p, 1, m, list(range(p)), orders, split=False)


def _one_f_one_b(p: int, m: int) -> Schedule:
    # Rank r runs p-1-r warm-up forwards, then alternates F and B, then drains the backwards
    # (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters",
    # §2.2, Fig. 4 top; PipeDream-Flush). The order torch's Schedule1F1B runs in _step_microbatches.
    S = p
    orders = []
    j = np.arange(m, dtype=np.int64)
    for r in range(p):
        fb, bb = r * m, (S + r) * m
        warm = min(p - 1 - r, m)
        steady = np.empty(2 * (m - warm), dtype=np.int64)  # F and B alternating
        steady[0::2] = fb + warm + j[:m - warm]
        steady[1::2] = bb + j[:m - warm]
        orders.append(np.concatenate((fb + j[:warm], steady, bb + m - warm + j[:warm])))
    return _make("1f1b", p, 1, m, list(range(p)), orders, split=False)


# ---- interleaved (looped) schedules, ported from torch's _get_1f1b_rank_ops --------------------
def _interleaved_rank(r: int, p: int, v: int, m: int, zero_bubble: bool) -> np.ndarray:
    S = p * v
    rounds = max(1, m // p)
    per_round = m // rounds
    # Warm-up forwards: (v-1) rounds plus 2 (or 1 with zero bubble) per hop from the last rank
    # (Narayanan et al. 2021, §2.2; torch _get_warmup_ops).
    warm = min((v - 1) * per_round + (1 if zero_bubble else 2) * (p - 1 - r), m * v)
    total_mb = v * m
    Sm = S * m
    # Forwards visit the rank's chunks round by round (k = 0, 1, ..., v-1, 0, ...); backwards the
    # other way round (k = v-1, ..., 0, ...). The n-th action on chunk k is micro-batch
    # (n // (per_round·v))·per_round + n % per_round of that chunk.
    n = np.arange(total_mb)
    blk = n // per_round
    mb = (n // (per_round * v)) * per_round + n % per_round
    fwd = ((blk % v) * p + r) * m + mb
    bwd = Sm + ((v - 1 - blk % v) * p + r) * m + mb
    steady = total_mb - warm  # F then B per step; cool-down: B alone
    parts = [fwd[:warm]]
    if not zero_bubble:
        parts += [np.stack([fwd[warm:], bwd[:steady]], 1).ravel(), bwd[steady:]]
        return np.concatenate(parts)
    # Zero bubble: from backward number r on, each B is followed by the oldest pending W
    # (the W's run in the B's order); the rest drain at the end.
    wgt = bwd + Sm
    a = min(r, steady)
    parts.append(np.stack([fwd[warm:warm + a], bwd[:a]], 1).ravel())
    parts.append(np.stack([fwd[warm + a:], bwd[a:steady], wgt[:steady - a]], 1).ravel())
    c = min(max(r, steady), total_mb)
    parts.append(bwd[steady:c])
    parts.append(np.stack([bwd[c:], wgt[c - r:total_mb - r]], 1).ravel())
    parts.append(wgt[max(0, total_mb - r):])
    return np.concatenate(parts)


def _interleaved(name: str, p: int, v: int, m: int, zero_bubble: bool) -> Schedule:
    orders = [_interleaved_rank(r, p, v, m, zero_bubble) for r in range(p)]
    return _make(name, p, v, m, _loop_mapping(p, v), orders, split=zero_bubble)


# ---- ZB-H2 ----------------------------------------------------------------------------------
WIDE_ZB_H2 = (256, 8)  # ranks from, micro-batches a rank up to: the step-at-once pass
def _zb_h2(p: int, m: int, fast_forward: bool = True) -> Schedule:
    """ZB-H2 (Qi et al. 2023, §3.2, Fig. 4 bottom): extra warm-up forwards fill the bubble before
    the first backward and W passes are moved to the tail, turning the trapezoid into a
    parallelogram. Built by a unit-cost list pass (T_F = T_I = T_W, the paper's handcrafted
    setting): each step a rank runs its next I if its input gradient has arrived, else its next
    F if fewer than 2p-1-r micro-batches are in flight (peak memory 2p-1 micro-batches on rank 0,
    within the paper's 2p·M_B), else its oldest pending W. With unit costs the makespan is the
    parallelogram's length, (p-1)·T_F + m(T_F+T_I+T_W) (tested); the first rank, though, ends at
    the makespan with p-1 idle units inside its span, so under a one-iteration bubble convention
    this order equals ZB-H1 at equal costs and differs when T_W < T_F.

    Fast forward: once the whole state (every rank's counters relative to rank 0's forwards, and
    the step distance to every F/I time a rank can still look up) repeats after 3 steps with each
    counter one higher, the pass is periodic until a rank nears micro-batch m; those periods are
    emitted at once (each rank's last 3 actions, micro-batch + k, times + 3k) and the pass goes
    on from there. The result equals the plain pass (``fast_forward=False``; tested).

    Deep pipelines (``WIDE_ZB_H2``: 256 ranks or more, at most 8 micro-batches a rank) take the
    same pass with every rank's step at once (``pipeline_zb_h2``; tested equal): there the fast
    forward has little to skip, and the rank-by-rank steps cost 2-3 s at 1,024 ranks.
    """
    if fast_forward and p >= WIDE_ZB_H2[0] and m <= WIDE_ZB_H2[1] * p:
        orders, levels = zb_h2_orders(p, m)
        return _make("zb-h2", p, 1, m, list(range(p)), orders, split=True, levels=levels)
    Sm = p * m
    f_t = [[-1] * m for _ in range(p)]  # step at which F(r, j) ran
    i_t = [[-1] * m for _ in range(p)]
    nf, ni, nw = [0] * p, [0] * p, [0] * p
    orders: list[list[int]] = [[] for _ in range(p)]
    caps = [2 * p - 1 - r for r in range(p)]
    last = p - 1
    probes: dict[int, tuple] = {}  # step -> (what to check there, rank-0 forwards, signature)
    done_ff = not fast_forward or p < 2

    def counters() -> tuple[int, tuple[int, ...]]:
        c = nf[0]
        return c, tuple(x - c for x in nf + ni + nw)

    def lookups(t: int) -> tuple:
        # per rank: step distance to the F and I times some rank can still look up
        out = []
        for r in range(p):
            lo_f = nf[r + 1] if r < last else ni[r]
            lo_i = min(ni[r - 1], nw[r]) if r > 0 else nw[r]
            fr, ir = f_t[r], i_t[r]
            out.append((tuple(t - fr[j] for j in range(min(lo_f, nf[r]), nf[r])),
                        tuple(t - ir[j] for j in range(min(lo_i, ni[r]), ni[r]))))
        return tuple(out)

    lo = 0  # every rank below lo has finished
    t = 0
    while lo < p:
        if not done_ff and t == 2 * p + 1 and not probes:
            probes[t] = ("start", 0, None)
        if t in probes:
            kind, c0, sig0 = probes.pop(t)
            c, cs = counters()
            if kind == "start":
                probes[t + 3] = ("counters", c, cs)
            elif kind == "counters" and c == c0 + 1 and cs == sig0:
                probes[t + 3] = ("state", c, (cs, lookups(t)))
            elif kind == "state" and c == c0 + 1 and (cs, lookups(t)) == sig0 \
                    and m - 2 - max(nf) > 0:
                K = m - 2 - max(nf)
                ks = np.arange(1, K + 1)
                for r in range(p):
                    tail = orders[r][-3:]
                    orders[r].extend((np.asarray(tail)[None, :] + ks[:, None]).ravel().tolist())
                    for code in tail:
                        slot, rest = divmod(code, Sm)
                        j = rest - r * m
                        row = f_t[r] if slot == 0 else i_t[r] if slot == 1 else None
                        if row is not None:
                            row[j + 1:j + K + 1] = range(row[j] + 3, row[j] + 3 * K + 1, 3)
                    nf[r] += K
                    ni[r] += K
                    nw[r] += K
                t += 3 * K
                done_ff = True
                continue
            else:
                probes[t + 29] = ("start", 0, None)
        # ranks are independent within one step (read times < t only); rank r starts at step r
        for r in range(lo, min(p, t + 1)):
            j = ni[r]
            if j < nf[r] and ((i_t[r + 1][j] if r < last else f_t[r][j]) + 1 <= t
                              and (r == last or i_t[r + 1][j] >= 0)):
                i_t[r][j] = t
                ni[r] += 1
                orders[r].append(Sm + r * m + j)
                continue
            j = nf[r]
            if j < m and nf[r] - nw[r] < caps[r] and (r == 0 or 0 <= f_t[r - 1][j] < t):
                f_t[r][j] = t
                nf[r] += 1
                orders[r].append(r * m + j)
                continue
            if nw[r] < ni[r] and i_t[r][nw[r]] < t:
                orders[r].append(2 * Sm + r * m + nw[r])
                nw[r] += 1
        while lo < p and nw[lo] == m:
            lo += 1
        t += 1
    return _make("zb-h2", p, 1, m, list(range(p)), orders, split=True)


# ---- constraints and entry point -------------------------------------------------------------
def check(name: str, p: int, m: int, v: int) -> None:
    """Raise ScheduleConstraintError naming the rule when (p, m, v) does not suit ``name``."""
    def need(ok: bool, rule: str, field: str) -> None:
        if not ok:
            raise ScheduleConstraintError(rule, field)

    if name in ("gpipe", "1f1b", "zb-h2"):
        need(v == 1, f"{name} runs one stage per rank: virtual_stages must be 1", "virtual_stages")
    if name in ("1f1b", "zb-h1", "zb-h2"):
        need(m >= p, f"{name} needs microbatches >= stages (m >= p), got m={m}, p={p}",
             "microbatches")
    if name == "interleaved-1f1b" or (name == "zb-h1" and v > 1):
        rounds = max(1, m // p)
        need(m % rounds == 0, f"{name} needs microbatches to be a multiple of "
             f"max(1, m // p) = {rounds} (torch's flexible interleaving), got m={m}",
             "microbatches")
    if name == "interleaved-1f1b":
        need(v >= 2, "interleaved-1f1b needs virtual_stages >= 2 (use 1f1b for one stage per rank)",
             "virtual_stages")
    if name in ("zb-v", "dualpipe-v"):
        need(v == 2, f"{name} needs two stages per rank: virtual_stages must be 2",
             "virtual_stages")
    if name == "dualpipe-v":
        need(m >= 2 * p, f"dualpipe-v needs microbatches >= 2 * stages, got m={m}, p={p}",
             "microbatches")
    if name == "dualpipe":
        need(v == 1, "dualpipe holds each rank's stage of both directions: virtual_stages must "
             "be 1", "virtual_stages")
        need(p % 2 == 0, f"dualpipe needs an even number of stages, got {p}", "stages")
        need(m % 2 == 0 and m >= 2 * p, f"dualpipe needs an even number of microbatches >= 2 * "
             f"stages (half go each direction), got m={m}, p={p}", "microbatches")


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """Per-rank action lists of schedule ``name`` for p ranks, m micro-batches, v stages/rank."""
    check(name, p, m, v)
    if name == "gpipe":
        return _gpipe(p, m)
    if name == "1f1b":
        return _one_f_one_b(p, m)
    if name == "interleaved-1f1b":
        return _interleaved(name, p, v, m, zero_bubble=False)
    if name == "zb-h1":
        # ZB-H1 (Qi et al. 2023, §3.1, Fig. 3): 1F1B with split backward, rank r postpones r W's;
        # with v > 1 the interleaved variant of torch ScheduleInterleavedZeroBubble (ZB1P).
        return _interleaved(name, p, v, m, zero_bubble=True)
    if name == "zb-h2":
        return _zb_h2(p, m)
    if name == "zb-v":
        return _zb_v(p, m)
    if name == "dualpipe-v":
        return _dualpipe_v(p, m)
    if name == "dualpipe":
        return _dualpipe(p, m)
    raise ScheduleConstraintError(f"unknown schedule {name!r}", "schedule")


# schedules built lately, with each rank's stages: a sweep over sizes (or a plan's layouts)
# asks for the same schedule again and again (building one is O(ranks x micro-batches)).
# Schedules are frozen and read only; those past _MEMO_ACTIONS actions (8 bytes each) are
# kept two at most (_BIG: an estimate at the limits asks for its schedule several times, its
# suggestions too).
_SCHEDULES: dict[tuple, tuple] = {}
_SCHEDULES_MAX = 16
_MEMO_ACTIONS = 1 << 20
_BIG: dict[tuple, tuple] = {}
_BIG_MAX = 2
_SCHEDULES_LOCK = threading.Lock()


def schedule_of(name: str, p: int, m: int, v: int):
    """``build_schedule(name, p, m, v)``, memoised (a constraint error is raised each time)."""
    key = (name, p, m, v)
    hit = _SCHEDULES.get(key) or _BIG.get(key)
    if hit is not None:
        return hit[0]
    plan = build_schedule(name, p, m, v)
    stages: list[list[int]] = [[] for _ in range(plan.num_ranks)]
    for s, r in enumerate(plan.stage_to_rank):
        stages[r].append(s)
    kept, most = (_SCHEDULES, _SCHEDULES_MAX) \
        if sum(len(o) for o in plan.orders) <= _MEMO_ACTIONS else (_BIG, _BIG_MAX)
    with _SCHEDULES_LOCK:
        if len(kept) >= most:
            kept.pop(next(iter(kept)), None)
        kept[key] = (plan, stages)
    return plan


def rank_stages(schedule) -> list[list[int]]:
    """Each rank's stages, in order (kept with a memoised schedule)."""
    for plan, stages in [*_SCHEDULES.values(), *_BIG.values()]:
        if plan is schedule:
            return stages
    got = _BIG_STAGES.get(id(schedule))  # (a schedule too big to keep: the last few's)
    if got is not None and got[0] is schedule:
        return got[1]
    stages: list[list[int]] = [[] for _ in range(schedule.num_ranks)]
    for s, r in enumerate(schedule.stage_to_rank):
        stages[r].append(s)
    if len(_BIG_STAGES) >= 4:
        _BIG_STAGES.pop(next(iter(_BIG_STAGES)))
    _BIG_STAGES[id(schedule)] = (schedule, stages)
    return stages


_BIG_STAGES: dict[int, tuple] = {}
