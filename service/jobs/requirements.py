"""What a validation job needs from a worker, from the planner's estimate (pure, no torch)."""

from __future__ import annotations

from planner.specs import MemoryRequest, ValidationRequest
from service.jobs.store import Requirements


def memory_request(request: ValidationRequest) -> MemoryRequest:
    return MemoryRequest(model=request.model, training=request.training,
                         parallelism=request.parallelism, hardware=request.hardware)


def ranks_needed(request: ValidationRequest) -> int:
    p = request.parallelism
    return p.data_parallel * p.tensor_parallel * p.pipeline_parallel


def requirements_for(request: ValidationRequest) -> Requirements:
    """Ranks, per-device peak (estimate + allocator reserve), device class and GPU kind.

    A traced job allocates nothing (FakeTensorMode), so it claims no device memory. A GPU kind is
    required only when the request asks for CUDA: ``hardware.gpu`` on a CPU or 'auto' request is
    the device the estimate is fitted to, not a placement constraint.
    """
    from planner.memory import estimate_memory  # the planner's single memory model

    estimate = estimate_memory(memory_request(request))
    peak = 0
    if request.mode == "real":
        peak = estimate.breakdown.total + estimate.allocator_reserve_bytes
    gpu_kind = None
    if request.device == "cuda" and request.hardware is not None and request.hardware.gpu:
        gpu_kind = request.hardware.gpu
    needs = request.device if request.device in ("cpu", "cuda") else "any"
    return Requirements(ranks=ranks_needed(request), peak_bytes=peak, needs=needs,
                        gpu_kind=gpu_kind)
