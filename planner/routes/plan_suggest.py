"""What would make it fit: POST /v1/memory's ``suggestions`` for a setup that does not fit.

The plan's search anchored on the user's layout: each candidate changes one thing (the
checkpoint plan, the ZeRO stage, the optimizer kernel, the micro-batch with gradient accumulation
keeping the sequences per step, 16-bit states, a chunked loss where the layout replays it, more
data-parallel ranks under ZeRO-3), is estimated by the
planner exactly as POST /v1/memory estimates it, and is kept when its peak plus the allocator
reserve fits; when no single change fits, a checkpoint plan with one other change. Smallest
changes first: one setting before more hardware, fewer extra ranks before
more. Computed only when the setup does not fit, so /v1/memory's fast path is untouched.

A candidate is estimated only when an exact lower bound lets it fit: the worst rank's
parameters and optimizer states (``shard_model_states``, the bytes /v1/memory places there)
are live through the whole steady-state step, and its gradients with them when the optimizer
step starts, so when they plus the allocator reserve exceed the memory the candidate's own
estimate would not fit either (``tests/test_fit_shortcuts.py`` holds the bound below the peak
and the pruned answer equal to the unpruned one). A layout
whose model states alone overflow (a pipeline stage of a large model) then costs no replay,
and a pipelined candidate stops at its first rank that cannot fit
(``planner/layouts/pipelined.py: stop_above``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from planner.catalog.errors import PlanningError
from planner.catalog.loss_specs import LossSpec
from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import (
    FUSED_OPTIMIZERS,
    MAX_RANKS,
    ActivationCheckpointing,
    MemoryRequest,
    MemoryResult,
    ParallelSpec,
    ResolvedModel,
    Suggestion,
    TrainingSpec,
)
from planner.layouts.pipelined import Overflows, stop_above
from planner.layouts.sharding import shard_model_states, fsdp_gather_floor
from planner.machine.deadline import check
from planner.routes.loss_rules import loss_refusal

MAX_SUGGESTIONS = 8
MAX_EXTRA_RANKS_DOUBLINGS = 10  # data_parallel up to 1024x the user's

# activations kept, most first (the planner's named strategies)
_KEEPS = ["none", "selective", "every-k", "sqrt", "full"]
# loss kinds, logits kept most first: 'chunked' keeps them (upcast per chunk, no recompute),
# 'chunked-linear' recomputes each chunk's head in backward (planner/catalog/loss_specs.py)
_LOSSES = ["standard", "chunked", "chunked-linear"]
_LOSS_WHY = {"chunked": "each token chunk's logits upcast to fp32 on their own",
             "chunked-linear": "the head recomputed per token chunk in backward, the logits "
             "never whole"}


def suggestions(req: MemoryRequest, mem: int, max_micro_batch: int | None,
                estimate: Callable[[MemoryRequest], MemoryResult | None],
                model: ResolvedModel | None = None, device: str = "cuda",
                prune: bool = True, activations: int | None = None) -> list[Suggestion]:
    """Single changes after which ``req`` fits in ``mem`` bytes, each with its new peak.
    ``estimate``: the planner's estimate of a request (None when the request is not a valid
    setup). ``model`` (the request's, resolved) and ``device``: skip the candidates whose
    model states alone cannot fit (``states_overflow``); ``prune=False`` estimates every one
    in full (tests compare the two). ``activations``: the request's own highest live
    activation bytes; when they overflow, the changes that keep them (``keeps_activations``)
    are not estimated."""
    tr, par = req.training, req.parallelism
    # the ZeRO stages, more ranks and the fused kernel keep the request's activations: when
    # those alone overflow, none of them fits
    same_over = prune and keeps_activations(tr, par) and activations is not None \
        and activations + allocator_reserve(activations, device) > mem
    out: list[Suggestion] = []
    last: list[MemoryResult | None] = [None]  # the last candidate estimated (None: none was)

    def tried(change: str, training: dict | None = None, parallelism: dict | None = None) -> bool:
        check()
        last[0] = None
        training, parallelism = training or {}, parallelism or {}
        try:
            t = TrainingSpec.model_validate({**tr.model_dump(), **training})
            p = ParallelSpec.model_validate({**par.model_dump(), **parallelism})
        except ValueError:
            return False
        if prune and model is not None and states_overflow(model, t, p, device, mem):
            return False  # its estimate would not fit either (module docstring)
        try:
            # a pipeline stops at its first rank that cannot fit
            with stop_above(mem) if prune else contextlib.nullcontext():
                r = estimate(req.model_copy(update={"training": t, "parallelism": p,
                                                    "hardware": None}))
        except Overflows:
            return False
        last[0] = r
        if r is None:
            return False
        need = r.breakdown.total + r.allocator_reserve_bytes
        if need > mem:
            return False
        out.append(Suggestion(
            change=change, training={k: _plain(v) for k, v in training.items()},
            parallelism=parallelism, peak_bytes=r.breakdown.total, headroom_bytes=mem - need))
        return True

    strategy = tr.activation_checkpointing.strategy
    # per checkpoint plan tried alone: whether its activations overflow (then no ZeRO stage
    # with that plan fits either: ``keeps_activations``)
    plan_over: dict[str, bool] = {}
    if strategy in _KEEPS:
        for s in _KEEPS[_KEEPS.index(strategy) + 1:]:
            if s == "every-k":
                continue
            fits = tried(f"activation_checkpointing '{s}'",
                         {"activation_checkpointing": ActivationCheckpointing(strategy=s)})
            plan_over[s] = prune and keeps_activations(tr, par) \
                and activations_overflow(last[0], device, mem)
            if fits:
                break  # the least recompute that fits
    for loss in _chunked_losses(tr, par):
        if tried(f"loss '{loss.kind}' ({loss.chunks} chunks: {_LOSS_WHY[loss.kind]})",
                 {"loss": loss}):
            break  # the least recompute that fits
    if tr.optimizer_implementation != "fused" and tr.optimizer in FUSED_OPTIMIZERS \
            and not same_over:
        tried("optimizer_implementation 'fused' (no foreach temporaries in the step)",
              {"optimizer_implementation": "fused"})
    if tr.precision not in ("bf16", "fp32") and tr.precision_overrides is None and tr.lora is None:
        tried("precision 'bf16' (16-bit parameters, gradients and optimizer states, no fp32 "
              "master copy)", {"precision": "bf16"})
    b, ga = tr.micro_batch_size, tr.gradient_accumulation_steps
    if max_micro_batch is not None and max_micro_batch < b:
        steps = -(-b * ga // max_micro_batch)
        tried(f"micro_batch_size {max_micro_batch} with gradient_accumulation_steps {steps} "
              f"(at least {b * ga} sequences per step)",
              {"micro_batch_size": max_micro_batch, "gradient_accumulation_steps": steps})
    if par.data_parallel > 1 and not same_over:
        for z in range(par.zero_stage + 1, 4):
            if tried(f"zero_stage {z}", parallelism={"zero_stage": z}):
                break
    if not same_over:
        _more_ranks(par, tried, (lambda: activations_overflow(last[0], device, mem))
                    if prune and keeps_activations(tr, par) else (lambda: False))
    if not out:  # no single change fits: a checkpoint plan with each other change
        for s in _KEEPS[_KEEPS.index(strategy) + 1:] if strategy in _KEEPS else []:
            if s == "every-k":
                continue
            ck = {"activation_checkpointing": ActivationCheckpointing(strategy=s)}
            if par.data_parallel > 1 and not plan_over.get(s, False):
                for z in range(par.zero_stage + 1, 4):
                    if tried(f"activation_checkpointing '{s}' and zero_stage {z}", ck,
                             {"zero_stage": z}):
                        break
            for loss in _chunked_losses(tr, par):
                if tried(f"activation_checkpointing '{s}' and loss '{loss.kind}' "
                         f"({loss.chunks} chunks)", {**ck, "loss": loss}):
                    break
            if b > 1:
                tried(f"activation_checkpointing '{s}' and micro_batch_size 1 with "
                      f"gradient_accumulation_steps {b * ga}", {**ck, "micro_batch_size": 1,
                                                               "gradient_accumulation_steps": b * ga})
            if out:
                break
    return out[:MAX_SUGGESTIONS]


def state_lower_bound(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec) -> int | None:
    """The worst rank's parameters + gradients + optimizer states, all live when the steady
    step's optimizer step starts (``zero_grad(set_to_none=True)`` comes after it), or under
    ZeRO-2/3 the same with FSDP2's padded all-gathers in place of the gradients, so at most
    /v1/memory's peak for the setup; None where the reference step is not what is estimated
    (another implementation, expert parallel, a bare parameter count)."""
    if tr.implementation != "reference" or par.expert_parallel > 1 \
            or not model.architecture_known:
        return None
    try:
        ms = shard_model_states(model, tr, par)
        pad = fsdp_gather_floor(model, tr, par)
    except (ValueError, PlanningError, TypeError):
        return None
    # FSDP2's padded all-gather outputs (ZeRO-2: every unit's, kept from forward to backward;
    # ZeRO-3: at least one unit's) are live in a steady step's forward with the parameters and
    # the optimizer states, the gradients not yet made (a thousand ranks pad each dim 0 a
    # thousandfold)
    return ms.parameters + ms.optimizer_states + max(ms.gradients, pad)


def states_overflow(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
                    mem: int) -> bool:
    """The lower bound plus its allocator reserve (non-decreasing in the peak) exceeds ``mem``:
    the setup cannot fit, whatever its activations."""
    bound = state_lower_bound(model, tr, par)
    return bound is not None and bound + allocator_reserve(bound, device) > mem


def keeps_activations(tr: TrainingSpec, par: ParallelSpec) -> bool:
    """Whether the reference step's highest live activation bytes stay the same under every
    ZeRO stage (0-3, with or without offload), any number of data-parallel ranks and either
    optimizer kernel: they are the same forward tensors (DDP, ZeroRedundancyOptimizer and
    FSDP2, which runs forward and backward on the all-gathered parameters, shard or move model
    states only), and they are at most the step's peak at the instant they are highest.
    Held on one pipeline, tensor and expert rank (``tests/test_fit_shortcuts.py`` holds them
    equal over random setups, stages, kernels, offload and 1 to 4096 ranks)."""
    return tr.implementation == "reference" and par.pipeline_parallel == 1 \
        and par.tensor_parallel == 1 and par.expert_parallel == 1


def activations_overflow(r: MemoryResult | None, device: str, mem: int) -> bool:
    """The estimated candidate's highest live activation bytes plus their allocator reserve
    exceed ``mem``: it cannot fit, nor (``keeps_activations``) can any setup that only changes
    its data-parallel ranks or ZeRO stage."""
    act = None if r is None else r.activation_peak_bytes
    return act is not None and act + allocator_reserve(act, device) > mem


def _more_ranks(par: ParallelSpec, tried, activations_overflow: Callable[[], bool]) -> None:
    """The fewest data-parallel ranks (doublings) over which ZeRO-3 fits; stops at the first
    estimated candidate whose activations alone overflow (more ranks shard the model states,
    never the activations: ``keeps_activations``)."""
    d = par.data_parallel
    for _ in range(MAX_EXTRA_RANKS_DOUBLINGS):
        d *= 2
        if d > MAX_RANKS:
            return
        try:
            if tried(f"data_parallel {d} with zero_stage 3 ({d // par.data_parallel}x the "
                     "GPUs)", parallelism={"data_parallel": d, "zero_stage": 3}):
                return
        except PlanningError:
            return
        if activations_overflow():
            return


def _chunked_losses(tr: TrainingSpec, par: ParallelSpec) -> list[LossSpec]:
    """The chunked losses keeping fewer logits than ``tr.loss`` that this layout replays
    (planner/routes/loss_rules.py refuses the others), fewest changes first."""
    kinds = _LOSSES[_LOSSES.index(tr.loss.kind) + 1:]
    out = [LossSpec(kind=k, chunks=tr.loss.chunks) for k in kinds]
    return [x for x in out if loss_refusal(tr.model_copy(update={"loss": x}), par) is None]


def _plain(v):
    if isinstance(v, LossSpec):
        return v.model_dump()
    return v.strategy if isinstance(v, ActivationCheckpointing) else v
