"""``fit.max_micro_batch_size`` for ``training.implementation: "transformers"``: the largest
micro-batch whose traced peak (plus the allocator reserve) fits the device.

Each size's peak is a traced step (planner/hf/estimate.py: three proxies, or the whole model),
so the number of sizes traced is what the search costs. The exact reasoning that bounds it: the
step runs the same ops at every micro-batch b and every tensor it allocates is affine in b (b·s
rows of activations, b·s·k token-expert pairs, the loss over b·s tokens; parameters, gradients
and optimizer states constant; the expert-parallel composition adds constants and the b-affine
all-to-all buffer), so the live bytes at every point of a phase are affine in b and each phase's
peak (forward, backward, optimizer), their maximum, is convex and non-decreasing in b, for b >= 2:
at b = 1 a size-1 batch dimension lets some layouts stay contiguous where b >= 2 copies them
(a 2-block Mistral at s = 64: its forward peak grows by 512 bytes more from 1 to 2 than from 2 to
3; tests/test_hf_micro_batch.py), so b = 1 is never a secant point. Hence, per
phase, the secant through two traced sizes is a lower bound of that phase's peak beyond them and
an upper bound between them, exact on a linear piece. With T the largest peak whose peak plus
reserve fits:

- from the two largest traced sizes that fit, the first size at which some phase's secant
  passes T does not fit (an upper bound on the answer);
- between the largest traced size that fits and the smallest that does not, every size at which
  all phases' secants stay at or below T fits (a lower bound).

The search traces the request's size's successor (and 2 and 3 when the request's size is 1),
then the size the bounds point at and its successor: three sizes besides the request's where no phase's peak changes op in between, a few
more where one does (Mistral-7B at s = 1024 on an 80 GB GPU: the backward peak moves from a
``mul`` to the loss's ``_log_softmax_backward_data`` and grows faster; the search traces 2, 3,
60 (over), 52 (proven to fit), 53, 55, 56: 55) (bisection when the bracket does not halve; doubling while every phase is
flat). The answer is never taken from the bounds alone: the reported size is traced and fits,
the next size is traced and does not (or is past the largest micro-batch allowed).
tests/test_hf_micro_batch.py holds the answer equal to the exhaustive search and the boundary
to real CPU runs of the step. The peak per phase, not the overall peak, is what makes the
prediction exact: at small sizes the overall peak is often the optimizer step's, flat in b.

The search runs under the request's work limit (MEMPLAN_TRANSFORMERS_DEADLINE_S): when the limit
is spent mid-search, the answer keeps its peak and leaves ``max_micro_batch_size`` out with a note
(the sizes traced so far stay cached, so asking again finishes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from planner.catalog.errors import PlanningError
from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import MAX_BATCH, Assumption
from planner.machine.deadline import WorkLimitExceeded


@dataclass
class Search:
    largest: int | None = None
    traced: list[int] = field(default_factory=list)  # sizes traced by the search, in order
    note: str | None = None

    def assumption(self) -> Assumption:
        sizes = ", ".join(map(str, sorted(self.traced))) or "none"
        return Assumption(
            name="max_micro_batch_search", value=f"{len(self.traced)} more sizes traced",
            note=f"sizes traced besides the request's: {sizes}; each phase's peak convex and "
            "non-decreasing in the micro-batch (every tensor affine in it): per-phase secant "
            "bounds predict the boundary; the reported size and the next are traced")


def budget_total(mem_bytes: int, device: str) -> int:
    """T: the largest peak t with t + allocator_reserve(t) <= mem_bytes (-1 when none)."""
    lo, hi = -1, mem_bytes + 1  # need(lo) fits (or lo = -1); need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid + allocator_reserve(mid, device) <= mem_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def _below_line(v0: int, v1: int, x0: int, x1: int, T: int) -> int | None:
    """The largest b with v0 + (b - x0)·(v1 - v0)/(x1 - x0) <= T; None when the line does not
    rise (never passes T beyond x0 when v0 <= T)."""
    if v1 <= v0:
        return None
    return x0 + (T - v0) * (x1 - x0) // (v1 - v0)


def largest(peaks_at: Callable[[int], dict[str, int]], T: int, start: int,
            start_peaks: dict[str, int], max_batch: int = MAX_BATCH) -> int | None:
    """Largest b in 1..max_batch whose phase peaks are all <= T (module docstring);
    ``peaks_at(b)``: {phase: peak bytes}; ``start``: a size already traced."""
    memo = {start: start_peaks}

    def top(b: int) -> int:
        if b not in memo:
            memo[b] = peaks_at(b)
        return max(memo[b].values())

    if top(start) > T and top(1) > T:
        return None
    lo = max(b for b in memo if top(b) <= T)
    hi = min([b for b in memo if top(b) > T] + [max_batch + 1])

    def probe(b: int) -> None:
        nonlocal lo, hi
        if top(b) <= T:
            lo = max(lo, b)
        else:
            hi = min(hi, b)

    for _ in range(2):  # two fitting sizes >= 2 for the secants (b = 1: module docstring)
        if len([b for b in memo if 2 <= b <= lo]) >= 2 or lo + 1 >= hi:
            break
        probe(lo + 1)
    while hi - lo > 1:
        width = hi - lo
        fits = sorted(b for b in memo if 2 <= b <= lo)
        g = (lo + hi) // 2
        if len(fits) >= 2:  # lower bounds beyond the two largest fitting sizes
            x0, x1 = fits[-2], fits[-1]
            cuts = [_below_line(memo[x0][p], memo[x1][p], x0, x1, T) for p in memo[x1]]
            cuts = [c for c in cuts if c is not None]
            g = min(cuts + [hi - 1]) if cuts else min(2 * lo, hi - 1)
        if hi in memo and lo >= 2:  # upper bounds between lo and hi: the largest proven to fit
            ups = [_below_line(memo[lo][p], memo[hi][p], lo, hi, T) for p in memo[hi]]
            proven = min([u for u in ups if u is not None] + [hi - 1])
            if proven > lo:
                g = min(g, max(proven, lo + 1))
        g = min(max(g, lo + 1), hi - 1)
        probe(g)
        if lo == g and g + 1 < hi:  # it fits: does the next one?
            probe(g + 1)
        if hi - lo > width // 2 and hi - lo > 1:  # little progress: bisect once
            probe((lo + hi) // 2)
    return lo


def max_micro_batch(phases_at: Callable[[int], dict], mem_bytes: int, device: str,
                    micro_batch_size: int, phases: dict) -> Search:
    """The largest fitting micro-batch; ``phases_at(b)``: the composed steady phase peaks
    ({phase: (breakdown, op)}) at micro-batch b; ``phases``: the request's own."""
    out = Search()

    def peaks(ph: dict) -> dict[str, int]:
        return {n: bd["total"] for n, (bd, _) in ph.items()}

    def peaks_at(b: int) -> dict[str, int]:
        out.traced.append(b)
        return peaks(phases_at(b))

    try:
        out.largest = largest(peaks_at, budget_total(mem_bytes, device), micro_batch_size,
                              peaks(phases))
    except WorkLimitExceeded as exc:
        if not exc.expired:  # cancelled, or a caller's own signal (e.g. move to a thread)
            raise
        out.note = (f"max_micro_batch_size: the search stopped at the work limit ({exc.detail}) "
                    f"after tracing micro-batch sizes {', '.join(map(str, out.traced))}; they "
                    "stay cached: ask again to finish it")
    except PlanningError as exc:
        out.note = (f"max_micro_batch_size: not searched: the step at micro-batch "
                    f"{out.traced[-1]} fails ({exc})")
    return out
