"""What a validation job needs from a worker, from the planner's estimate (pure, no torch), and
what the runner would refuse whatever worker took it."""

from __future__ import annotations

from planner.catalog.specs import MemoryRequest, ValidationRequest
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
    from planner.routes.memory import estimate_memory  # the planner's single memory model

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


# Which request field a runner refusal is about, by what the refusal says (first match); the
# refusal's own text is the detail.
_REFUSAL_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss kind", "body.training.loss.kind"),
    ("num_parameters model", "body.model"),
    ("tied embeddings", "body.model.tie_embeddings"),
    ("stages need at least", "body.model"),
    ("runs precision", "body.training.precision"),
    ("fp16 loss scaling", "body.training.precision"),
    ("FakeTensorMode", "body.mode"),
    ("tensor_parallel > 1", "body.parallelism.tensor_parallel"),
    ("tensor and pipeline parallelism", "body.parallelism"),
    ("data_parallel = tensor_parallel = 1", "body.parallelism"),
    ("ZeRO", "body.parallelism.zero_stage"),
    ("offload", "body.parallelism"),
    ("virtual_pipeline_stages", "body.parallelism.virtual_pipeline_stages"),
    ("schedule", "body.parallelism.pipeline_schedule"),
    ("optimizer", "body.training.optimizer"),
    ("adafactor", "body.training.optimizer"),
    ("implementation", "body.training.implementation"),
    ("LoRA", "body.training.lora"),
    ("override", "body.training.precision_overrides"),
    ("precision", "body.training.precision"),
    ("checkpointing", "body.training.activation_checkpointing"),
    ("dropout", "body.training.dropout"),
)


def runner_refusal(request: ValidationRequest) -> tuple[str, str] | None:
    """(field, reason) when the reference runner refuses this request whatever worker runs it
    (the runner's own ``check_supported``, from the request alone); None when it runs it.

    Torch-free for single-device requests; a multi-rank one is checked by the multi-rank or
    pipelined runner's check, whose module loads torch (once, in the API process)."""
    from service.validation.support import ValidationUnsupported, check_supported

    try:
        check_supported(request)
    except ValidationUnsupported as exc:
        reason = str(exc)
        field = getattr(exc, "field", None) or next(
            (f for key, f in _REFUSAL_FIELDS if key in reason), "body")
        return field, f"the validation runner would refuse this job: {reason}"
    return None
