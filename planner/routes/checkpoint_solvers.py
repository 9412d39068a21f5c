"""Checkpoint placement solvers for a chain of transformer blocks.

The chain model (what the reference training step executes)
-----------------------------------------------------------
The reference step runs blocks ``0 .. n-1`` in order and checkpoints at block granularity with
``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)``. A *plan* is a list of
segments ``(first, last)`` of consecutive blocks, each wrapped in one checkpoint call; a plan
given as a set of block indices means one segment per block. Block ``i`` has

- ``saved_bytes``     s_i: what it keeps for backward when it runs normally, its input included
                      (a block that starts with a norm or a matmul saves its input);
- ``input_bytes``     x_i: its input tensor, all that a checkpointed segment keeps in forward;
- ``transient_bytes`` t_i: the most it allocates on top of its saved tensors at any moment of its
                      forward, recompute or backward (gradients in flight, workspaces);
- ``grad_bytes``      g_i: parameter gradients its backward creates, alive to the step's end
                      (0 when gradients stay allocated across steps: count them in the base);
- ``forward_s``, ``backward_s``: times; a checkpointed block runs its forward once more.

The chain adds ``base_bytes`` (model states and everything else resident for the whole step) and
``tail_bytes`` (what the loss head holds on top of all stored activations, after the last block).

While the forward runs, a block outside every segment stores s_i, a segment stores the input of
its first block only. The backward visits blocks ``n-1 .. 0``; when it reaches block ``i`` the
blocks after ``i`` have been freed, and block ``i`` together with the blocks before it in its own
segment hold their saved tensors again (recomputed). So, with ``stored_j`` = s_j outside a
segment and x_first for a segment (0 for its other blocks):

    peak = base + max( sum_j stored_j + tail,
                       max_i [ sum_{j < first(i)} stored_j + sum_{first(i) <= j <= i} s_j + t_i
                               + sum_{j >= i} g_j ] )

where ``first(i)`` is the first block of i's segment (i itself outside segments). The forward
never exceeds this: at block ``i`` it holds at most the same prefix plus ``s_i + t_i``.
``chain_peak_bytes`` is this formula and the one definition every solver and test uses.

Budget solver
-------------
With one segment per block, checkpointing block ``j`` saves ``d_j = s_j - x_j`` bytes in every
prefix after it and costs ``forward_s_j``. The budget ``B`` becomes prefix constraints

    sum_{j < i, j in C} d_j >= R_i := base + S_i + s_i + t_i + G_i - B   (i = 0 .. n-1)
    sum_{j in C} d_j       >= R_n := base + S_n + tail - B

with ``S_i = sum_{j<i} s_j`` and ``G_i = sum_{j>=i} g_j``: a min-cost knapsack with prefix
constraints (NP-hard in general, so the solver is pseudo-polynomial). The budget solver places
single-block segments, the granularity of the reference step. Two paths:

1. *Pareto DP* (exact): the states after block ``j`` are the (recompute time, savings) pairs not
   dominated by another, savings capped at the largest requirement still ahead.
2. *Grid DP* on savings in units of ``q`` (vectorised over the grid): with ``q = gcd(d_j)`` it is
   exact; with a coarser ``q`` (grid capped at ``MAX_GRID`` cells) each d_j is rounded down, so
   the plan it returns is feasible, and it costs no more than the exact optimum for the budget
   ``B - n*q`` (each of at most n rounded items loses < q). A second pass rounds to nearest
   and is then repaired to feasibility; the cheaper feasible plan wins. Rounding d_j up gives a
   relaxation whose optimum is a certified lower bound; both figures are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAX_CHAIN_BLOCKS = 10_000
MAX_BYTES = 2**62
MAX_PARETO_STATES = 2_048  # above this front size the grid DP takes over
MAX_GRID = 8_192  # grid cells of the coarse DP: solve time O(n * MAX_GRID)


class ChainBlock(BaseModel):
    """Costs of one block of the chain (per device, one micro-batch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    forward_s: float = Field(..., ge=0, le=1e6, allow_inf_nan=False, description="Forward time.")
    backward_s: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False, description="Backward time.")
    saved_bytes: int = Field(..., ge=0, le=MAX_BYTES,
                             description="Kept for backward when not checkpointed, input "
                             "included.")
    input_bytes: int = Field(..., ge=0, le=MAX_BYTES,
                             description="The block's input: all a checkpointed block keeps.")
    transient_bytes: int = Field(0, ge=0, le=MAX_BYTES,
                                 description="Peak allocation on top of its saved tensors.")
    grad_bytes: int = Field(0, ge=0, le=MAX_BYTES, description="Parameter gradients its "
                            "backward creates (0 when they stay allocated: put them in the base).")
    forward_flops: int | None = Field(None, ge=0, le=10**24, description="Forward FLOPs.")


Segment = tuple[int, int]


def as_segments(plan: Iterable[int] | Iterable[Segment], n: int) -> list[Segment]:
    """Normalise a plan: block indices (one segment each) or ``(first, last)`` segments."""
    segs: list[Segment] = []
    for p in plan:
        a, b = (p, p) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1]))
        if not 0 <= a <= b < n:
            raise ValueError(f"segment {(a, b)} outside a chain of {n} blocks")
        segs.append((int(a), int(b)))
    segs.sort()
    for (_, b0), (a1, _) in zip(segs, segs[1:]):
        if a1 <= b0:
            raise ValueError(f"segments overlap at block {a1}")
    return segs


def chain_peak_bytes(chain: Sequence[ChainBlock], plan: Iterable[int] | Iterable[Segment] = (),
                     *, base_bytes: int = 0, tail_bytes: int = 0) -> int:
    """Peak bytes of one training step of the chain under ``plan`` (the module's chain model)."""
    n = len(chain)
    first = list(range(n))  # first block of each block's segment
    stored = [b.saved_bytes for b in chain]
    for a, b in as_segments(plan, n):
        for i in range(a, b + 1):
            first[i], stored[i] = a, 0
        stored[a] = chain[a].input_bytes
    prefix = [0]
    for v in stored:
        prefix.append(prefix[-1] + v)
    saved_prefix = [0]
    for blk in chain:
        saved_prefix.append(saved_prefix[-1] + blk.saved_bytes)
    peak = prefix[n] + tail_bytes
    grads_after = sum(blk.grad_bytes for blk in chain)  # G_i: gradients of blocks i .. n-1
    for i, blk in enumerate(chain):
        a = first[i]
        held = (prefix[a] + saved_prefix[i + 1] - saved_prefix[a] + blk.transient_bytes
                + grads_after)
        peak = max(peak, held)
        grads_after -= blk.grad_bytes
    return base_bytes + peak


def recompute_time_s(chain: Sequence[ChainBlock], blocks: Iterable[int]) -> float:
    """Each checkpointed block runs its forward once more in backward."""
    return float(sum(chain[i].forward_s for i in blocks))


@dataclass(frozen=True)
class BudgetSolution:
    blocks: list[int]  # checkpointed blocks, one segment each
    fits: bool
    peak_bytes: int  # of ``blocks`` (the smallest achievable peak when it does not fit)
    recompute_s: float
    exact: bool  # proven optimal
    lower_bound_s: float  # certified: no feasible plan recomputes less
    method: str  # "pareto", "grid-exact", "grid"
    grid_bytes: int | None = None  # q of the grid DP


def min_peak_plan(chain: Sequence[ChainBlock]) -> list[int]:
    """Checkpointing every block whose input is smaller than its saved set maximises the savings
    of every prefix at once, so its peak is the smallest achievable."""
    return [i for i, b in enumerate(chain) if b.saved_bytes > b.input_bytes]


def _requirements(chain: Sequence[ChainBlock], budget_bytes: int, base_bytes: int,
                  tail_bytes: int) -> list[int]:
    """R_0 .. R_n of the module docstring (savings each prefix needs)."""
    req, prefix, grads = [], 0, sum(b.grad_bytes for b in chain)
    for b in chain:
        req.append(base_bytes + prefix + b.saved_bytes + b.transient_bytes + grads - budget_bytes)
        prefix += b.saved_bytes
        grads -= b.grad_bytes
    req.append(base_bytes + prefix + tail_bytes - budget_bytes)
    return req


def solve_budget(chain: Sequence[ChainBlock], budget_bytes: int, *, base_bytes: int = 0,
                 tail_bytes: int = 0, max_states: int | None = None,
                 max_grid: int = MAX_GRID) -> BudgetSolution:
    """The checkpointed block set of least recompute time whose peak is within the budget."""
    n = len(chain)
    lowest = min_peak_plan(chain)
    low_peak = chain_peak_bytes(chain, lowest, base_bytes=base_bytes, tail_bytes=tail_bytes)
    if low_peak > budget_bytes:
        return BudgetSolution(lowest, False, low_peak, recompute_time_s(chain, lowest), True,
                              recompute_time_s(chain, lowest), "min-peak")
    req = _requirements(chain, budget_bytes, base_bytes, tail_bytes)
    gain = [b.saved_bytes - b.input_bytes for b in chain]
    cost = [b.forward_s for b in chain]
    # Savings beyond the largest requirement still ahead are worth nothing: cap them there.
    ahead = [0] * (n + 1)
    run = 0
    for i in range(n, -1, -1):
        run = max(run, req[i])
        ahead[i] = run
    blocks = _pareto(gain, cost, req, ahead, MAX_PARETO_STATES if max_states is None
                     else max_states)
    method, grid_q, lower = "pareto", None, None
    if blocks is None:
        cands = [g for g in gain if g > 0]
        g = math.gcd(*cands) if cands else 1
        top = max(ahead[0], 1)
        need = [max(-(-r // g), 0) for r in req]
        if -(-top // g) <= max_grid:  # every saving is a whole number of grid units: exact
            method, grid_q = "grid-exact", g
            blocks = _grid([d // g if d > 0 else 0 for d in gain], cost, need)
        else:
            method, grid_q = "grid", -(-top // max_grid)
            q = grid_q
            need = [max(-(-r // q), 0) for r in req]  # ceil(R/q): savings come in whole units
            down = _grid([d // q if d > 0 else 0 for d in gain], cost, need)
            near = _grid([(d + q // 2) // q if d > 0 else 0 for d in gain], cost, need)
            plans = [p for p in (down, near) if p is not None] + [lowest]
            plans = [_repair_and_prune(gain, cost, req, p) for p in plans]
            blocks = min(plans, key=lambda p: recompute_time_s(chain, p))
            lower = _grid([-(-d // q) if d > 0 else 0 for d in gain], cost, need, cost_only=True)
    exact = method != "grid"
    if blocks is None:  # not reached: the min-peak plan fits, so the exact paths find a plan
        blocks = lowest
    rec = recompute_time_s(chain, blocks)
    peak = chain_peak_bytes(chain, blocks, base_bytes=base_bytes, tail_bytes=tail_bytes)
    if lower is not None and lower >= rec - 1e-12 * max(rec, 1.0):
        exact = True
    return BudgetSolution(blocks, True, peak, rec, exact, rec if exact else float(lower),
                          method, grid_q)


def _pareto(gain: list[int], cost: list[float], req: list[int], ahead: list[int],
            max_states: int) -> list[int] | None:
    """Exact DP over non-dominated (cost, savings) states; None when the front grows too big."""
    n = len(gain)
    if req[0] > 0:
        return None
    c = np.zeros(1)
    v = np.zeros(1, dtype=np.int64)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    for j in range(n):
        cap = max(ahead[j + 1], 0)
        if gain[j] > 0:
            cc = np.concatenate([c, c + cost[j]])
            vv = np.minimum(np.concatenate([v, v + min(gain[j], cap)]), cap)
            parent = np.concatenate([np.arange(len(c)), np.arange(len(c))])
            took = np.concatenate([np.zeros(len(c), bool), np.ones(len(c), bool)])
        else:
            cc, vv = c, np.minimum(v, cap)
            parent, took = np.arange(len(c)), np.zeros(len(c), bool)
        ok = vv >= req[j + 1]
        cc, vv, parent, took = cc[ok], vv[ok], parent[ok], took[ok]
        order = np.lexsort((-vv, cc))  # by cost, then most savings first
        cc, vv, parent, took = cc[order], vv[order], parent[order], took[order]
        best_before = np.concatenate([[-1], np.maximum.accumulate(vv)[:-1]])
        keep = vv > best_before  # not dominated by a cheaper (or equal-cost) state
        c, v = cc[keep], vv[keep]
        history.append((parent[keep], took[keep]))
        if len(c) > max_states:
            return None
    k = 0  # the cheapest state (sorted first)
    blocks = []
    for j in range(n - 1, -1, -1):
        parent, took = history[j]
        if took[k]:
            blocks.append(j)
        k = int(parent[k])
    return sorted(blocks)


def _grid(units: list[int], cost: list[float], units_req: list[int], *,
          cost_only: bool = False):
    """DP over savings in grid units: dp[k] = least cost of the plans with exactly k units so far
    (k = K: K or more), K = the largest requirement. Vectorised over k, O(n * K)."""
    K = max(units_req)
    if units_req[0] > 0:
        return None
    dp = np.full(K + 1, np.inf)
    dp[0] = 0.0
    rows: list[tuple[np.ndarray | None, bool, int]] = []  # took[k - u] for k < K; top taken, parent
    for j, (u, f) in enumerate(zip(units, cost)):
        took, top_took, top_parent = None, False, K
        if u > 0 and K > 0:
            lo = max(K - u, 0)
            top_parent = lo + int(np.argmin(dp[lo:]))  # best state that reaches the cap
            top_cand = dp[top_parent] + f
            if u < K:
                cand = dp[: K - u] + f  # a copy, so the in-place update below is safe
                took = cand < dp[u:K]
                np.minimum(dp[u:K], cand, out=dp[u:K])
            if top_cand < dp[K]:
                dp[K], top_took = top_cand, True
        dp[: units_req[j + 1]] = np.inf
        if not cost_only:
            rows.append((took, top_took, top_parent))
    best = K - int(np.argmin(dp[::-1]))  # least cost; among equals the most savings
    if not np.isfinite(dp[best]):
        return None
    if cost_only:
        return float(dp[best])
    blocks, k = [], best
    for j in range(len(units) - 1, -1, -1):
        took, top_took, top_parent = rows[j]
        if k == K and top_took:
            blocks.append(j)
            k = top_parent
        elif k < K and took is not None and k >= units[j] and took[k - units[j]]:
            blocks.append(j)
            k -= units[j]
    return sorted(blocks)


def _slack(gain: list[int], req: list[int], blocks: Iterable[int]) -> np.ndarray:
    """slack_i = savings of prefix i - R_i (int64: the request limits keep sums below 2^63)."""
    step = np.zeros(len(gain) + 1, np.int64)
    for j in blocks:
        step[j + 1] += gain[j]
    return np.cumsum(step) - np.asarray(req, np.int64)


def _repair_and_prune(gain: list[int], cost: list[float], req: list[int],
                      blocks: list[int]) -> list[int]:
    """Make a plan feasible (add the cheapest block per byte still missing before the first
    violated prefix), then drop the dearest checkpoints that are not needed."""
    chosen = set(blocks)
    slack = _slack(gain, req, chosen)
    while slack.min() < 0:
        i = int(np.argmax(slack < 0))
        deficit = int(-slack[i])
        options = [j for j in range(i) if j not in chosen and gain[j] > 0]
        j = min(options, key=lambda j: (cost[j] / min(gain[j], deficit), -gain[j]))
        chosen.add(j)
        slack[j + 1:] += gain[j]
    for j in sorted(chosen, key=lambda j: -cost[j]):
        if cost[j] > 0 and slack[j + 1:].min() >= gain[j]:
            chosen.discard(j)
            slack[j + 1:] -= gain[j]
    return sorted(chosen)


# ---- homogeneous chains: Griewank & Walther's binomial checkpointing (Revolve) ---------------

def revolve_forward_steps(num_steps: int, slots: int) -> int:
    """Least forward steps to reverse ``num_steps`` steps with ``slots`` checkpoint slots
    (the initial state occupies one). Griewank & Walther 2000, "Algorithm 799: revolve",
    Prop. 1: t(l, c) = r*l - C(c+r, c+1), r the least integer with C(c+r, c) >= l."""
    if num_steps < 1 or slots < 1:
        raise ValueError("num_steps and slots must be at least 1")
    r, binom = 0, 1  # binom = C(c + r, c)
    while binom < num_steps:
        r += 1
        binom = binom * (slots + r) // r
    return r * num_steps - math.comb(slots + r, slots + 1)


def revolve_table(max_steps: int, max_slots: int) -> list[list[int]]:
    """The same optimum by dynamic programming (Griewank 1992): F[l][c] = min over the first
    checkpoint position j of  j + F[l-j][c-1] + F[j][c],  F[1][c] = 0, F[l][1] = l(l-1)/2."""
    F = [[0] * (max_slots + 1) for _ in range(max_steps + 1)]
    for l in range(1, max_steps + 1):
        F[l][1] = l * (l - 1) // 2
        for c in range(2, max_slots + 1):
            F[l][c] = 0 if l == 1 else min(j + F[l - j][c - 1] + F[j][c] for j in range(1, l))
    return F
