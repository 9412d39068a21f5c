"""The CUDA caching allocator's figures for one step (part of POST /v1/memory's result)."""

from __future__ import annotations

from pydantic import Field

from planner.catalog.frozen import _Frozen

__all__ = ["CudaAllocatorPeaks"]


class CudaAllocatorPeaks(_Frozen):
    """What ``torch.cuda`` reports for the step, from the allocation sequence replayed through
    the caching allocator's rules (planner/machine/cuda_allocator.py)."""

    allocated_bytes: int = Field(
        ..., description="Steady-state peak of torch.cuda.max_memory_allocated(): the blocks "
        "handed out, which exceed the tensors' bytes (breakdown.total) by the allocator's rounding.")
    first_step_allocated_bytes: int = Field(
        ..., description="The same for the first step.")
    reserved_bytes: int = Field(
        ..., description="Peak of torch.cuda.max_memory_reserved(): the segments taken from the "
        "driver over three steps from a fresh process, what must fit in the GPU's memory.")
    segments: int = Field(..., description="cudaMalloc segments held at that peak.")
