"""Activation checkpoint placement: which transformer blocks recompute their forward in backward.

A request (``checkpoint_specs.CheckpointRequest``) gives one of three things:

- a training setup (``model``, ``training``, ``parallelism``, ``hardware``): every peak is the
  step simulator's replay of the reference step (``planner.routes.memory.estimate_memory``, the figure
  POST /v1/memory gives for the same strategy), so a plan is exactly what a validation job
  measures. Recompute cost is the block's forward FLOPs (``block_forward_flops``) timed by a
  roofline on the chosen GPU;
- an explicit ``chain`` of per-block costs a user profiled: the chain model, the peak formula and
  the budget solvers of ``planner.routes.checkpoint_solvers``;
- ``strategy: "revolve"`` with ``num_steps`` and ``slots``: the homogeneous-chain optimum.

``budget`` on a setup. The reference model's blocks are identical, so every placement of ``k``
checkpointed blocks recomputes the same FLOPs, and the peak is what decides between them. In the
chain model (``checkpoint_solvers`` docstring) checkpointing block ``j`` lowers every prefix sum
after ``j`` by the same ``d = saved - input``, so the first ``k`` blocks lower every prefix at least
as much as any other ``k`` blocks: blocks ``0..k-1`` have the lowest peak of all ``k``-sets, and
the least ``k`` whose simulated peak fits is the optimum (``tests/test_checkpoint_reference.py``
checks both claims against the simulator over every subset of small models). The search is
``planner.routes.memory``'s, so /v1/memory with strategy 'budget' resolves the same blocks.

The result's ``plan`` is an ``activation_checkpointing`` object the reference step applies as it
is: put it in ``training`` of POST /v1/memory or POST /v1/validations.
"""

from __future__ import annotations

import math

from planner.catalog.presets import get_gpu, resolve_model
from planner.routes.checkpoint_solvers import (
    chain_peak_bytes,
    min_peak_plan,
    recompute_time_s,
    revolve_forward_steps,
    solve_budget,
)
from planner.catalog.errors import PlanningError
from planner.catalog.specs import (
    MAX_LAYERS,
    ActivationCheckpointing,
    Assumption,
    HardwareSpec,
    MemoryRequest,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.routes.checkpoint_specs import CheckpointRequest, CheckpointResult

ASSUMED_MFU = 0.5  # model FLOPs utilisation of the roofline forward time (stated assumption)
NOMINAL_GPU = "h100-80gb"  # times are computed on it when the request names no GPU

__all__ = ["PlanningError", "block_forward_flops", "head_forward_flops", "named_plan",
           "plan_checkpointing"]


# ---- forward FLOPs of the reference model ------------------------------------------------------

def block_forward_flops(model: ResolvedModel, training: TrainingSpec,
                        tensor_parallel: int = 1) -> int:
    """Matmul FLOPs of one reference block's forward (service/validation/model.py), one
    micro-batch, per tensor-parallel rank. 2 FLOPs per multiply-add (Kaplan et al. 2020, §2.1):
    q and o (h x h), k and v (h x kv), the MLP's 2 (gpt2) or 3 (SwiGLU) h x f matrices, LoRA's
    r x (d_in + d_out) per adapted projection, and the attention core QK^T and AV at 4*b*s^2*h
    (Narayanan et al. 2021, eq. 3: dense, as the math of sdpa; a causal kernel may skip half).
    Element-wise ops (norms, activations, softmax, rotary) are not counted."""
    b, s = training.micro_batch_size, training.sequence_length
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = (model.num_kv_heads or model.num_heads) * model.head_dim
    gpt2 = model.family == "gpt2"
    dims = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "up": (h, f), "down": (f, h)}
    if not gpt2:
        dims["gate"] = (h, f)
    macs = sum(i * o for i, o in dims.values())
    lora = training.lora
    if lora is not None:
        macs += sum(lora.rank * (dims[m][0] + dims[m][1]) for m in lora.target_modules
                    if m in dims)
    return (2 * b * s * macs + 4 * b * s * s * h) // tensor_parallel


def head_forward_flops(model: ResolvedModel, training: TrainingSpec,
                       tensor_parallel: int = 1) -> int:
    """The loss head's matmul (h x V) per micro-batch and tensor-parallel rank."""
    b, s = training.micro_batch_size, training.sequence_length
    return 2 * b * s * model.hidden_size * model.vocab_size // tensor_parallel


def core_attention_forward_flops(model: ResolvedModel, training: TrainingSpec,
                                 tensor_parallel: int = 1) -> int:
    """QK^T and AV of one block (Narayanan et al. 2021, eq. 3): what 'selective' recomputes."""
    b, s = training.micro_batch_size, training.sequence_length
    return 4 * b * s * s * model.hidden_size // tensor_parallel


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


def _hardware_memory(hw: HardwareSpec | None) -> int | None:
    if hw is None:
        return None
    if hw.memory_bytes is not None:
        return hw.memory_bytes
    return get_gpu(hw.gpu).memory_bytes if hw.gpu else None


def plan_checkpointing(req: CheckpointRequest) -> CheckpointResult:
    """Checkpoint placement for the request (raises PlanningError for an unplannable one)."""
    if req.strategy == "revolve":
        steps = revolve_forward_steps(req.num_steps, req.slots)
        return CheckpointResult(strategy="revolve", recompute_forward_steps=steps, notes=[
            ("Griewank & Walther 2000 (Revolve), Prop. 1: forward steps to reverse num_steps "
             "steps of a homogeneous chain with slots checkpoints, the initial state's "
             "included.")])
    if req.chain is not None:
        return _plan_chain(req)
    return _plan_setup(req)


# ---- a training setup: the step simulator ------------------------------------------------------

def _plan_setup(req: CheckpointRequest) -> CheckpointResult:
    from planner.routes.memory import estimate_memory  # the planner's single memory model

    model = resolve_model(req.model)
    if not model.architecture_known:
        raise PlanningError("checkpoint placement needs the architecture (a preset or "
                            "architecture fields), not a bare parameter count", "body.model")
    training = req.training or TrainingSpec()
    if training.implementation == "transformers":
        raise PlanningError("implementation 'transformers' checkpoints every decoder layer or "
                            "none (gradient_checkpointing_enable): compare the two with POST "
                            "/v1/memory", "body.training.implementation")
    par = req.parallelism or ParallelSpec()
    ac = training.activation_checkpointing
    strategy = req.strategy or ac.strategy
    every_k = req.every_k or ac.every_k
    budget = req.budget_bytes or ac.budget_bytes or _hardware_memory(req.hardware)
    given = req.blocks if req.blocks is not None else ac.blocks
    L = model.num_layers
    megatron = training.implementation == "megatron"
    if strategy == "every-k" and every_k is None:
        raise PlanningError("strategy 'every-k' needs every_k", "body.every_k")
    if strategy == "budget" and budget is None:
        raise PlanningError("strategy 'budget' needs budget_bytes or hardware (a GPU or "
                            "memory_bytes) to fit on", "body.budget_bytes")
    if strategy == "blocks" and given is None:
        raise PlanningError("strategy 'blocks' needs blocks", "body.blocks")
    if strategy == "blocks" and (len(set(given)) != len(given) or min(given, default=0) < 0
                                 or max(given, default=0) >= L):
        raise PlanningError(f"blocks must be distinct indices below num_layers ({L})",
                            "body.blocks")
    if megatron and strategy not in ("none", "full", "selective"):
        raise PlanningError("implementation 'megatron' models none, selective and full "
                            "(Korthikanti et al. 2022 Table 2)", "body.strategy")

    replay = req.hardware is not None and req.hardware.allocator == "replay"

    def estimate(spec: ActivationCheckpointing, final: bool = False):
        tr = training.model_copy(update={"activation_checkpointing": spec})
        mreq = MemoryRequest(model=req.model, training=tr, parallelism=par, hardware=None)
        try:  # the answer's own estimate replays the CUDA allocator when asked, as /v1/memory's
            return estimate_memory(mreq, device=req.device, explain=False,
                                   allocator=final and replay)
        except PlanningError as exc:  # name the field as this route's body has it
            field = exc.field
            if field and not field.startswith("body."):
                field = f"body.{field}"
            raise PlanningError(exc.detail, field) from exc

    def at(blocks: list[int], final: bool = False):
        return estimate(ActivationCheckpointing(strategy="blocks", blocks=blocks), final)

    def need(r) -> int:  # what a budget must hold
        return r.breakdown.total + r.allocator_reserve_bytes

    notes: list[str] = []
    core_blocks: list[int] = []
    solver = exact = None
    if strategy == "budget":
        # planner.routes.memory._budget's search: least k with blocks 0..k-1 fitting (module docstring)
        if need(at(list(range(L)))) > budget:
            k = L
            notes.append(f"no placement fits {budget} bytes; the smallest achievable peak is "
                         f"that of every block checkpointed")
        else:
            lo, hi = 0, L
            while lo < hi:
                mid = (lo + hi) // 2
                if need(at(list(range(mid)))) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            k = lo
        result = at(list(range(k)), True)
        while k < L and need(result) > budget:  # the simulated allocator reserve decides
            k += 1
            result = at(list(range(k)), True)
        while k > 0 and need(lower := at(list(range(k - 1)), True)) <= budget:
            k, result = k - 1, lower
        blocks, solver, exact = list(range(k)), "prefix-search", True
        plan = ActivationCheckpointing(strategy="budget", budget_bytes=budget, blocks=blocks)
    elif strategy == "blocks":
        blocks = sorted(given)
        plan = ActivationCheckpointing(strategy="blocks", blocks=blocks)
        result = at(blocks, True)
    else:
        spec = ActivationCheckpointing(strategy=strategy,
                                       every_k=every_k if strategy == "every-k" else None)
        result = estimate(spec, True)
        if strategy == "selective":  # core attention of every block (Korthikanti et al. §4.1)
            blocks, plan, core_blocks = [], spec, list(range(L))
        elif megatron:
            blocks = list(range(L)) if strategy == "full" else []
            plan = spec
        else:
            blocks = named_plan(strategy, L, every_k)
            plan = ActivationCheckpointing(strategy="blocks", blocks=blocks)
    bd = result.breakdown
    fits = None if budget is None else need(result) <= budget
    low = None
    if fits is False and not megatron:
        low = at(list(range(L))).breakdown.total

    # Recompute overhead: a checkpointed block runs its forward once more in backward (per
    # micro-batch); backward = 2x forward FLOPs (Narayanan et al. 2021, §5.1).
    t = par.tensor_parallel
    accum = training.gradient_accumulation_steps
    blk_flops = block_forward_flops(model, training, t)
    rec_flops = accum * (len(core_blocks) * core_attention_forward_flops(model, training, t)
                         if core_blocks else len(blocks) * blk_flops)
    step_flops = accum * 3 * (L * blk_flops + head_forward_flops(model, training, t))
    gpu = get_gpu(req.hardware.gpu if req.hardware and req.hardware.gpu else NOMINAL_GPU)
    rate = gpu.peak_bf16_flops * ASSUMED_MFU
    assumptions = list(result.assumptions) + [
        Assumption(name="forward_flops", value="matmuls: 2 x multiply-adds; attention core "
                   "4*b*s^2*h", note="Kaplan et al. 2020; Narayanan et al. 2021 eq. 3"),
        Assumption(name="forward_time", value=f"FLOPs / ({gpu.name} peak 16-bit FLOP/s x "
                   f"{ASSUMED_MFU} MFU)", note="roofline; backward = 2x forward"),
    ]
    if par.pipeline_parallel > 1:
        assumptions.append(Assumption(
            name="pipeline", value="recompute over all stages",
            note="FLOPs and times sum the model's blocks; each stage recomputes its share"))
    return CheckpointResult(
        strategy=strategy, num_blocks=L, checkpointed_blocks=blocks, segments=_runs(blocks),
        activation_peak_bytes=result.activation_peak_bytes,
        forward_backward_peak_bytes=(result.forward_backward_peak.total
                                     if result.forward_backward_peak is not None else None),
        total_peak_bytes=bd.total,
        breakdown=bd, allocator_reserve_bytes=result.allocator_reserve_bytes,
        peak_phase=result.peak_phase, budget_bytes=budget, fits=fits,
        min_achievable_peak_bytes=low, block_forward_flops=blk_flops,
        recompute_forward_flops=rec_flops, recompute_time_s=rec_flops / rate,
        step_time_s=step_flops / rate, recompute_time_fraction=rec_flops / step_flops,
        exact=exact, recompute_time_lower_bound_s=rec_flops / rate if exact else None,
        solver=solver, core_attention_blocks=core_blocks, plan=plan, assumptions=assumptions,
        notes=list(result.notes) + notes)


# ---- an explicit chain: planner.routes.checkpoint_solvers ---------------------------------------------

def _plan_chain(req: CheckpointRequest) -> CheckpointResult:
    chain, base_bytes, tail_bytes = list(req.chain), req.base_bytes, req.tail_bytes
    strategy = req.strategy or "budget"
    n = len(chain)
    budget = req.budget_bytes or _hardware_memory(req.hardware)
    if strategy == "every-k" and req.every_k is None:
        raise PlanningError("strategy 'every-k' needs every_k", "body.every_k")
    if strategy == "budget" and budget is None:
        raise PlanningError("strategy 'budget' needs budget_bytes or hardware (a GPU or "
                            "memory_bytes) to fit on", "body.budget_bytes")
    if strategy == "selective":
        raise PlanningError("'selective' (core-attention recompute) needs a model; a chain has "
                            "no attention split", "body.strategy")
    notes: list[str] = []
    solver = exact = lower = None
    if strategy == "budget":
        sol = solve_budget(chain, budget, base_bytes=base_bytes, tail_bytes=tail_bytes)
        blocks, solver, exact, lower = sol.blocks, sol.method, sol.exact, sol.lower_bound_s
        if not sol.fits:
            notes.append(f"no placement fits {budget} bytes; the smallest achievable peak is "
                         f"{sol.peak_bytes} bytes (every block checkpointed)")
    elif strategy == "blocks":
        if req.blocks is None:
            raise PlanningError("strategy 'blocks' needs blocks", "body.blocks")
        blocks = sorted(req.blocks)
        if len(set(blocks)) != len(blocks) or (blocks and (blocks[0] < 0 or blocks[-1] >= n)):
            raise PlanningError(f"blocks must be distinct indices below the chain's {n} blocks",
                                "body.blocks")
    else:
        blocks = named_plan(strategy, n, req.every_k)
    peak = chain_peak_bytes(chain, blocks, base_bytes=base_bytes, tail_bytes=tail_bytes)
    fits = None if budget is None else peak <= budget
    low = None
    if fits is False:
        low = chain_peak_bytes(chain, min_peak_plan(chain), base_bytes=base_bytes,
                               tail_bytes=tail_bytes)
    rec_s = recompute_time_s(chain, blocks)
    flops = [chain[i].forward_flops for i in blocks]
    rec_flops = None if any(f is None for f in flops) else sum(flops)
    step_s = sum(c.forward_s + c.backward_s for c in chain)
    plan = None
    if not blocks or blocks[-1] < MAX_LAYERS:
        plan = (ActivationCheckpointing(strategy="budget", budget_bytes=budget, blocks=blocks)
                if strategy == "budget" else ActivationCheckpointing(strategy="blocks",
                                                                     blocks=blocks))
    return CheckpointResult(
        strategy=strategy, num_blocks=n, checkpointed_blocks=blocks, segments=_runs(blocks),
        activation_peak_bytes=peak - base_bytes, total_peak_bytes=peak, budget_bytes=budget,
        fits=fits, min_achievable_peak_bytes=low, recompute_forward_flops=rec_flops,
        recompute_time_s=rec_s, step_time_s=step_s,
        recompute_time_fraction=rec_s / step_s if step_s > 0 else None,
        exact=exact, recompute_time_lower_bound_s=lower, solver=solver, plan=plan, notes=notes)
