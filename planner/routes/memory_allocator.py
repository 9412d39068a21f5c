"""The caching allocator's share of POST /v1/memory's answer: what the device reserves on top of
the tensors' peak.

By default the reserve is assumed: none on CPU, a fixed fraction of the peak on CUDA
(``planner.catalog.presets.allocator_reserve``). With ``hardware.allocator: "replay"`` a
single-device reference step's allocations are fed through PyTorch's caching allocator
(``planner/step/allocator_replay.py``) and the reserve is its reserved peak less the tensors'
peak; ``memory`` states which of the three it used (``_RESERVE_CPU``, ``_RESERVE_CUDA``,
``_RESERVE_SIMULATED``) and reports the replay's figures as ``cuda_allocator``.
"""

from __future__ import annotations

from planner.catalog.allocator_specs import CudaAllocatorPeaks
from planner.catalog.presets import ALLOCATOR_RESERVE_FRACTION
from planner.catalog.specs import Assumption, ParallelSpec, ResolvedModel, TrainingSpec
from planner.layouts.compose import single_device
from planner.step.allocator_replay import allocator_peaks


_RESERVE_NOTE = "caching-allocator rounding and fragmentation, on top of the allocated peak"


_RESERVE_CPU = Assumption(name="allocator_reserve", value="0", note=_RESERVE_NOTE)


_RESERVE_CUDA = Assumption(name="allocator_reserve",
                           value=f"{ALLOCATOR_RESERVE_FRACTION:.0%} of peak", note=_RESERVE_NOTE)


_RESERVE_SIMULATED = Assumption(
    name="allocator_reserve", value="simulated",
    note="PyTorch's CUDA caching allocator (default settings) replayed over the step's "
         "allocations for three steps from a fresh process: max_memory_reserved() - the "
         "tensors' peak")


def _cuda_allocator(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
                    ckpt, first) -> CudaAllocatorPeaks | None:
    """The caching allocator's figures for a single-device reference step on CUDA (None where
    the step is not replayed tensor by tensor, or the replay would be too long)."""
    if device == "cpu" or first is None or tr.implementation != "reference" \
            or not model.architecture_known or not single_device(par):
        return None
    p = allocator_peaks(model, tr, frozenset(ckpt))
    if p is None:
        return None
    return CudaAllocatorPeaks(allocated_bytes=p.allocated,
                              first_step_allocated_bytes=p.first_step_allocated,
                              reserved_bytes=p.reserved, segments=p.segments)
