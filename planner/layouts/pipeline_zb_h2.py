"""ZB-H2's unit-cost list pass with every rank's step at once: deep pipelines.

``pipeline_schedules._zb_h2`` builds ZB-H2 (Qi et al. 2023, §3.2) by a unit-cost list pass: at
each step, each rank runs its next I if its input gradient has arrived, else its next F if
fewer than 2p-1-r micro-batches are in flight and its input has arrived, else its oldest
pending W. A rank reads only times set at earlier steps, so the ranks of one step are
independent: ``orders`` takes each step's decisions for all ranks in array expressions, a
constant cost per step (3m + 2p steps or so) where the rank-by-rank pass costs one Python
iteration per rank and step (3 million at 1,024 ranks and micro-batches: 2-3 s). The rank-by-rank
pass keeps its periodic fast forward, which pays where micro-batches far outnumber ranks;
``tests/test_pipeline_schedules.py`` holds both equal.
"""

from __future__ import annotations

import numpy as np

from planner.machine.deadline import check

__all__ = ["orders"]


def orders(p: int, m: int) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Every rank's ZB-H2 action codes (``Schedule``'s: F r*m + j, I Sm + r*m + j, W 2Sm + r*m + j
    for micro-batch j on stage r, Sm = p*m), in step order; and the steps as levels for
    ``pipeline_sim_levels`` (the flat positions, rank after rank, step after step, and where
    each step starts): an action waits only on actions of earlier steps, in the simulation as in
    the pass (its rank's action before, the previous stage's F, the next stage's I, its own I for
    a W)."""
    Sm = p * m
    # the step at which F / I of (rank, micro-batch) ran, -1 before; row p never runs (the
    # last rank's "next rank")
    f_t = np.full((p + 1, m), -1, dtype=np.int64)
    i_t = np.full((p + 1, m), -1, dtype=np.int64)
    nf, ni, nw = (np.zeros(p, dtype=np.int64) for _ in range(3))
    caps = 2 * p - 1 - np.arange(p)
    out = np.empty((p, 3 * m), dtype=np.int64)
    ranks = np.arange(p)
    last = p - 1
    lo, t = 0, 0
    steps: list[np.ndarray] = []  # per step, the flat positions of the actions run
    while lo < p:
        if not t & 0x3FF:
            check()  # (a request's work limit)
        R = ranks[lo:min(p, t + 1)]  # rank r starts at step r
        done = nf[R] + ni[R] + nw[R]  # its place in its order
        # I: its input gradient arrived (the next rank's I, or its own F on the last rank)
        j = np.minimum(ni[R], m - 1)
        ready = np.where(R < last, i_t[np.minimum(R + 1, p), j], f_t[R, j])
        do_i = (ni[R] < nf[R]) & (ready >= 0) & (ready < t)
        # F: below its cap, and the previous rank's F of that micro-batch ran
        jf = np.minimum(nf[R], m - 1)
        before = f_t[np.maximum(R - 1, 0), jf]
        do_f = ~do_i & (nf[R] < m) & (nf[R] - nw[R] < caps[R]) \
            & ((R == 0) | ((before >= 0) & (before < t)))
        # W: its oldest pending one, whose I ran at an earlier step
        do_w = ~do_i & ~do_f & (nw[R] < ni[R]) & (i_t[R, np.minimum(nw[R], m - 1)] < t)
        r = R[do_i]
        i_t[r, ni[r]] = t
        out[r, done[do_i]] = Sm + r * m + ni[r]
        ni[r] += 1
        r = R[do_f]
        f_t[r, nf[r]] = t
        out[r, done[do_f]] = r * m + nf[r]
        nf[r] += 1
        r = R[do_w]
        out[r, done[do_w]] = 2 * Sm + r * m + nw[r]
        nw[r] += 1
        ran = do_i | do_f | do_w
        steps.append((R[ran] * (3 * m) + done[ran]).astype(np.int32))
        while lo < p and nw[lo] == m:
            lo += 1
        t += 1
    sizes = np.fromiter((len(x) for x in steps), dtype=np.int64, count=len(steps))
    levels = (np.concatenate(steps), np.concatenate([[0], np.cumsum(sizes)]))
    return list(out), levels
