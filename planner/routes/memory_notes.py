"""The notes of POST /v1/memory that read its figures: bytes per parameter, what the fused
optimizer kernel would save, and — when a setup does not fit — by how much and which single
changes fit. Every alternative is computed by the planner: ``variant(req, model, device, ckpt,
**training)`` (``planner/routes/memory.py``) replays the changed setup; ZeRO-3 uses the sharded
model states exactly."""

from __future__ import annotations

import functools

from planner.catalog.loss_specs import LossSpec
from planner.catalog.optimizers import master_weight_step_temporary_bytes
from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import (
    MAX_RANKS,
    ActivationCheckpointing,
    Breakdown,
    Fit,
    MemoryRequest,
    MemoryResult,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.compose import single_device
from planner.layouts.sharding import shard_model_states
from planner.step import simulate as step_cache


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _model_states_reading(model: ResolvedModel, tr: TrainingSpec, bd: Breakdown) -> str:
    """'X bytes/parameter (parameters a + gradients b + optimizer states c)', per parameter of
    the model; for mixed-precision Adam the ZeRO paper's 16Ψ (Rajbhandari et al. 2020, §3.1:
    2 + 2 + K with K = 12: the fp32 master copy, momentum and variance)."""
    return _reading(model.num_parameters, bd.parameters, bd.gradients, bd.optimizer_states,
                    _zero_paper(tr))


def _zero_paper(tr: TrainingSpec) -> bool:
    """Mixed-precision Adam without overrides or LoRA: the ZeRO paper's 16Ψ."""
    return tr.precision.startswith("mixed-") and tr.optimizer in ("adam", "adamw") \
        and tr.precision_overrides is None and tr.lora is None


@functools.lru_cache(maxsize=4096)
def _reading(psi: int, params: int, grads: int, states: int, zero_paper: bool) -> str:
    """The reading's text (one per setup's model states: a known setup's answers share it)."""
    per = [params / psi, grads / psi, states / psi]
    text = (f"model states {sum(per):.1f} bytes/parameter (parameters {per[0]:.1f} + gradients "
            f"{per[1]:.1f} + optimizer states {per[2]:.1f}")
    if zero_paper:
        text += ": the ZeRO paper's 16Ψ, 2 + 2 + 12 with the fp32 master copy, momentum and variance"
    return text + ")"


def bytes_per_parameter(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
                         bd: Breakdown, bare: bool) -> list[str]:
    """How the peak reads per parameter when the optimizer step holds it (a preset and a bare
    count of the same model differ by the step's temporaries: both are right)."""
    if not single_device(par):
        return []
    psi = model.num_parameters
    states = bd.parameters + bd.gradients + bd.optimizer_states
    if bare:
        return [f"{_model_states_reading(model, tr, bd)}; the optimizer step's temporaries "
                f"(the {tr.optimizer_implementation} kernels' intermediates, and the fp32 gradient "
                "copies of a master-weight step) are not included: they need the architecture"]
    tmp = bd.temporaries
    parts = []
    copies = master_weight_step_temporary_bytes(tr, [psi]) if tr.lora is None else 0
    if 0 < copies <= tmp:
        parts.append(f"{copies} bytes of fp32 gradient copies for the master-weight step")
    rest = tmp - (copies if parts else 0)
    if rest:
        parts.append(f"{rest} bytes made by the {tr.optimizer_implementation} "
                     f"{tr.optimizer} step itself")
    return [f"the peak falls in the optimizer step: {bd.total / psi:.1f} bytes/parameter = "
            f"{_model_states_reading(model, tr, bd)} + the step's temporaries "
            f"{tmp / psi:.1f} ({tmp} bytes: {', '.join(parts) or 'none'})"
            + (f" + activations {bd.activations} bytes" if bd.activations else "")
            + f"; {states} bytes of model states alone"]


def fused_instead(req: MemoryRequest, model: ResolvedModel, device: str, ckpt,
                  bd: Breakdown, variant) -> list[str]:
    """What ``optimizer_implementation: fused`` would change: the same setup replayed with the
    fused kernel (torch.optim's ``_fused_*``: one kernel per tensor group, no intermediates)."""
    tr = req.training
    if tr.optimizer_implementation == "fused":
        return []
    r = variant(req, model, device, ckpt, optimizer_implementation="fused")
    if r is None:
        return [f"optimizer_implementation 'fused' does not exist for {tr.optimizer!r} in "
                "torch.optim (fused: SGD, Adam, AdamW, Adagrad)"]
    saved = bd.total - r.breakdown.total
    if saved <= 0:
        return []
    return [f"optimizer_implementation 'fused' would peak at {r.breakdown.total} bytes "
            f"({gib(r.breakdown.total)}, {r.peak_phase}): {saved} bytes ({gib(saved)}) less "
            "(replayed)"]


def what_fits(req: MemoryRequest, model: ResolvedModel, device: str, ckpt, bd: Breakdown,
              phase: str, reserve: int, fit: Fit, variant) -> list[str]:
    """When the setup does not fit: by how much, and single changes that do, each computed by
    the planner (a replay of the changed setup, or for ZeRO-3 the sharded model states)."""
    tr, par = req.training, req.parallelism
    mem = fit.memory_bytes
    where = fit.gpu or f"{mem} bytes"
    out = [f"does not fit on {where}: peak {gib(bd.total)} + allocator reserve {gib(reserve)} "
           f"is {gib(-fit.headroom_bytes)} over its {gib(mem)}"]

    def need(r: MemoryResult) -> int:
        return r.breakdown.total + r.allocator_reserve_bytes

    fits: list[str] = []
    short: list[str] = []

    def tried(change: str, r: MemoryResult | None) -> None:
        if r is None:
            return
        text = f"{change}: peak {gib(r.breakdown.total)}"
        (fits if need(r) <= mem else short).append(text)

    b, ga = tr.micro_batch_size, tr.gradient_accumulation_steps
    best = fit.max_micro_batch_size
    if best is not None and best < b:
        steps = -(-b * ga // best)
        fits.append(f"micro_batch_size {best} (the largest that fits; gradient_accumulation_steps "
                    f"{steps} keeps at least {b * ga} sequences per step)")
    single = model.architecture_known and tr.implementation == "reference" \
        and single_device(par)
    if single:
        L = model.num_layers
        if len(ckpt) < L and tr.activation_checkpointing.strategy != "budget":
            tried("activation_checkpointing 'full'",
                  variant(req, model, device, frozenset(range(L)),
                           activation_checkpointing=ActivationCheckpointing(strategy="full")))
        if tr.loss.kind == "standard" and not phase.startswith("optimizer"):
            tried("loss 'chunked-linear' (8 chunks: head and cross-entropy recomputed per chunk "
                  "in backward)", variant(req, model, device, ckpt,
                                          loss=LossSpec(kind="chunked-linear", chunks=8)))
        if tr.optimizer_implementation != "fused" and phase.startswith("optimizer"):
            tried("optimizer_implementation 'fused'",
                  variant(req, model, device, ckpt, optimizer_implementation="fused"))
        if tr.precision != "bf16" and tr.precision_overrides is None \
                and (tr.lora is None or tr.lora.base_dtype is None):
            tried("precision 'bf16' (16-bit parameters, gradients and optimizer states, no fp32 "
                  "master copy)", variant(req, model, device, ckpt, precision="bf16"))
    zero = _zero3_fits(model, tr, par, device, ckpt, mem) if par.data_parallel == 1 \
        and par.tensor_parallel == par.pipeline_parallel == 1 and tr.implementation == "reference" \
        else None
    if zero:
        fits.append(zero)
    if fits:
        out.append("fits instead (one change each): " + "; ".join(fits))
    if short:
        out.append("does not fit either (one change each): " + "; ".join(short))
    return out


def _zero3_fits(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str, ckpt,
                mem: int) -> str | None:
    """The fewest data-parallel ranks (a power of two) over which ZeRO-3 (FSDP2) leaves room:
    the per-rank model states exactly (``shard_model_states``), plus this step's own activation
    and temporary peak (the single-device replay's, an approximation: POST /v1/zero gives the
    ranks' peaks)."""
    extra = 0
    if model.architecture_known:
        pk = step_cache.simulate(model, tr, device, frozenset(ckpt))
        extra = pk.act_peak.total
    if extra + allocator_reserve(extra, device) > mem:  # every total below is at least extra
        return None
    n = 2
    while n <= min(MAX_RANKS, 4096):
        p = par.model_copy(update={"data_parallel": n, "zero_stage": 3})
        try:
            ms = shard_model_states(model, tr, p)
        except ValueError:
            return None
        states = ms.parameters + ms.gradients + ms.optimizer_states + ms.buffers
        total = states + max(extra, ms.step_temporaries)
        if total + allocator_reserve(total, device) <= mem:
            rest = (f", about {gib(total)} with this step's activations and temporaries"
                    if model.architecture_known else "")
            return (f"zero_stage 3 (FSDP2) over data_parallel {n}: model states "
                    f"{gib(states)} per rank{rest}; POST /v1/zero with data_parallel {n} "
                    "gives each stage's peak")
        n *= 2
    return None
