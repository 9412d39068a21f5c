"""POST /v1/checkpointing's request and result.

A request is one of three forms, a training setup, an explicit ``chain`` of profiled per-block
costs or a Revolve problem, with the placement strategy to apply; its validator refuses a
request that mixes them or leaves one incomplete. The result is the plan with its peak, its
recompute cost and the ``activation_checkpointing`` object that applies it. ``checkpointing``
answers the one with the other; a chain's blocks (``ChainBlock``) and the byte and block limits
are ``checkpoint_solvers``' own.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.catalog.specs import (
    ActivationCheckpointing,
    Assumption,
    Breakdown,
    HardwareSpec,
    ModelSpec,
    ParallelSpec,
    TrainingSpec,
)
from planner.routes.checkpoint_solvers import MAX_BYTES, MAX_CHAIN_BLOCKS, ChainBlock

__all__ = ["CheckpointRequest", "CheckpointResult", "MAX_REVOLVE_SLOTS", "MAX_REVOLVE_STEPS",
           "Strategy"]

MAX_REVOLVE_STEPS = 100_000
MAX_REVOLVE_SLOTS = 10_000

Strategy = Literal["none", "full", "every-k", "sqrt", "selective", "budget", "blocks", "revolve"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CheckpointRequest(_Frozen):
    """A setup, an explicit chain, or a Revolve problem, and a placement strategy."""

    strategy: Strategy | None = Field(
        None, description="Default: training.activation_checkpointing.strategy for a setup, "
        "'budget' for a chain.")
    budget_bytes: int | None = Field(
        None, ge=1, le=MAX_BYTES, description="For 'budget': peak bytes per device (default: "
        "training.activation_checkpointing.budget_bytes, else the hardware's memory).")
    every_k: int | None = Field(None, ge=1, le=MAX_CHAIN_BLOCKS, description="For 'every-k'.")
    blocks: list[Annotated[int, Field(ge=0, lt=MAX_CHAIN_BLOCKS)]] | None = Field(
        None, max_length=MAX_CHAIN_BLOCKS, description="For 'blocks': the checkpointed block "
        "indices to evaluate (a setup also takes training.activation_checkpointing.blocks).")
    model: ModelSpec | None = None
    training: TrainingSpec | None = None
    parallelism: ParallelSpec | None = None
    hardware: HardwareSpec | None = None
    device: Literal["cuda", "cpu"] = Field(
        "cuda", description="Setup: the reference step's kernels the peaks describe ('cpu' for a "
        "validation job on a CPU worker; the layer-norm statistics dtype differs).")
    chain: list[ChainBlock] | None = Field(
        None, min_length=1, max_length=MAX_CHAIN_BLOCKS, description="Profiled per-block costs.")
    base_bytes: int = Field(0, ge=0, le=MAX_BYTES, description="With a chain: bytes resident "
                            "for the whole step (model states).")
    tail_bytes: int = Field(0, ge=0, le=MAX_BYTES, description="With a chain: what the loss head "
                            "holds on top of all stored activations.")
    num_steps: int | None = Field(None, ge=1, le=MAX_REVOLVE_STEPS, description="Revolve: l.")
    slots: int | None = Field(None, ge=1, le=MAX_REVOLVE_SLOTS,
                              description="Revolve: c, the initial state's slot included.")

    @model_validator(mode="after")
    def _one_form(self) -> CheckpointRequest:
        setup = any(v is not None for v in (self.model, self.training, self.parallelism))
        revolve = self.strategy == "revolve" or self.num_steps is not None or self.slots is not None
        if sum([setup, self.chain is not None, revolve]) != 1:
            raise ValueError("give exactly one of: a setup (model, training, parallelism), "
                             "a chain, or strategy 'revolve' with num_steps and slots")
        if revolve and (self.strategy != "revolve" or self.num_steps is None or self.slots is None):
            raise ValueError("revolve needs strategy 'revolve', num_steps and slots")
        if setup and self.model is None:
            raise ValueError("a setup needs a model")
        if self.chain is not None:
            total = (self.base_bytes + self.tail_bytes
                     + sum(b.saved_bytes + b.grad_bytes for b in self.chain)
                     + max(b.transient_bytes for b in self.chain))
            if total > MAX_BYTES:
                raise ValueError(f"base + tail + all saved and gradient + largest transient bytes "
                                 f"must be at most 2^62 (got {total})")
        return self


class CheckpointResult(_Frozen):
    strategy: Strategy
    num_blocks: int | None = Field(None, description="Blocks in the chain (the model's layers).")
    checkpointed_blocks: list[int] = Field(default_factory=list)
    segments: list[tuple[int, int]] = Field(
        default_factory=list, description="Runs [first, last] of consecutive checkpointed blocks "
        "(each block is its own checkpoint call).")
    activation_peak_bytes: int | None = Field(
        None, description="Setup: the highest live activation bytes at any instant of forward "
        "and backward (POST /v1/memory's activation_peak_bytes), whether or not the step's peak "
        "falls there: what checkpointing lowers. Chain: the peak above base_bytes.")
    forward_backward_peak_bytes: int | None = Field(
        None, description="Setup: the highest total of forward and backward (model states "
        "included; POST /v1/memory's forward_backward_peak). Below total_peak_bytes when the "
        "optimizer step holds the step's peak, which no placement changes.")
    total_peak_bytes: int | None = Field(None, description="The step's peak including model "
                                         "states (the allocated peak; allocator reserve not "
                                         "included).")
    breakdown: Breakdown | None = Field(
        None, description="Setup: the peak by category, as POST /v1/memory gives it.")
    allocator_reserve_bytes: int | None = Field(
        None, description="Setup: allocator overhead assumed on top (0 on CPU); a budget must hold "
        "total_peak_bytes + allocator_reserve_bytes.")
    peak_phase: str | None = None
    budget_bytes: int | None = None
    fits: bool | None = None
    min_achievable_peak_bytes: int | None = Field(
        None, description="When the plan does not fit: the smallest peak any placement reaches.")
    block_forward_flops: int | None = Field(
        None, description="Setup: forward FLOPs of one block, one micro-batch, per device.")
    recompute_forward_flops: int | None = Field(
        None, description="Extra forward FLOPs per optimizer step (all micro-batches).")
    recompute_time_s: float | None = None
    step_time_s: float | None = Field(None, description="Forward + backward without recompute "
                                      "(setup: the whole model, loss head included).")
    recompute_time_fraction: float | None = Field(
        None, description="recompute_time_s / step_time_s: the expected step time ratio - 1.")
    exact: bool | None = Field(None, description="'budget': the plan is proven optimal.")
    recompute_time_lower_bound_s: float | None = Field(
        None, description="'budget': no placement within the budget recomputes less.")
    solver: str | None = None
    recompute_forward_steps: int | None = Field(None, description="Revolve: t(l, c).")
    core_attention_blocks: list[int] = Field(
        default_factory=list, description="'selective' (implementation 'megatron'): blocks whose "
        "core attention is recomputed; the reference step does not run this.")
    plan: ActivationCheckpointing | None = Field(
        None, description="training.activation_checkpointing that applies this plan as it is "
        "(POST /v1/memory, POST /v1/validations).")
    assumptions: list[Assumption] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
