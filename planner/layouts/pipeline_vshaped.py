"""Pipeline schedules whose ranks hold two stages: V-shaped (ZB-V, DualPipeV) and bidirectional
(DualPipe).

ZB-V and DualPipeV place 2p stages on p ranks in a V (rank r holds stages r and 2p-1-r, so the
last rank holds the two middle stages); DualPipe runs two pipelines of p stages in opposite
directions, rank r holding stage r of the one and stage p-1-r of the other, and feeds each half
the micro-batches. The orders are those of torch's ScheduleZBVZeroBubble and ScheduleDualPipeV
(``tests/test_pipeline_schedules.py`` compares them) and of DeepSeek's DualPipe, encoded and
mapped as ``planner.layouts.pipeline_orders`` describes; ``planner.layouts.pipeline_schedules``
checks a request against each schedule's constraints and builds it (``build_schedule``).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from planner.layouts.pipeline_orders import Schedule, _make, _v_mapping


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
        orders.append(codes)  # (an array: 8 bytes an action, not a list of ints)
    return _make("zb-v", p, 2, m, _v_mapping(p), orders, split=True)


def _dualpipe_steps(r: int, half_rank: int, half_ranks: int, chunks: int,
                    stage_of_phase: tuple[int, int], m: int, S: int,
                    full: bytearray) -> np.ndarray:
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
    head = np.concatenate(parts).astype(np.int64)
    seq: list[int] = []  # steps 6-8, a few per rank: appended one by one
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
    return np.concatenate((head, np.array(seq, dtype=np.int64)))


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
