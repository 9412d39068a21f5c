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
    # the step at which F / I of (rank, micro-batch) ran, -1 before, flat (rank * m + j); row p
    # never runs (the last rank's "next rank")
    f_t = np.full((p + 1) * m, -1, dtype=np.int64)
    i_t = np.full((p + 1) * m, -1, dtype=np.int64)
    nf, ni, nw = (np.zeros(p, dtype=np.int64) for _ in range(3))
    caps = 2 * p - 1 - np.arange(p)
    out = np.empty(p * 3 * m, dtype=np.int64)
    base_all = np.arange(p, dtype=np.int64) * m
    lo, t = 0, 0
    steps: list[np.ndarray] = []  # per step, the flat positions of the actions run
    while lo < p:
        if not t & 0x3FF:
            check()  # (a request's work limit)
        a, b = lo, min(p, t + 1)  # rank r starts at step r
        NF, NI, NW, base = nf[a:b], ni[a:b], nw[a:b], base_all[a:b]  # (views)
        # I: its input gradient arrived (the next rank's I; on the last rank its own F)
        ready = i_t[base + m + np.minimum(NI, m - 1)]
        if b == p:
            ready[-1] = f_t[base[-1] + min(int(NI[-1]), m - 1)]
        do_i = (NI < NF) & (ready >= 0) & (ready < t)
        # F: below its cap, and the previous rank's F of that micro-batch ran (rank 0: always)
        before = f_t[base - m + np.minimum(NF, m - 1)]
        ok = (before >= 0) & (before < t)
        if a == 0:
            ok[0] = True
        do_f = ~do_i & (NF < m) & (NF - NW < caps[a:b]) & ok
        # W: its oldest pending one, whose I ran at an earlier step
        do_w = ~do_i & ~do_f & (NW < NI) & (i_t[base + np.minimum(NW, m - 1)] < t)
        k = np.flatnonzero(do_i)
        i_t[base[k] + NI[k]] = t
        k = np.flatnonzero(do_f)
        f_t[base[k] + NF[k]] = t
        code = np.where(do_i, Sm + base + NI, np.where(do_f, base + NF, 2 * Sm + base + NW))
        ran = do_i | do_f | do_w
        at = (3 * base + NF + NI + NW)[ran]  # (rank * 3m + its place in its order)
        out[at] = code[ran]
        NI += do_i
        NF += do_f
        NW += do_w
        steps.append(at.astype(np.int32))
        while lo < p and nw[lo] == m:
            lo += 1
        t += 1
    out = out.reshape(p, 3 * m)
    sizes = np.fromiter((len(x) for x in steps), dtype=np.int64, count=len(steps))
    levels = (np.concatenate(steps), np.concatenate([[0], np.cumsum(sizes)]))
    return list(out), levels
