"""What a validation job reports, and the job itself as the API lists it.

A job runs the reference training step (or the transformers step) for a ``ValidationRequest``
(planner/catalog/specs.py: a memory request plus how to run it) and compares the measurement with
the estimate: ``ValidationResult`` holds both breakdowns, their relative error per category, and,
for more than one rank, every rank's figures (``RankResult``) or, for a pipelined step, each
pipeline rank against the pipeline simulator (``PipelineValidation``). ``ValidationJob`` is the
job's record (status, progress, request, result), ``ValidationPage`` a page of the job list.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from planner.catalog.frozen import _Frozen
from planner.catalog.result_specs import Breakdown
from planner.catalog.specs import PipelineScheduleName, ValidationRequest

__all__ = [
    "JobStatus", "PipelineRankComparison", "PipelineValidation", "Progress", "RankResult",
    "RelativeError", "ValidationJob", "ValidationPage", "ValidationResult", "relative_error",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RelativeError(_Frozen):
    """(estimate - measured) / measured per category; None where measured is 0 and estimate is 0."""

    parameters: float | None
    gradients: float | None
    optimizer_states: float | None
    activations: float | None
    temporaries: float | None
    total: float | None


class RankResult(_Frozen):
    rank: int
    estimate: Breakdown
    measured: Breakdown
    relative_error: RelativeError


class PipelineRankComparison(_Frozen):
    """One pipeline rank of a pipelined validation: measured against the simulator."""

    rank: int
    stages: list[int] = Field(..., description="The (virtual) stages this rank runs.")
    action_order_matches: bool = Field(
        ..., description="The rank's F/I/W/B actions ran in exactly the simulator's order.")
    first_mismatch: int | None = Field(
        None, description="Index of the first action that differs (None when the orders match).")
    in_flight_measured: int = Field(
        ..., description="Peak activation sets (stage, micro-batch) the rank's stages held, read "
        "from torch's stage caches after every action.")
    in_flight_simulated: int = Field(..., description="The simulator's peak for this rank.")
    busy_s_measured: float = Field(..., description="Sum of the timed stage computations.")
    busy_s_simulated: float = Field(
        ..., description="The simulator's busy time with the measured per-stage F/I/W medians.")
    idle_s_measured: float = Field(..., description="Measured makespan - busy.")
    idle_s_simulated: float
    step_s_measured: float = Field(
        ..., description="Wall time of the timed step on this rank (schedule and optimizer).")
    peak_memory: Breakdown = Field(
        ..., description="Measured steady-state peak of this rank, by category.")
    peak_op: str | None = None
    peak_phase: str | None = None
    cuda_allocated_bytes: int | None = Field(
        None, description="CUDA only: the allocator's max_memory_allocated over the step.")


class PipelineValidation(_Frozen):
    """A real pipelined step (torch.distributed.pipelining under torchrun) against the pipeline
    simulator fed with the per-stage F, I and W times measured in the same run."""

    schedule: PipelineScheduleName
    stages: int = Field(..., description="Pipeline ranks.")
    virtual_stages: int = Field(..., description="Stages per rank.")
    microbatches: int
    action_order_matches: bool = Field(..., description="Every rank's action order matches.")
    in_flight_matches: bool = Field(
        ..., description="Every rank's measured peak in-flight micro-batches equals the "
        "simulator's.")
    makespan_s_measured: float = Field(
        ..., description="First action start to last action end over all ranks.")
    makespan_s_simulated: float
    makespan_relative_error: float | None = Field(
        None, description="(simulated - measured) / measured.")
    bubble_fraction_simulated: float
    forward_s: list[float] = Field(..., description="Measured median F per stage (fed to the "
                                   "simulator).")
    backward_input_s: list[float] = Field(
        ..., description="Measured median I per stage (a full backward B where the schedule does "
        "not split it).")
    backward_weight_s: list[float] = Field(..., description="Measured median W per stage (0 "
                                           "where the backward is not split).")
    ranks: list[PipelineRankComparison]
    memory_note: str = Field(..., description="What the top-level estimate and measurement "
                             "compare.")


class ValidationResult(_Frozen):
    device: str = Field(
        ..., description="Where it ran, e.g. 'cpu', 'cuda:0 (NVIDIA H100 80GB HBM3)'.")
    mode: Literal["real", "traced"]
    estimate: Breakdown
    measured: Breakdown
    relative_error: RelativeError
    first_step_estimate: Breakdown | None = None
    first_step_measured: Breakdown | None = None
    peak_op: str | None = Field(None, description="The op that allocated the peak's last tensor.")
    peak_phase: str | None = None
    step_time_s: float | None = Field(
        None, description="Median step time after warm-up (real mode).")
    max_reserved_bytes: int | None = Field(None, description="CUDA only: allocator reserved peak.")
    num_alloc_retries: int | None = None
    ranks: list[RankResult] | None = Field(None, description="Per-rank figures for world size > 1.")
    worst_rank: int | None = Field(
        None, description="World size > 1: the rank with the highest estimated steady-state peak "
        "(the rank POST /v1/memory reports; ties to the lowest rank). estimate and "
        "first_step_estimate are this rank's. A pipelined job whose estimate is composed, not "
        "replayed per rank, names the measured one.")
    worst_measured_rank: int | None = Field(
        None, description="World size > 1: the rank with the highest measured steady-state peak "
        "(ties to the lowest rank). measured, first_step_measured, peak_op, peak_phase and "
        "max_reserved_bytes are this rank's; relative_error compares the two worst ranks' peaks.")
    checkpointed_blocks: list[int] | None = Field(
        None, description="Blocks run under torch.utils.checkpoint (a 'budget' plan as resolved "
        "by the planner on the worker's device).")
    step_time_ratio: float | None = Field(
        None, description="Measured step time / that of the same setup without checkpointing, "
        "both measured in this job (real mode, some block checkpointed).")
    planned_step_time_ratio: float | None = Field(
        None, description="1 + the planner's recompute time fraction (POST /v1/checkpointing).")
    pipeline: PipelineValidation | None = Field(
        None, description="pipeline_parallel > 1: the real pipelined step against the simulator.")


class Progress(_Frozen):
    phase: str = "queued"
    step: int = 0
    total_steps: int = 0


class ValidationJob(_Frozen):
    id: str
    status: JobStatus
    progress: Progress
    request: ValidationRequest
    result: ValidationResult | None = None
    error: str | None = None
    attempts: int = 0
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    waiting_reason: str | None = Field(
        None, description="While queued: why no live worker can run this job (its device kind, "
        "ranks or memory, with what the live workers have); None when one can, or when the job "
        "is not queued.")


class ValidationPage(_Frozen):
    items: list[ValidationJob]
    next_cursor: str | None = None


def relative_error(estimate: Breakdown, measured: Breakdown) -> RelativeError:
    def rel(e: int, m: int) -> float | None:
        if m == 0:
            return 0.0 if e == 0 else None
        return (e - m) / m
    keys = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")
    return RelativeError(**{k: rel(getattr(estimate, k), getattr(measured, k)) for k in keys})
