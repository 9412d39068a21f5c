"""Request and result models of POST /v1/plan: a cluster's parallel layouts searched, each with
its per-device peak (the number POST /v1/memory gives for it), its fit and its step time.

Every input carries its documented limit (``le=``), so a search larger than the limits state is
refused with a 422 naming the field, never run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from planner.catalog.loss_specs import MAX_LOSS_CHUNKS, LossKind
from planner.catalog.specs import (
    MAX_SEQUENCE,
    Assumption,
    Breakdown,
    ModelSpec,
    OptimizerName,
    PipelineScheduleName,
    Precision,
    _Frozen,
)

MAX_PLAN_GPUS = 65_536  # GPUs of one cluster
MAX_PLAN_CLUSTER_SIZES = 16  # cluster sizes one request may sweep
MAX_GLOBAL_BATCH = 1 << 20  # sequences per optimizer step
MAX_PLAN_MICRO_BATCH = 64
MAX_PLAN_RESULTS = 100

PlanCheckpoint = Literal["none", "selective", "sqrt", "full"]
RejectReason = Literal[
    "tensor_parallel_does_not_divide_heads", "tensor_parallel_exceeds_node",
    "tensor_parallel_above_limit", "pipeline_deeper_than_limit", "pipeline_deeper_than_layers",
    "batch_not_divisible", "too_few_microbatches_for_schedule", "loss_not_replayed_by_layout",
    "model_states_exceed_memory", "peak_floor_exceeds_memory",
    "peak_exceeds_memory", "peak_exceeds_memory_implied", "dominated_not_evaluated",
    "over_budget",
]


class PlanTraining(_Frozen):
    """What is trained: the global batch (sequences or tokens) and the step's fixed choices."""

    global_batch_sequences: int | None = Field(
        None, ge=1, le=MAX_GLOBAL_BATCH, description="Sequences per optimizer step.")
    global_batch_tokens: int | None = Field(
        None, ge=1, le=MAX_GLOBAL_BATCH * MAX_SEQUENCE,
        description="Tokens per optimizer step (a multiple of sequence_length).")
    sequence_length: int = Field(4096, ge=1, le=MAX_SEQUENCE)
    precision: Precision = "mixed-bf16"
    optimizer: OptimizerName = "adamw"
    checkpoint_strategies: list[PlanCheckpoint] = Field(
        default_factory=lambda: ["none", "selective", "full"], min_length=1, max_length=4,
        description="Activation checkpointing strategies the search may use (POST /v1/memory's "
        "names).")
    loss_kinds: list[LossKind] = Field(
        default_factory=lambda: ["standard"], min_length=1, max_length=3,
        description="Loss kinds the search may use (training.loss.kind of POST /v1/memory); the "
        "chunked ones only on layouts that replay them (no tensor or pipeline parallelism).")
    loss_chunks: int = Field(8, ge=1, le=MAX_LOSS_CHUNKS,
                             description="Token chunks of the chunked loss kinds.")
    max_micro_batch_size: int = Field(
        8, ge=1, le=MAX_PLAN_MICRO_BATCH, description="Largest micro-batch tried (every divisor "
        "of the per-replica batch up to it).")
    train_tokens: int | None = Field(
        None, ge=1, le=10**16, description="Tokens to train: each layout's time_to_train_s.")

    @model_validator(mode="after")
    def _batch(self) -> "PlanTraining":
        if (self.global_batch_sequences is None) == (self.global_batch_tokens is None):
            raise ValueError("give exactly one of global_batch_sequences, global_batch_tokens")
        if self.global_batch_tokens is not None and self.global_batch_tokens % self.sequence_length:
            raise ValueError(f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple "
                             f"of sequence_length ({self.sequence_length})")
        if len(set(self.checkpoint_strategies)) != len(self.checkpoint_strategies):
            raise ValueError("checkpoint_strategies lists a strategy twice")
        if len(set(self.loss_kinds)) != len(self.loss_kinds):
            raise ValueError("loss_kinds lists a kind twice")
        return self

    @property
    def sequences(self) -> int:
        if self.global_batch_sequences is not None:
            return self.global_batch_sequences
        return self.global_batch_tokens // self.sequence_length


class PlanCluster(_Frozen):
    """The GPUs: a catalog name, a count (or a range of counts), and the links."""

    gpu: str = Field(..., description="Name from GET /v1/gpus, e.g. 'h100-80gb'.")
    num_gpus: int | None = Field(None, ge=1, le=MAX_PLAN_GPUS)
    min_gpus: int | None = Field(None, ge=1, le=MAX_PLAN_GPUS, description="With max_gpus: every "
                                 "power-of-two multiple of gpus_per_node in [min_gpus, max_gpus].")
    max_gpus: int | None = Field(None, ge=1, le=MAX_PLAN_GPUS)
    gpus_per_node: int = Field(8, ge=1, le=1024)
    intra_node_bytes_per_s: float | None = Field(
        None, gt=0, le=1e15, description="Per GPU, one direction; defaults to half the "
        "catalog's interconnect bandwidth (a both-directions figure).")
    inter_node_bytes_per_s: float | None = Field(
        None, gt=0, le=1e15, description="Per GPU, one direction; defaults to the catalog's "
        "network_bytes_per_s.")
    model_flops_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of the dense 16-bit peak the matmuls reach; "
        "defaults per GPU kind (see assumptions).")
    price_per_gpu_hour: float | None = Field(
        None, gt=0, le=10**4, description="What one GPU-hour costs (any currency): each "
        "layout's cost_to_train, and constraints.max_cost.")

    @model_validator(mode="after")
    def _count(self) -> "PlanCluster":
        if (self.num_gpus is None) == (self.min_gpus is None or self.max_gpus is None):
            raise ValueError("give num_gpus, or both min_gpus and max_gpus")
        if self.min_gpus is not None and self.max_gpus is not None and self.min_gpus > self.max_gpus:
            raise ValueError(f"min_gpus ({self.min_gpus}) exceeds max_gpus ({self.max_gpus})")
        return self

    def counts(self) -> list[int]:
        if self.num_gpus is not None:
            return [self.num_gpus]
        out, n = [], self.gpus_per_node
        while n <= self.max_gpus:
            if n >= self.min_gpus:
                out.append(n)
            n *= 2
        return out or [self.min_gpus]


class PlanConstraints(_Frozen):
    """Limits on the layouts searched."""

    tensor_parallel_within_node: bool = True
    max_tensor_parallel: int = Field(64, ge=1, le=1024)
    max_pipeline_parallel: int = Field(64, ge=1, le=1024)
    zero_stages: list[Literal[0, 1, 2, 3]] = Field(
        default_factory=lambda: [0, 1, 2, 3], min_length=1, max_length=4)
    allow_offload: bool = Field(False, description="Also try CPU offload of optimizer states "
                                "(ZeRO >= 1) and of parameters (ZeRO-3).")
    pipeline_schedules: list[Literal["1f1b", "interleaved-1f1b"]] = Field(
        default_factory=lambda: ["1f1b", "interleaved-1f1b"], min_length=1, max_length=2)
    max_virtual_stages: int = Field(4, ge=2, le=16)
    top_k: int = Field(10, ge=1, le=MAX_PLAN_RESULTS, description="Ranked layouts returned.")
    max_cost: float | None = Field(
        None, gt=0, le=1e15, description="Budget to train training.train_tokens, in the currency "
        "of cluster.price_per_gpu_hour: layouts (and cluster sizes) that would cost more are "
        "left out (rejected as over_budget).")


class PlanRequest(_Frozen):
    model: ModelSpec
    training: PlanTraining
    cluster: PlanCluster
    constraints: PlanConstraints = Field(default_factory=PlanConstraints)


class StepTime(_Frozen):
    """One optimizer step on the slowest pipeline rank, in seconds, by where the time goes."""

    compute_s: float = Field(..., description="Matmul and attention FLOPs (recompute included) "
                             "at the assumed utilisation, plus the memory-bound elementwise "
                             "work at the GPU's memory bandwidth.")
    tensor_parallel_s: float = Field(..., description="TP all-reduces (all-gather/reduce-scatter "
                                     "with sequence parallelism), on the critical path.")
    data_parallel_s: float = Field(..., description="Exposed DP/ZeRO gradient and parameter "
                                   "collectives (what backward does not hide).")
    pipeline_p2p_s: float = Field(..., description="Exposed stage-to-stage sends (in the "
                                  "simulated makespan).")
    expert_parallel_s: float = Field(0.0, description="All-to-all of MoE layers (0 for dense "
                                     "models and expert_parallel 1).")
    offload_s: float = Field(..., description="Offload: the host CPU's optimizer step and the "
                             "host-link transfers it does not hide.")
    bubble_s: float = Field(..., description="Pipeline bubble: the simulated makespan minus the "
                            "slowest rank's busy time.")
    step_s: float


class PlanLayout(_Frozen):
    """One layout with its memory and time."""

    num_gpus: int
    data_parallel: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline_stages: int
    pipeline_schedule: PipelineScheduleName
    expert_parallel: int = 1
    zero_stage: int
    offload_optimizer: bool
    offload_parameters: bool
    activation_checkpointing: PlanCheckpoint
    loss: LossKind = "standard"
    micro_batch_size: int
    gradient_accumulation_steps: int
    peak_bytes: int = Field(..., description="Per-device peak: POST /v1/memory's "
                            "breakdown.total for this layout.")
    breakdown: Breakdown
    allocator_reserve_bytes: int
    fits: bool
    headroom_bytes: int
    time: StepTime
    tokens_per_s: float
    model_flops_utilization: float = Field(..., description="Model FLOPs (6N + 12·l·h·s per "
                                           "token, no recompute) over the cluster's peak.")
    time_to_train_s: float | None = None
    cost_to_train: float | None = Field(None, description="num_gpus x time_to_train_s x "
                                        "cluster.price_per_gpu_hour / 3600.")
    pareto: bool = Field(False, description="On the memory/time Pareto front of fitting layouts.")


class PlanSearch(_Frozen):
    """How large the search was and where candidates fell out."""

    space_size: int = Field(..., description="Layouts enumerated (every cluster size).")
    pruned_by_bound: int = Field(..., description="Refused by an exact lower bound without a "
                                 "memory estimate: the model states (dense models), the peak "
                                 "floor of model states, optimizer scratch and activations (MoE).")
    evaluated: int = Field(..., description="Layouts whose peak the planner computed.")
    rejected: dict[RejectReason, int] = Field(
        ..., description="Candidates that are not in the answer, by reason (a layout that fits "
        "but is neither among the top_k nor on the Pareto front is not counted).")
    seconds: float


class PlanClusterResult(_Frozen):
    num_gpus: int
    layouts: list[PlanLayout] = Field(..., description="Fitting layouts, fastest first.")
    pareto_front: list[PlanLayout] = Field(..., description="Fitting layouts no other beats "
                                           "in both peak memory and step time, lowest peak first.")
    search: PlanSearch


class PlanResult(_Frozen):
    clusters: list[PlanClusterResult]
    assumptions: list[Assumption]
    notes: list[str] = Field(default_factory=list)

