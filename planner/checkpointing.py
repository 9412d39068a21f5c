"""Activation checkpoint placement: which transformer blocks recompute their forward in backward.

A request gives either a training setup (``model``, ``training``, ``parallelism``, ``hardware``),
from which the planner derives one chain block per transformer block of the first pipeline
stage, or an explicit ``chain`` of per-block costs a user profiled, or ``strategy: "revolve"``
with ``num_steps`` and ``slots`` for the homogeneous-chain optimum. The chain model, the peak
formula and the solvers are in ``planner.checkpoint_solvers``.

The result's ``plan`` is what the reference step takes:
``service.validation.step.build(..., checkpointed=set(plan.checkpointed_blocks))``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from planner.catalog import get_gpu, resolve_model
from planner.checkpoint_solvers import (
    MAX_BYTES, MAX_CHAIN_BLOCKS, ChainBlock, chain_peak_bytes, min_peak_plan, recompute_time_s,
    revolve_forward_steps, solve_budget,
)
from planner.parameters import count_parameters
from planner.precision import DTYPE_BYTES, resolve_precision
from planner.specs import (
    MAX_LAYERS, Assumption, HardwareSpec, ModelSpec, ParallelSpec, ResolvedModel, TrainingSpec,
)

MAX_REVOLVE_STEPS = 100_000
MAX_REVOLVE_SLOTS = 10_000
ASSUMED_MFU = 0.5  # model FLOPs utilisation of the roofline forward time (stated assumption)
NOMINAL_GPU = "h100-80gb"  # times are computed on it when the request names no GPU

Strategy = Literal["none", "full", "every-k", "sqrt", "selective", "budget", "revolve"]


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
    model: ModelSpec | None = None
    training: TrainingSpec | None = None
    parallelism: ParallelSpec | None = None
    hardware: HardwareSpec | None = None
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
    def _one_form(self) -> "CheckpointRequest":
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


class CheckpointPlan(_Frozen):
    """What the reference step applies: each listed block runs under torch.utils.checkpoint."""

    checkpointed_blocks: list[int]
    core_attention_blocks: list[int] = Field(
        default_factory=list, description="'selective': blocks whose core attention is recomputed "
        "(Megatron); the reference step does not apply these.")


class CheckpointResult(_Frozen):
    strategy: Strategy
    num_blocks: int | None = Field(None, description="Blocks in the chain (first pipeline stage).")
    checkpointed_blocks: list[int] = Field(default_factory=list)
    segments: list[tuple[int, int]] = Field(
        default_factory=list, description="Runs [first, last] of consecutive checkpointed blocks "
        "(each block is its own checkpoint call).")
    activation_peak_bytes: int | None = Field(None, description="Peak above base_bytes.")
    total_peak_bytes: int | None = Field(None, description="Peak including model states.")
    budget_bytes: int | None = None
    fits: bool | None = None
    min_achievable_peak_bytes: int | None = Field(
        None, description="When the plan does not fit: the smallest peak any placement reaches.")
    recompute_forward_flops: int | None = None
    recompute_time_s: float | None = None
    step_time_s: float | None = Field(None, description="Forward + backward of the chain, "
                                      "without recompute.")
    recompute_time_fraction: float | None = Field(
        None, description="recompute_time_s / step_time_s: the expected step time ratio - 1.")
    exact: bool | None = Field(None, description="'budget': the plan is proven optimal.")
    recompute_time_lower_bound_s: float | None = Field(
        None, description="'budget': no placement within the budget recomputes less.")
    solver: str | None = None
    recompute_forward_steps: int | None = Field(None, description="Revolve: t(l, c).")
    plan: CheckpointPlan | None = None
    assumptions: list[Assumption] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


from planner.errors import PlanningError  # noqa: E402  (re-exported for the route)


# ---- the chain of a training setup -------------------------------------------------------------

def _model_chain(model: ResolvedModel, training: TrainingSpec, parallelism: ParallelSpec,
                 gpu_flops: float) -> tuple[list[ChainBlock], int, tuple[int, float, int]]:
    """Blocks of the first pipeline stage, the tail bytes, and per block the core attention's
    (saved bytes, forward seconds, forward FLOPs) for 'selective'.

    INTERIM formula, to be replaced by the measured activation model.
    TODO(activations): take saved/input/transient bytes and FLOPs from
    ``planner.activations.block_costs(model, training, parallelism)``.
    """
    b, s = training.micro_batch_size, training.sequence_length
    h, a = model.hidden_size, model.num_heads
    t = parallelism.tensor_parallel
    sp = parallelism.sequence_parallel or t == 1
    act_bytes = 4 if training.precision == "fp32" else 2  # Korthikanti et al. 2022 assume 16 bit
    eager = training.attention == "eager"
    scores = 5 * a * s / h if eager else 0.0  # sdpa keeps no (a, s, s) scores
    # Korthikanti et al. 2022, eq. 1 / Table 2: s*b*h*(34 + 5as/h) bytes per layer at 16 bit;
    # tensor parallel with sequence parallel divides all by t, without it 10 of the 34 stay whole.
    coeff = (34 + scores) / t if sp else 10 + 24 / t + scores / t
    saved_bytes = round(s * b * h * coeff * act_bytes / 2)
    score_bytes = round(s * b * h * (scores / t) * act_bytes / 2)
    input_bytes = s * b * h * act_bytes // (t if sp else 1)
    f = model.ffn_hidden_size
    kv = (model.num_kv_heads or a) * (h // a)
    # interim: widest backward intermediate (MLP, or the scores when eager) twice, plus the
    # incoming and outgoing gradient of the residual stream
    widest = max(2 * f, 2 * a * s if eager else 0) * b * s * act_bytes // t
    transient_bytes = widest + 2 * input_bytes
    mats = 2 if model.family == "gpt2" else 3  # MLP matrices (SwiGLU has gate, up, down)
    # 2 FLOPs per multiply-add (Kaplan et al. 2020): q, o (h x h), k, v (h x kv), MLP (h x f),
    # and the attention core QK^T and AV: 4*b*s^2*h (Narayanan et al. 2021, eq. 3)
    core_flops = 4 * b * s * s * h // t
    flops = (2 * b * s * (2 * h * h + 2 * h * kv + mats * h * f)) // t + core_flops
    forward_s = flops / (gpu_flops * ASSUMED_MFU)
    backward_s = 2 * forward_s  # backward = 2x forward FLOPs (Narayanan et al. 2021, §5.1)
    stage_layers = math.ceil(model.num_layers / parallelism.pipeline_parallel)
    blk = ChainBlock(forward_s=forward_s, backward_s=backward_s, saved_bytes=saved_bytes,
                     input_bytes=input_bytes, transient_bytes=transient_bytes, forward_flops=flops)
    # interim tail: norm_f input, logits in the compute dtype, their fp32 copy and log-softmax
    V = model.vocab_size
    tail_bytes = input_bytes + b * s * V * (act_bytes + 8)
    core = (score_bytes, core_flops / (gpu_flops * ASSUMED_MFU), core_flops)
    return [blk] * stage_layers, tail_bytes, core


_OPTIMIZER_STATES = {  # states per parameter (torch.optim); TODO(memory): planner.optimizers
    "sgd": 0, "sgd-momentum": 1, "adagrad": 1, "rmsprop": 1, "adadelta": 2, "adam": 2,
    "adamw": 2, "adam-8bit": 2, "adafactor": 0, "lion": 1,
}


def _model_state_bytes(model: ResolvedModel, training: TrainingSpec, par: ParallelSpec) -> int:
    """INTERIM: parameters + gradients + master copy + optimizer states per device, ZeRO
    partitioning per Rajbhandari et al. 2020 §5. TODO(memory): take from planner.memory."""
    p = resolve_precision(training)
    n = model.num_parameters // (par.tensor_parallel * par.pipeline_parallel)
    dp, z = par.data_parallel, par.zero_stage
    states = _OPTIMIZER_STATES[training.optimizer] + (
        training.rmsprop_centered + training.rmsprop_momentum if training.optimizer == "rmsprop"
        else 0)
    state_bytes = 1 if training.optimizer == "adam-8bit" else DTYPE_BYTES[p.optimizer_state_dtype]
    opt = n * (states * state_bytes + (DTYPE_BYTES[p.master_dtype] if p.master_dtype else 0))
    grads = n * DTYPE_BYTES[p.grad_dtype]
    params = n * DTYPE_BYTES[p.param_dtype]
    return int(params / (dp if z >= 3 else 1) + grads / (dp if z >= 2 else 1)
               + opt / (dp if z >= 1 else 1))


# ---- strategies --------------------------------------------------------------------------------

def named_plan(strategy: str, n: int, every_k: int | None = None) -> list[int]:
    """The reference step's named placements (service.validation.step.checkpointed_blocks)."""
    if strategy == "full":
        return list(range(n))
    if strategy == "every-k":
        k = every_k or 1
        return [i for i in range(n) if i % k == 0]
    if strategy == "sqrt":
        # Chen et al. 2016 at block granularity: keep every k-th block whole, k = round(sqrt(n))
        k = max(1, round(math.sqrt(n)))
        return [i for i in range(n) if i % k != k - 1]
    return []


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in blocks:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def plan_checkpointing(req: CheckpointRequest) -> CheckpointResult:
    """Checkpoint placement for the request (raises PlanningError for an unplannable one)."""
    if req.strategy == "revolve":
        steps = revolve_forward_steps(req.num_steps, req.slots)
        return CheckpointResult(strategy="revolve", recompute_forward_steps=steps, notes=[
            "Griewank & Walther 2000 (Revolve), Prop. 1: forward steps to reverse num_steps "
            "steps of a homogeneous chain with slots checkpoints, the initial state's included."])
    assumptions: list[Assumption] = []
    notes: list[str] = []
    core = None
    budget = req.budget_bytes
    hw_memory = None
    if req.hardware is not None:
        hw_memory = (req.hardware.memory_bytes if req.hardware.memory_bytes is not None
                     else get_gpu(req.hardware.gpu).memory_bytes if req.hardware.gpu else None)
    if req.chain is not None:
        chain, base_bytes, tail_bytes = list(req.chain), req.base_bytes, req.tail_bytes
        strategy = req.strategy or "budget"
        every_k = req.every_k
    else:
        model = resolve_model(req.model)
        if not model.architecture_known:
            raise PlanningError("checkpoint placement needs the architecture (a preset or "
                                "architecture fields), not a bare parameter count", "body.model")
        training = req.training or TrainingSpec()
        par = req.parallelism or ParallelSpec()
        ac = training.activation_checkpointing
        strategy = req.strategy or ac.strategy
        every_k = req.every_k or ac.every_k
        budget = budget or ac.budget_bytes
        gpu = get_gpu(req.hardware.gpu if req.hardware and req.hardware.gpu else NOMINAL_GPU)
        chain, tail_bytes, core = _model_chain(model, training, par, gpu.peak_bf16_flops)
        base_bytes = _model_state_bytes(model, training, par)
        if training.gradient_accumulation_steps == 1 and training.lora is None:
            # the reference step frees gradients (zero_grad(set_to_none=True)): a block's
            # gradients exist from its backward on, so they count per block, not in the base
            grad_bytes = int(count_parameters(model).per_layer / par.tensor_parallel
                             * DTYPE_BYTES[resolve_precision(training).grad_dtype]
                             / (par.data_parallel if par.zero_stage >= 2 else 1))
            chain = [c.model_copy(update={"grad_bytes": grad_bytes}) for c in chain]
            base_bytes -= grad_bytes * len(chain)
        assumptions += [
            Assumption(name="forward_time", value=f"FLOPs / ({gpu.name} peak 16-bit FLOP/s x "
                       f"{ASSUMED_MFU} MFU)", note="roofline; backward = 2x forward"),
            Assumption(name="activations", value="Korthikanti et al. 2022 eq. 1 per block",
                       note="interim per-block model"),
            Assumption(name="pipeline", value=f"first stage, {len(chain)} blocks, one micro-batch"),
        ]
    n = len(chain)
    budget = budget or hw_memory
    if strategy == "every-k" and every_k is None:
        raise PlanningError("strategy 'every-k' needs every_k", "body.every_k")
    if strategy == "budget" and budget is None:
        raise PlanningError("strategy 'budget' needs budget_bytes or hardware (a GPU or "
                            "memory_bytes) to fit on", "body.budget_bytes")
    core_blocks: list[int] = []
    solver = exact = lower = None
    if strategy == "selective":
        if core is None:
            raise PlanningError("'selective' (core-attention recompute) needs a model; a chain "
                                "has no attention split", "body.strategy")
        score_bytes, core_s, core_flops = core
        notes.append("selective: the attention scores are recomputed (Megatron, Korthikanti et "
                     "al. 2022 §4.1); the reference step runs whole blocks and does not apply it.")
        blocks = []
        if score_bytes == 0:
            notes.append("sdpa keeps no attention scores: selective equals 'none'.")
        else:
            chain = [c.model_copy(update={"saved_bytes": c.saved_bytes - score_bytes})
                     for c in chain]
            core_blocks = list(range(n))
    elif strategy == "budget":
        sol = solve_budget(chain, budget, base_bytes=base_bytes, tail_bytes=tail_bytes)
        blocks, solver, exact, lower = sol.blocks, sol.method, sol.exact, sol.lower_bound_s
        if not sol.fits:
            notes.append(f"no placement fits {budget} bytes; the smallest achievable peak is "
                         f"{sol.peak_bytes} bytes (every block checkpointed)")
    else:
        blocks = named_plan(strategy, n, every_k)
    peak = chain_peak_bytes(chain, blocks, base_bytes=base_bytes, tail_bytes=tail_bytes)
    fits = None if budget is None else peak <= budget
    low = None
    if fits is False:
        low = chain_peak_bytes(chain, min_peak_plan(chain), base_bytes=base_bytes,
                               tail_bytes=tail_bytes)
    if core_blocks:
        rec_s, rec_flops = core_s * n, core_flops * n
    else:
        rec_s = recompute_time_s(chain, blocks)
        flops = [chain[i].forward_flops for i in blocks]
        rec_flops = None if any(f is None for f in flops) else sum(flops)
    step_s = sum(c.forward_s + c.backward_s for c in chain)
    return CheckpointResult(
        strategy=strategy, num_blocks=n, checkpointed_blocks=blocks, segments=_runs(blocks),
        activation_peak_bytes=peak - base_bytes, total_peak_bytes=peak, budget_bytes=budget,
        fits=fits, min_achievable_peak_bytes=low, recompute_forward_flops=rec_flops,
        recompute_time_s=rec_s, step_time_s=step_s,
        recompute_time_fraction=rec_s / step_s if step_s > 0 else None,
        exact=exact, recompute_time_lower_bound_s=lower, solver=solver,
        plan=CheckpointPlan(checkpointed_blocks=blocks, core_attention_blocks=core_blocks),
        assumptions=assumptions, notes=notes)
