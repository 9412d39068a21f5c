"""Pipeline schedules as per-rank action lists.

A schedule is, for every rank, the order in which it runs forward (F), backward (B) or — when the
backward is split as in Qi et al. 2023 ("Zero Bubble Pipeline Parallelism", §2) — backward for
inputs (I) and backward for weights (W), each on one (virtual stage, micro-batch).

The orders of the schedules PyTorch ships (``torch.distributed.pipelining.schedules``) are
reproduced action for action; ``tests/test_pipeline_schedules.py`` compares them with torch's own
``pipeline_order``. Compute only: sends and receives are implied by the stage-to-rank mapping
(F of stage s needs F of stage s-1; I/B of stage s needs I/B of stage s+1) and the simulator
charges them as point-to-point messages.

Actions are encoded as ints, ``code = (slot * num_stages + stage) * microbatches + mb`` with
slot 0 = F, 1 = backward for inputs (B when the backward is not split), 2 = W, so that schedules
of a few hundred thousand actions build and simulate in tens of milliseconds.
"""

from __future__ import annotations

import threading
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

F_SLOT, B_SLOT, W_SLOT = 0, 1, 2


class ScheduleConstraintError(ValueError):
    """A schedule's precondition does not hold; ``field`` names the request field at fault."""

    def __init__(self, rule: str, field: str) -> None:
        super().__init__(rule)
        self.rule, self.field = rule, field


@dataclass(frozen=True)
class Schedule:
    name: str
    num_ranks: int  # p
    virtual_stages: int  # v: stage chunks per rank (2 for the V-shaped and bidirectional ones)
    num_stages: int  # S: virtual stages in all (= p * v; 2p for dualpipe, two pipelines of p)
    microbatches: int  # m: per pipeline (per direction for dualpipe)
    stage_to_rank: list[int]
    prev_stage: list[int]  # -1 where a pipeline starts
    next_stage: list[int]  # -1 where a pipeline ends (the loss is computed there)
    orders: list[Sequence[int]]  # per rank, action codes in execution order (array('q'))
    full_backward: bytearray  # per (stage * m + mb): 1 when its backward is one B, not I + W

    def decode(self, code: int) -> tuple[str, int, int]:
        """(kind, stage, micro-batch) of an action code; kind is F, B, I or W."""
        slot, rest = divmod(code, self.num_stages * self.microbatches)
        stage, mb = divmod(rest, self.microbatches)
        if slot == B_SLOT:
            return ("B" if self.full_backward[rest] else "I"), stage, mb
        return ("F" if slot == F_SLOT else "W"), stage, mb

    def actions(self, rank: int) -> list[tuple[str, int, int]]:
        return [self.decode(c) for c in self.orders[rank]]


def _loop_mapping(p: int, v: int) -> list[int]:
    # Looped placement: virtual stage s on rank s % p (Narayanan et al. 2021, §2.2, Fig. 4).
    return [s % p for s in range(p * v)]


def _v_mapping(p: int) -> list[int]:
    # V-shaped placement: rank r holds stages r and 2p-1-r (Qi et al. 2024, "Pipeline
    # Parallelism with Controllable Memory", Fig. 1; torch generate_stage_to_rank_mapping "v").
    return [s if s < p else 2 * p - 1 - s for s in range(2 * p)]


def _chain(n: int) -> tuple[list[int], list[int]]:
    return [s - 1 for s in range(n)], [s + 1 if s + 1 < n else -1 for s in range(n)]


def _make(name: str, p: int, v: int, m: int, mapping: list[int], orders: list[list[int]],
          split: bool, prev_next: tuple[list[int], list[int]] | None = None,
          full: bytearray | None = None) -> Schedule:
    S = len(mapping)
    prev, nxt = prev_next or _chain(S)
    if full is None:
        full = bytearray(S * m) if split else bytearray(b"\x01") * (S * m)
    # 8 bytes an action (a list of ints holds 40): a schedule of millions of actions stays small
    return Schedule(name, p, v, S, m, mapping, prev, nxt, [array("q", o) for o in orders], full)


# ---- single stage per rank -------------------------------------------------------------------
def _gpipe(p: int, m: int) -> Schedule:
    # All forwards, then all backwards (Huang et al. 2019, "GPipe", Fig. 2c; torch ScheduleGPipe).
    orders = []
    for r in range(p):
        fb = r * m
        bb = (p + r) * m
        orders.append(list(range(fb, fb + m)) + list(range(bb, bb + m)))
    return _make("gpipe", p, 1, m, list(range(p)), orders, split=False)


def _one_f_one_b(p: int, m: int) -> Schedule:
    # Rank r runs p-1-r warm-up forwards, then alternates F and B, then drains the backwards
    # (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters",
    # §2.2, Fig. 4 top; PipeDream-Flush). The order torch's Schedule1F1B runs in _step_microbatches.
    S = p
    orders = []
    for r in range(p):
        fb, bb = r * m, (S + r) * m
        warm = min(p - 1 - r, m)
        seq = list(range(fb, fb + warm))
        for j in range(m - warm):
            seq.append(fb + warm + j)
            seq.append(bb + j)
        seq.extend(range(bb + m - warm, bb + m))
        orders.append(seq)
    return _make("1f1b", p, 1, m, list(range(p)), orders, split=False)


# ---- interleaved (looped) schedules, ported from torch's _get_1f1b_rank_ops --------------------
def _interleaved_rank(r: int, p: int, v: int, m: int, zero_bubble: bool) -> list[int]:
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
        return np.concatenate(parts).tolist()
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
    return np.concatenate(parts).tolist()


def _interleaved(name: str, p: int, v: int, m: int, zero_bubble: bool) -> Schedule:
    orders = [_interleaved_rank(r, p, v, m, zero_bubble) for r in range(p)]
    return _make(name, p, v, m, _loop_mapping(p, v), orders, split=zero_bubble)


# ---- ZB-H2 ----------------------------------------------------------------------------------
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
    """
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
        for r in range(lo, p):  # ranks are independent within one step: read times < t only
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


# ---- V-shaped schedules -----------------------------------------------------------------------
def _zb_v(p: int, m: int) -> Schedule:
    # ZB-V (Qi et al. 2023, §6, Fig. 8); port of torch ScheduleZBVZeroBubble.
    S = 2 * p
    n_micro = max(2 * p - 1, m)
    # Codes are built over n_micro micro-batches, (slot·S + stage)·n_micro + mb, then mapped to m.
    Sn = S * n_micro
    orders = []
    for r in range(p):
        s0, s1 = r, S - 1 - r
        F0, F1 = s0 * n_micro, s1 * n_micro
        B0, B1 = Sn + F0, Sn + F1
        W0, W1 = Sn + B0, Sn + B1
        parts = []
        nA = 2 * (p - r) - 1  # warm-up: chunk-0 forwards
        parts.append(F0 + np.arange(nA))
        k = np.arange(r)  # F1 F0
        parts.append(np.stack([F1 + k, F0 + nA + k], 1).ravel())
        f0, f1 = nA + r, r
        k = np.arange(p - r)  # F1 B1 W1
        parts.append(np.stack([F1 + f1 + k, B1 + k, W1 + k], 1).ravel())
        f1, b0, b1 = f1 + p - r, 0, p - r
        # steady state: [F0] B0 W0 F1 B1 W1 while chunk 1 lags chunk 0 or chunk 0 has more
        k1 = max(0, n_micro - f0)  # rounds that still run an F0
        k = np.arange(k1)
        parts.append(np.stack([F0 + f0 + k, B0 + b0 + k, W0 + b0 + k, F1 + f1 + k, B1 + b1 + k,
                               W1 + b1 + k], 1).ravel())
        f0, b0, f1, b1 = f0 + k1, b0 + k1, f1 + k1, b1 + k1
        k2 = max(0, f0 - f1)  # rounds without one
        k = np.arange(k2)
        parts.append(np.stack([B0 + b0 + k, W0 + b0 + k, F1 + f1 + k, B1 + b1 + k,
                               W1 + b1 + k], 1).ravel())
        b0, f1, b1 = b0 + k2, f1 + k2, b1 + k2
        w0, w1 = b0, b1
        k = np.arange(r)  # B0 B1 (their W's postponed)
        parts.append(np.stack([B0 + b0 + k, B1 + b1 + k], 1).ravel())
        b0, b1 = b0 + r, b1 + r
        k = np.arange(p - r)  # B0 W0
        parts.append(np.stack([B0 + b0 + k, W0 + w0 + k], 1).ravel())
        b0, w0 = b0 + p - r, w0 + p - r
        parts.append(W1 + np.arange(w1, b1))
        parts.append(W0 + np.arange(w0, b0))
        codes = np.concatenate(parts)
        if n_micro > m:  # torch pads to 2p-1 micro-batches and drops the surplus afterwards
            j = codes % n_micro
            keep = j < m
            codes = (codes[keep] // n_micro) * m + j[keep]
        orders.append(codes.tolist())
    return _make("zb-v", p, 2, m, _v_mapping(p), orders, split=True)


def _dualpipe_steps(r: int, half_rank: int, half_ranks: int, chunks: int,
                    stage_of_phase: tuple[int, int], m: int, S: int, full: bytearray) -> list[int]:
    """The eight steps of DualPipe / DualPipeV for one rank (DeepSeek-AI 2024, "DeepSeek-V3
    Technical Report", §3.2.1, Fig. 5; step structure of github.com/deepseek-ai/DualPipe and torch
    ScheduleDualPipeV). ``chunks`` micro-batches per phase. An overlapped F&B pair is emitted as
    F then B: the simulator does not model compute/communication overlap inside the pair."""
    Sm = S * m
    H, hr = half_ranks, half_rank
    s0, s1 = stage_of_phase[0] * m, stage_of_phase[1] * m
    # Steps 1-5 are regular: built as arrays. nf/nb: next micro-batch per phase for F and B.
    parts, full_b = [], []
    n = max(0, (H - hr - 1) * 2)  # step 1: F0
    parts.append(s0 + np.arange(n))
    nf0, nf1, nb0, nb1 = n, 0, 0, 0
    k = np.arange(hr + 1)  # step 2: F0 F1
    parts.append(np.stack([s0 + nf0 + k, s1 + nf1 + k], 1).ravel())
    nf0 += hr + 1
    nf1 += hr + 1
    k = np.arange(max(0, H - hr - 1))  # step 3: I1 W1 F1 (each W right after its I)
    parts.append(np.stack([Sm + s1 + nb1 + k, 2 * Sm + s1 + nb1 + k, s1 + nf1 + k], 1).ravel())
    nb1 += len(k)
    nf1 += len(k)
    # step 4: F0&B1, F1&B0 (on the middle rank, i == 0 is not overlapped: same order)
    k = np.arange(max(0, chunks - 2 * H + hr + 1))
    b1, b0 = s1 + nb1 + k, s0 + nb0 + k
    parts.append(np.stack([s0 + nf0 + k, Sm + b1, s1 + nf1 + k, Sm + b0], 1).ravel())
    full_b += [b1, b0]
    nf0, nb1, nf1, nb0 = nf0 + len(k), nb1 + len(k), nf1 + len(k), nb0 + len(k)
    k = np.arange(max(0, H - hr - 1))  # step 5: B1, F1&B0
    b1, b0 = s1 + nb1 + k, s0 + nb0 + k
    parts.append(np.stack([Sm + b1, s1 + nf1 + k, Sm + b0], 1).ravel())
    full_b += [b1, b0]
    nb1 += len(k)
    nb0 += len(k)
    seq: list[int] = np.concatenate(parts).tolist()
    np.frombuffer(full, dtype=np.uint8)[np.concatenate(full_b)] = 1  # B, not I + W
    nb = [nb0, nb1]
    wq: deque[int] = deque()  # codes of postponed W's, oldest first

    def bwd(ph: int, zb: bool) -> None:
        k = stage_of_phase[ph] * m + nb[ph]
        nb[ph] += 1
        seq.append(Sm + k)
        if zb:
            wq.append(2 * Sm + k)
        else:
            full[k] = 1

    def weight() -> None:
        if wq:
            seq.append(wq.popleft())

    zb = False
    for i in range(half_rank + 1):  # step 6: B1 B0, second half zero-bubble
        if i == (half_rank + 1) // 2 and half_rank % 2 == 1:
            zb = True
        bwd(1, zb)
        if i == (half_rank + 1) // 2 and half_rank % 2 == 0:
            zb = True
        bwd(0, zb)
    for _ in range(half_ranks - half_rank - 1):  # step 7: W, B0
        weight(); bwd(0, zb)
    for _ in range(half_rank + 1):  # step 8: W
        weight()
    return seq


def _dualpipe_v(p: int, m: int) -> Schedule:
    # DualPipeV: DualPipe folded onto one V-shaped pipeline of 2p stages (torch ScheduleDualPipeV).
    S = 2 * p
    full = bytearray(S * m)
    orders = [_dualpipe_steps(r, r, p, m, (r, S - 1 - r), m, S, full)
              for r in range(p)]
    return _make("dualpipe-v", p, 2, m, _v_mapping(p), orders, split=True, full=full)


def _dualpipe(p: int, m: int) -> Schedule:
    # DualPipe: two pipelines of p stages in opposite directions, m/2 micro-batches each
    # (DeepSeek-AI 2024, §3.2.1). Virtual stage j (< p) is stage j of the forward direction on
    # rank j; virtual stage p+j is stage j of the reverse direction, on rank p-1-j.
    S, half = 2 * p, m // 2
    mapping = list(range(p)) + [p - 1 - j for j in range(p)]
    prev = [s - 1 if s % p else -1 for s in range(S)]
    nxt = [s + 1 if (s + 1) % p else -1 for s in range(S)]
    full = bytearray(S * half)
    orders = []
    for r in range(p):
        second = r >= p // 2
        own = (r, p + (p - 1 - r))  # (forward-direction stage, reverse-direction stage)
        phases = (own[1], own[0]) if second else own
        orders.append(_dualpipe_steps(r, min(r, p - 1 - r), p // 2, half, phases, half, S, full))
    return _make("dualpipe", p, 1, half, mapping, orders, split=True, prev_next=(prev, nxt),
                 full=full)


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
        need(v == 2, f"{name} needs two stages per rank: virtual_stages must be 2", "virtual_stages")
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
# asks for the same schedule again and again (building one is O(ranks x micro-batches)). Schedules are
# frozen and read only; those past _MEMO_ACTIONS actions are not kept.
_SCHEDULES: dict[tuple, tuple] = {}
_SCHEDULES_MAX = 16
_MEMO_ACTIONS = 1 << 20
_SCHEDULES_LOCK = threading.Lock()


def schedule_of(name: str, p: int, m: int, v: int):
    """``build_schedule(name, p, m, v)``, memoised (a constraint error is raised each time)."""
    key = (name, p, m, v)
    hit = _SCHEDULES.get(key)
    if hit is not None:
        return hit[0]
    plan = build_schedule(name, p, m, v)
    if sum(len(o) for o in plan.orders) <= _MEMO_ACTIONS:
        stages: list[list[int]] = [[] for _ in range(plan.num_ranks)]
        for s, r in enumerate(plan.stage_to_rank):
            stages[r].append(s)
        with _SCHEDULES_LOCK:
            if len(_SCHEDULES) >= _SCHEDULES_MAX:
                _SCHEDULES.pop(next(iter(_SCHEDULES)), None)
            _SCHEDULES[key] = (plan, stages)
    return plan


def rank_stages(schedule) -> list[list[int]]:
    """Each rank's stages, in order (kept with a memoised schedule)."""
    for plan, stages in list(_SCHEDULES.values()):
        if plan is schedule:
            return stages
    stages: list[list[int]] = [[] for _ in range(schedule.num_ranks)]
    for s, r in enumerate(schedule.stage_to_rank):
        stages[r].append(s)
    return stages
