"""The largest micro-batch that fits a memory budget, given the peak at any micro-batch.

Every live tensor of the step is non-decreasing in the batch, so the peak is monotone and a
bracket [largest size seen to fit, smallest seen not to] always holds the answer. Every tensor's
size is also affine in the batch (the op sequence does not depend on it), so the peak is a maximum
of affine functions: the secant through two probes predicts where the budget is crossed, and it is
exact on each linear piece. ``largest_fitting`` probes along the secant (clamped into the bracket)
and then its neighbour, falling back to bisection when the bracket stops shrinking; every answer is
a measured fit with a measured non-fit next to it, so it equals the exponential + binary search
(``largest_fitting_search``, which tests hold it against) whatever the prediction's quality.
"""

from __future__ import annotations

from collections.abc import Callable

from planner.catalog.specs import MAX_BATCH

__all__ = ["compile_ahead_pays", "hold_compiles", "largest_fitting", "largest_fitting_search"]

# a template compile costs about three replays of the same step (worst-case-cpu.md: 0.18-0.2 s
# against 0.06 s for the same setup), so it pays when it serves more than three sizes
COMPILE_IN_REPLAYS = 3


def compile_ahead_pays(b0: int) -> bool:
    """Whether to compile a setup's template at its first sight, the estimate of micro-batch
    ``b0`` with a search (``largest_fitting``) to follow. Sizes of 2 and up share a template
    (1 is a domain of its own). When b0 does not fit, the search asks the template's domain for
    at most the sizes 2..b0-1 besides b0 (the bracket is [1, b0)): b0 - 1 sizes in all, which a
    compile pays for only when they are more than ``COMPILE_IN_REPLAYS``; when b0 fits, the
    search climbs (a prediction and its neighbour at least) and the setup is compiled at its
    second size, as any setup is. So: ahead from b0 = 5 up. Answers do not depend on it (a
    template equals the replay); only what is replayed and what is compiled does."""
    return b0 - 1 > COMPILE_IN_REPLAYS


def hold_compiles(b0: int, b0_fits: bool) -> int | None:
    """``cache.compile_after`` for the search after an estimate at ``b0`` that was not compiled
    ahead: when b0 does not fit, the at most b0 - 1 sizes of the domain the search can ask are
    too few to pay for a compile, so it is held past them (None: the default, compile at the
    second size)."""
    if b0_fits or compile_ahead_pays(b0):
        return None
    return max(3, b0)


def largest_fitting(need: Callable[[int], int], mem_bytes: int,
                    max_batch: int = MAX_BATCH, known: dict[int, int] | None = None,
                    bound: Callable[[int], int | None] | None = None) -> int | None:
    """Largest b in 1..max_batch with ``need(b) <= mem_bytes`` (``need``: the peak plus the
    allocator reserve at micro-batch b, or a lower bound on it where that is over
    ``mem_bytes``); None when not even 1 fits. ``known``: needs already
    computed (the estimate's own micro-batch), used as probes. The peak is monotone, so a size
    seen to fit says every smaller one does: b = 1 (a template domain of its own, so a replay
    of its own) is probed only when nothing larger fits, and b = 2 is probed before it.
    ``bound(b)``: a lower bound on ``need(b)`` (or None): a size it puts above the memory is
    not estimated (it cannot fit), and the bound stands in for its need in the predictions."""
    memo: dict[int, int] = {b: c for b, c in (known or {}).items() if 1 <= b <= max_batch}

    def cost(b: int) -> int:
        if b not in memo:
            floor = bound(b) if bound is not None else None
            memo[b] = floor if floor is not None and floor > mem_bytes else need(b)
        return memo[b]

    # cost(lo) fits; hi does not (max_batch + 1 is never allowed)
    hi = min((b for b, c in memo.items() if c > mem_bytes), default=max_batch + 1)
    lo = max((b for b, c in memo.items() if c <= mem_bytes), default=None)
    if lo is None:  # nothing known fits: 2 (unless known not to), else 1
        if hi > 2 and 2 not in memo and cost(2) <= mem_bytes:
            lo = 2
        elif hi > 1 and cost(1) <= mem_bytes:
            lo = 1
        else:
            return None

    def probe(b: int) -> None:
        nonlocal lo, hi
        if cost(b) <= mem_bytes:
            lo = max(lo, b)
        else:
            hi = min(hi, b)

    if lo < 2 < hi:
        probe(2)
    while hi - lo > 1:
        width = hi - lo
        # secant through the two highest probes at or below lo (all fit) or through lo and hi
        known_b = sorted(memo)
        if hi in memo:
            x0, x1 = lo, hi
        else:
            below = [b for b in known_b if b <= lo]
            x0, x1 = (below[-2], below[-1]) if len(below) >= 2 else (lo, lo)
        slope = (memo[x1] - memo[x0]) / (x1 - x0) if x1 != x0 else 0.0
        if slope > 0:
            g = x0 + int((mem_bytes - memo[x0]) // slope)
        else:
            g = hi - 1
        g = min(max(g, lo + 1), hi - 1)
        probe(g)
        if lo == g and g + 1 < hi:  # the prediction fits: is it the last that does?
            probe(g + 1)
        if hi - lo > width // 2 and hi - lo > 1:  # little progress: bisect once
            probe((lo + hi) // 2)
    return lo


def largest_fitting_search(fits: Callable[[int], bool], max_batch: int = MAX_BATCH) -> int | None:
    """The straightforward answer: exponential then binary search, one probe per step."""
    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
