"""A floor under a setup's memory need at every micro-batch, shared by layouts that keep its
activations.

The reference step's highest live activation bytes are the same under every ZeRO stage, with
or without offload, on any number of data-parallel ranks (``plan_suggest.keeps_activations``,
held by ``tests/test_fit_shortcuts.py``), and they are at most the step's peak. So the
single-device step's activation maximum at micro-batch b, plus its allocator reserve (which
grows with what it covers), is at most the need (peak plus reserve) of every such layout at b.
POST /v1/zero estimates one setup under six layouts, each with a largest-fitting-micro-batch
search. The single-device step's template is compiled first (the two offload variants
estimate that step anyway), and its floor at b = 2 often settles it: when that is already
above the memory, no size from 2 up fits any layout, and each layout is estimated at the
request's micro-batch and at 1 only (no template of its own would pay), at 1 only when the
single-device step's floor there, replayed once, does not already rule it out. Otherwise the
template gives the floor at every size: a size whose floor exceeds the memory is known
not to fit under any layout without estimating it, and a layout whose search can only ask
sizes below the first such size compiles its own template only when they are enough to pay
for it. The answers are the same (the floor only decides what is estimated; a size it rules
out is one the search would have found not to fit: ``tests/test_activation_floor.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import MAX_BATCH, ParallelSpec, ResolvedModel, TrainingSpec
from planner.machine import cache
from planner.routes.plan_suggest import keeps_activations
from planner.step import simulate as step_cache

__all__ = ["ActivationFloor", "build_floor", "floor_for", "shared_floor"]

_FLOOR: contextvars.ContextVar[ActivationFloor | None] = contextvars.ContextVar(
    "activation_floor", default=None)


class ActivationFloor:
    """``floor(b)``: the single-device step's activation maximum at micro-batch b plus its
    reserve (None where its template does not cover b). b = 1, a template domain of its own,
    is replayed when first asked where b = 2 is already over the memory (every layout's search
    then asks it), so the layouts' searches do not each replay b = 1 when the floor alone rules
    it out."""

    def __init__(self, model: ResolvedModel, tr: TrainingSpec, device: str,
                 ckpt: frozenset[int]) -> None:
        self.model, self.tr, self.device, self.ckpt = model, tr, device, ckpt
        self._memo: dict[int, int | None] = {}
        self.over_at_two = False  # b = 2 is over the memory: every layout's search asks b = 1

    def applies(self, model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
                ckpt) -> bool:
        """Whether it bounds this setup: the same model, training, device and checkpointed
        blocks, on a layout that keeps the single-device step's activations."""
        return (keeps_activations(tr, par) and device == self.device
                and frozenset(ckpt) == self.ckpt and (model is self.model or model == self.model)
                and (tr is self.tr or tr == self.tr))

    def __call__(self, b: int) -> int | None:
        if b == 1:  # a domain of its own: replayed once where every layout's search asks it
            return self.measure(1) if self.over_at_two else None
        if b not in self._memo:
            tpl = step_cache.compiled_template(self.model, self.tr, self.device, self.ckpt, b)
            act = None
            if tpl is not None:
                act = tpl.evaluate(b, self.tr.sequence_length).act_max.total
            self._memo[b] = None if act is None else self._with_reserve(act)
        return self._memo[b]

    def _with_reserve(self, act: int) -> int:
        return act + allocator_reserve(act, self.device)

    def measure(self, b: int) -> int:
        """The floor at b from the step replayed (memoised) at that size."""
        if self._memo.get(b) is None:
            tr = self.tr.model_copy(update={"micro_batch_size": b})
            peaks = step_cache.simulate(self.model, tr, self.device, self.ckpt)
            self._memo[b] = self._with_reserve(peaks.act_max.total)
        return self._memo[b]

    def first_over(self, mem_bytes: int) -> int | None:
        """The smallest b >= 2 whose floor exceeds ``mem_bytes`` (the floor is non-decreasing
        in b: every live tensor is), None when none up to MAX_BATCH does or a size is not
        covered."""
        two = self._memo.get(2) or self(2)
        if two is not None and two > mem_bytes:
            return 2
        top = self(MAX_BATCH)
        if top is None or top <= mem_bytes:
            return None
        lo, hi = 1, MAX_BATCH  # floor(hi) > mem; lo: below every b >= 2 that exceeds it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            f = self(mid)
            if f is None:
                return None
            if f > mem_bytes:
                hi = mid
            else:
                lo = mid
        return hi


def build_floor(model: ResolvedModel, tr: TrainingSpec, device: str, ckpt: frozenset[int],
                mem_bytes: int) -> ActivationFloor | None:
    """The floor of a setup for a memory of ``mem_bytes``: its single-device step's template
    compiled now (the offload variants estimate that step at the request's micro-batch anyway,
    so a compile costs less than the replay at b = 2 and that one: one compile instead of two
    replays where b = 2 is over, one replay fewer where it is not); its floor at b = 2 settles
    every b >= 2 when it is already over (the common case of a search that ends at 1 or None).
    Where no template comes (a setup found size-dependent, templates off) the step replayed at
    b = 2 still settles that case; None otherwise."""
    if tr.implementation != "reference" or not model.architecture_known:
        return None
    floor = ActivationFloor(model, tr, device, ckpt)
    with cache.compile_first():
        step_cache.simulate(model, tr, device, ckpt)
    if tr.micro_batch_size >= 2:
        two = floor(2)
        if (two if two is not None else floor.measure(2)) > mem_bytes:
            floor.over_at_two = True
            return floor
    return floor if floor(max(2, tr.micro_batch_size)) is not None else None


@contextlib.contextmanager
def shared_floor(floor: ActivationFloor | None) -> Iterator[None]:
    """Inside, estimates of the floor's setup read it (``floor_for``)."""
    token = _FLOOR.set(floor)
    try:
        yield
    finally:
        _FLOOR.reset(token)


def floor_for(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              ckpt) -> ActivationFloor | None:
    """The shared floor when it bounds this setup, else None."""
    floor = _FLOOR.get()
    if floor is None or not floor.applies(model, tr, par, device, ckpt):
        return None
    return floor
