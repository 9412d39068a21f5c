"""Per-device memory of one training step: the answer to POST /v1/memory.

For ``implementation="reference"`` on one device the breakdown is the step simulator's replay of
the reference step (``planner/reference_step.py``): byte-exact against the measured step on CPU
(tests/test_accuracy.py). Data, tensor and pipeline parallelism and ZeRO change what each device
holds; ``planner/zero.py`` states how, per implementation, and the response lists every such
assumption. ``implementation="megatron"`` uses Korthikanti et al. 2022 (``planner/megatron.py``).
"""

from __future__ import annotations

import functools
import math

from planner.catalog import get_gpu, resolve_model
from planner.errors import PlanningError
from planner import step_cache
from planner.specs import (
    MAX_STAGE_MICROBATCHES,
    ActivationCheckpointing,
    Assumption,
    Breakdown,
    Fit,
    HardwareSpec,
    MemoryRequest,
    MemoryResult,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)

# Caching-allocator headroom on CUDA, reported separately from the allocated peak: PyTorch's
# allocator rounds blocks (512 B, 2 MiB segments) and fragments; max_memory_reserved() is
# typically 2-10% above max_memory_allocated() in steady training. We assume 5%.
ALLOCATOR_RESERVE_FRACTION = 0.05


def _check(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec) -> None:
    if par.offload_parameters and par.zero_stage != 3:
        raise PlanningError("offload_parameters needs zero_stage 3 (FSDP2 CPUOffloadPolicy)",
                            "parallelism.offload_parameters")
    if par.offload_optimizer and par.zero_stage == 0:
        raise PlanningError("offload_optimizer needs zero_stage >= 1", "parallelism.offload_optimizer")
    if par.virtual_pipeline_stages > 1 and par.pipeline_parallel == 1:
        raise PlanningError("virtual_pipeline_stages > 1 needs pipeline_parallel > 1",
                            "parallelism.virtual_pipeline_stages")
    if par.sequence_parallel and par.tensor_parallel == 1:
        raise PlanningError("sequence_parallel needs tensor_parallel > 1", "parallelism.sequence_parallel")
    if not model.architecture_known:
        return
    if par.tensor_parallel > 1:
        kv = model.num_kv_heads or model.num_heads
        if model.num_heads % par.tensor_parallel or kv % par.tensor_parallel:
            raise PlanningError(
                f"tensor_parallel ({par.tensor_parallel}) must divide num_heads ({model.num_heads}) "
                f"and num_kv_heads ({kv})", "parallelism.tensor_parallel")
    if par.pipeline_parallel * par.virtual_pipeline_stages > model.num_layers:
        raise PlanningError(
            f"pipeline_parallel x virtual_pipeline_stages ({par.pipeline_parallel * par.virtual_pipeline_stages}) "
            f"exceeds num_layers ({model.num_layers})", "parallelism.pipeline_parallel")
    actions = par.pipeline_parallel * par.virtual_pipeline_stages * tr.gradient_accumulation_steps
    if par.pipeline_parallel > 1 and actions > MAX_STAGE_MICROBATCHES:
        raise PlanningError(
            f"pipeline_parallel x virtual_pipeline_stages x gradient_accumulation_steps must be "
            f"<= {MAX_STAGE_MICROBATCHES} (as for POST /v1/pipeline), got {actions}",
            "training.gradient_accumulation_steps")
    if model.family == "gpt2" and tr.sequence_length > model.max_sequence_length:
        raise PlanningError(
            f"sequence_length ({tr.sequence_length}) exceeds the learned position table "
            f"({model.max_sequence_length})", "training.sequence_length")
    if tr.lora is not None and model.family == "gpt2" and "gate" in tr.lora.target_modules:
        raise PlanningError(
            "gpt2 blocks have no gate projection (their MLP is up and down): LoRA targets q, k, "
            "v, o, up or down there", "training.lora.target_modules")
    if tr.lora is not None and tr.lora.base_dtype in ("fp32", "bf16", "fp16"):
        pdt = {"fp32": "fp32", "amp-bf16": "fp32", "amp-fp16": "fp32", "mixed-bf16": "bf16",
               "mixed-fp16": "fp16", "bf16": "bf16"}[tr.precision]
        if not tr.precision.startswith("amp-") and tr.lora.base_dtype != pdt:
            raise PlanningError(
                f"lora.base_dtype {tr.lora.base_dtype} differs from the {pdt} parameters of "
                f"precision {tr.precision}: without autocast the matmul dtypes must agree",
                "training.lora.base_dtype")
    ov = tr.precision_overrides
    if ov is not None and ov.gradients is not None:
        pdt = ov.parameters or {"mixed-bf16": "bf16", "mixed-fp16": "fp16", "bf16": "bf16"}.get(
            tr.precision, "fp32")
        if ov.gradients != pdt and not tr.precision.startswith("mixed-"):
            raise PlanningError(
                f"gradients in {ov.gradients} on {pdt} parameters need a master-weight preset "
                "(mixed-bf16 / mixed-fp16): torch.optim steps a parameter with its own-dtype "
                "gradient", "training.precision_overrides.gradients")
        if ov.gradients in ("int8", "nf4"):
            raise PlanningError("gradients cannot be quantized", "training.precision_overrides.gradients")
    ac = tr.activation_checkpointing
    if ac.strategy == "every-k" and ac.every_k is None:
        raise PlanningError("strategy 'every-k' needs every_k", "training.activation_checkpointing.every_k")
    if ac.blocks and max(ac.blocks) >= model.num_layers:
        raise PlanningError(
            f"training.activation_checkpointing.blocks: block {max(ac.blocks)} is not below "
            f"num_layers ({model.num_layers})", "training.activation_checkpointing.blocks")


def checkpointed_blocks(tr: TrainingSpec, num_layers: int) -> set[int]:
    """Block indices the reference step wraps in torch.utils.checkpoint for named strategies
    (the same rule as service.validation.step.checkpointed_blocks); an explicit plan
    (``blocks``: strategy 'blocks' or a resolved 'budget') as given."""
    ac = tr.activation_checkpointing
    if ac.blocks is not None:
        return set(ac.blocks)
    if ac.strategy == "full":
        return set(range(num_layers))
    if ac.strategy == "every-k":
        k = ac.every_k or 1
        return {i for i in range(num_layers) if i % k == 0}
    if ac.strategy == "sqrt":  # Chen et al. 2016: one kept block per ~sqrt(n)
        k = max(1, round(math.sqrt(num_layers)))
        return {i for i in range(num_layers) if i % k != k - 1}
    return set()


def _hardware_bytes(hw: HardwareSpec | None) -> tuple[str | None, int | None]:
    if hw is None:
        return None, None
    if hw.gpu is not None:
        g = get_gpu(hw.gpu)
        return g.name, hw.memory_bytes or g.memory_bytes
    return None, hw.memory_bytes


def _reserve(total: int, device: str) -> int:
    return 0 if device == "cpu" else int(total * ALLOCATOR_RESERVE_FRACTION)


def clear_caches() -> None:
    """Forget every memoised replay and template (benchmarks measure cold estimates with it)."""
    step_cache.clear()


def _bd(d: dict[str, int]) -> Breakdown:
    return Breakdown(**d)


def _snap_bd(p) -> Breakdown:
    c = p.by_cat
    return Breakdown(parameters=c[0], gradients=c[1], optimizer_states=c[2], activations=c[3],
                     temporaries=c[4], total=p.total)


# The assumptions every estimate states (the specs are frozen, so one instance serves all).
_RESERVE_NOTE = "caching-allocator rounding and fragmentation, on top of the allocated peak"
_RESERVE_CPU = Assumption(name="allocator_reserve", value="0", note=_RESERVE_NOTE)
_RESERVE_CUDA = Assumption(name="allocator_reserve",
                           value=f"{ALLOCATOR_RESERVE_FRACTION:.0%} of peak", note=_RESERVE_NOTE)
_ZERO_GRAD = Assumption(name="zero_grad", value="set_to_none=True",
                        note="gradients are freed after each optimizer step")
_PROFILE_REFERENCE = Assumption(name="profile", value="reference step, simulated op by op",
                                note="the step measured by validation jobs")


def estimate_memory(req: MemoryRequest, device: str = "cuda", explain: bool = True) -> MemoryResult:
    """Per-device peak of one training step, by category (see module docstring).

    ``device`` selects kernel details that differ between CPU and CUDA builds of the reference
    step (e.g. layer-norm statistics dtype); estimates for a GPU use ``cuda``. ``explain``: the
    notes that read the figures (bytes per parameter, what fits instead), each of which may
    replay a variant of the setup; searches that read only the peak pass False."""
    model = resolve_model(req.model)
    _check(model, req.training, req.parallelism)
    ac = req.training.activation_checkpointing
    if ac.strategy == "budget" and ac.blocks is None:  # unresolved: search the plan
        return _budget(req, model, device, explain)
    ckpt = _blocks(req.training, model.num_layers) if model.architecture_known else frozenset()
    return _estimate(req, model, device, ckpt, explain=explain)


def _blocks(tr: TrainingSpec, num_layers: int) -> frozenset[int]:
    """checkpointed_blocks as a frozenset, memoised for the named strategies."""
    ac = tr.activation_checkpointing
    if ac.blocks is not None:
        return frozenset(ac.blocks)
    return _named_blocks(ac.strategy, ac.every_k, num_layers)  # plain keys: cheap to compare


@functools.lru_cache(maxsize=1024)
def _named_blocks(strategy: str, every_k: int | None, num_layers: int) -> frozenset[int]:
    ac = ActivationCheckpointing(strategy=strategy, every_k=every_k)
    return frozenset(checkpointed_blocks(TrainingSpec(activation_checkpointing=ac), num_layers))


@functools.lru_cache(maxsize=1024)
def _ckpt_assumption(ckpt: frozenset[int]) -> Assumption:
    return Assumption(name="checkpointed_blocks", value=_ranges(sorted(ckpt)),
                      note="torch.utils.checkpoint(use_reentrant=False)")


def _estimate(req: MemoryRequest, model: ResolvedModel, device: str, ckpt: set[int],
              extra_notes: list[str] | None = None, explain: bool = False) -> MemoryResult:
    tr, par = req.training, req.parallelism
    gpu_name, mem_bytes = _hardware_bytes(req.hardware)
    assumptions: list[Assumption] = [_RESERVE_CPU if device == "cpu" else _RESERVE_CUDA,
                                     _ZERO_GRAD]
    notes: list[str] = list(extra_notes or [])
    first, peaks = None, {}
    if not model.architecture_known:
        bd, phase = _model_states_only(model, tr, par, assumptions), "model states only"
        notes.append("bare num_parameters: activations and temporaries need the architecture "
                     "(family, layers, hidden size, heads, vocabulary), so only model states are given")
        if explain:
            notes.extend(_bytes_per_parameter(model, tr, par, bd, bare=True))
    elif tr.implementation == "megatron":
        bd, phase = _megatron(model, tr, par, assumptions)
        peaks = _fb_fields(bd.activations, bd, phase)  # Korthikanti et al.: the forward's end
    else:
        bd, first, phase, peaks = _reference(model, tr, par, device, ckpt, assumptions, notes)
        if ckpt:
            assumptions.append(_ckpt_assumption(frozenset(ckpt)))
    reserve = _reserve(bd.total, device)
    fit = None
    if mem_bytes is not None:
        fit = Fit(gpu=gpu_name, memory_bytes=mem_bytes, fits=bd.total + reserve <= mem_bytes,
                  headroom_bytes=mem_bytes - bd.total - reserve,
                  max_micro_batch_size=_max_micro_batch(req, model, device, ckpt, mem_bytes)
                  if model.architecture_known else None)
    if explain and model.architecture_known and tr.implementation == "reference" \
            and _single_device(par) and phase.startswith("optimizer"):
        notes.extend(_bytes_per_parameter(model, tr, par, bd, bare=False))
        notes.extend(_fused_instead(req, model, device, ckpt, bd))
    if explain and fit is not None and not fit.fits:
        notes.extend(_what_fits(req, model, device, ckpt, bd, phase, reserve, fit))
    return MemoryResult(model=model, breakdown=bd, first_step=first, peak_phase=phase,
                        allocator_reserve_bytes=reserve, fit=fit, assumptions=assumptions,
                        notes=notes, **peaks)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _model_states_reading(model: ResolvedModel, tr: TrainingSpec, bd: Breakdown) -> str:
    """'X bytes/parameter (parameters a + gradients b + optimizer states c)', per parameter of
    the model; for mixed-precision Adam the ZeRO paper's 16Ψ (Rajbhandari et al. 2020, §3.1:
    2 + 2 + K with K = 12: the fp32 master copy, momentum and variance)."""
    psi = model.num_parameters
    per = [bd.parameters / psi, bd.gradients / psi, bd.optimizer_states / psi]
    text = (f"model states {sum(per):.1f} bytes/parameter (parameters {per[0]:.1f} + gradients "
            f"{per[1]:.1f} + optimizer states {per[2]:.1f}")
    if tr.precision.startswith("mixed-") and tr.optimizer in ("adam", "adamw") \
            and tr.precision_overrides is None and tr.lora is None:
        text += ": the ZeRO paper's 16Ψ, 2 + 2 + 12 with the fp32 master copy, momentum and variance"
    return text + ")"


def _bytes_per_parameter(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
                         bd: Breakdown, bare: bool) -> list[str]:
    """How the peak reads per parameter when the optimizer step holds it (a preset and a bare
    count of the same model differ by the step's temporaries: both are right)."""
    if not _single_device(par):
        return []
    psi = model.num_parameters
    states = bd.parameters + bd.gradients + bd.optimizer_states
    if bare:
        return [f"{_model_states_reading(model, tr, bd)}; the optimizer step's temporaries "
                f"(the {tr.optimizer_implementation} kernels' intermediates, and the fp32 gradient "
                "copies of a master-weight step) are not included: they need the architecture"]
    from planner.optimizers import master_weight_step_temporary_bytes

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


def _variant(req: MemoryRequest, model: ResolvedModel, device: str, ckpt,
             **training: object) -> MemoryResult | None:
    """The same setup with ``training`` fields changed, estimated (replayed) without hardware
    and notes; None when the change is not a valid setup."""
    tr = req.training.model_copy(update=training)
    try:
        tr = TrainingSpec.model_validate(tr.model_dump())  # the spec's own rules
        return _estimate(req.model_copy(update={"training": tr, "hardware": None}), model,
                         device, ckpt)
    except (ValueError, PlanningError):
        return None


def _fused_instead(req: MemoryRequest, model: ResolvedModel, device: str, ckpt,
                   bd: Breakdown) -> list[str]:
    """What ``optimizer_implementation: fused`` would change: the same setup replayed with the
    fused kernel (torch.optim's ``_fused_*``: one kernel per tensor group, no intermediates)."""
    tr = req.training
    if tr.optimizer_implementation == "fused":
        return []
    r = _variant(req, model, device, ckpt, optimizer_implementation="fused")
    if r is None:
        return [f"optimizer_implementation 'fused' does not exist for {tr.optimizer!r} in "
                "torch.optim (fused: SGD, Adam, AdamW, Adagrad)"]
    saved = bd.total - r.breakdown.total
    if saved <= 0:
        return []
    return [f"optimizer_implementation 'fused' would peak at {r.breakdown.total} bytes "
            f"({_gib(r.breakdown.total)}, {r.peak_phase}): {saved} bytes ({_gib(saved)}) less "
            "(replayed)"]


def _what_fits(req: MemoryRequest, model: ResolvedModel, device: str, ckpt, bd: Breakdown,
               phase: str, reserve: int, fit: Fit) -> list[str]:
    """When the setup does not fit: by how much, and single changes that do, each computed by
    the planner (a replay of the changed setup, or for ZeRO-3 the sharded model states)."""
    tr, par = req.training, req.parallelism
    mem = fit.memory_bytes
    where = fit.gpu or f"{mem} bytes"
    out = [f"does not fit on {where}: peak {_gib(bd.total)} + allocator reserve {_gib(reserve)} "
           f"is {_gib(-fit.headroom_bytes)} over its {_gib(mem)}"]

    def need(r: MemoryResult) -> int:
        return r.breakdown.total + r.allocator_reserve_bytes

    fits: list[str] = []
    short: list[str] = []

    def tried(change: str, r: MemoryResult | None) -> None:
        if r is None:
            return
        text = f"{change}: peak {_gib(r.breakdown.total)}"
        (fits if need(r) <= mem else short).append(text)

    b, ga = tr.micro_batch_size, tr.gradient_accumulation_steps
    best = fit.max_micro_batch_size
    if best is not None and best < b:
        steps = -(-b * ga // best)
        fits.append(f"micro_batch_size {best} (the largest that fits; gradient_accumulation_steps "
                    f"{steps} keeps at least {b * ga} sequences per step)")
    single = model.architecture_known and tr.implementation == "reference" \
        and _single_device(par)
    if single:
        L = model.num_layers
        if len(ckpt) < L and tr.activation_checkpointing.strategy != "budget":
            tried("activation_checkpointing 'full'",
                  _variant(req, model, device, frozenset(range(L)),
                           activation_checkpointing=ActivationCheckpointing(strategy="full")))
        if tr.optimizer_implementation != "fused" and phase.startswith("optimizer"):
            tried("optimizer_implementation 'fused'",
                  _variant(req, model, device, ckpt, optimizer_implementation="fused"))
        if tr.precision != "bf16" and tr.precision_overrides is None \
                and (tr.lora is None or tr.lora.base_dtype is None):
            tried("precision 'bf16' (16-bit parameters, gradients and optimizer states, no fp32 "
                  "master copy)", _variant(req, model, device, ckpt, precision="bf16"))
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
    from planner.specs import MAX_RANKS
    from planner.zero import shard_model_states

    extra = 0
    if model.architecture_known:
        pk = step_cache.simulate(model, tr, device, frozenset(ckpt))
        extra = pk.act_peak.total
    n = 2
    while n <= min(MAX_RANKS, 4096):
        p = par.model_copy(update={"data_parallel": n, "zero_stage": 3})
        try:
            ms = shard_model_states(model, tr, p)
        except ValueError:
            return None
        states = ms.parameters + ms.gradients + ms.optimizer_states + ms.buffers
        total = states + max(extra, ms.step_temporaries)
        if total + _reserve(total, device) <= mem:
            rest = (f", about {_gib(total)} with this step's activations and temporaries"
                    if model.architecture_known else "")
            return (f"zero_stage 3 (FSDP2) over data_parallel {n}: model states "
                    f"{_gib(states)} per rank{rest}; POST /v1/zero with data_parallel {n} "
                    "gives each stage's peak")
        n *= 2
    return None


def _fb_fields(activation_peak: int | None, fb: Breakdown | None, fb_phase: str | None) -> dict:
    """MemoryResult's activation peak and forward/backward peak."""
    return {"activation_peak_bytes": activation_peak, "forward_backward_peak": fb,
            "forward_backward_peak_phase": fb_phase}


def _replayed_fields(peaks) -> dict:
    """The activation and forward/backward peaks of a replayed step (StepPeaks)."""
    fb = peaks.fb_steady
    return _fb_fields(peaks.act_max.total, _snap_bd(fb), f"{fb.phase}: {fb.op}")


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _single_device(par: ParallelSpec) -> bool:
    return (par.data_parallel == par.tensor_parallel == par.pipeline_parallel == 1
            and par.zero_stage == 0)


def _reference(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
               ckpt: set[int], assumptions: list[Assumption], notes: list[str]):
    if _single_device(par):
        peaks = step_cache.simulate(model, tr, device, frozenset(ckpt))
        steady, first = peaks.steady, peaks.first
        assumptions.append(_PROFILE_REFERENCE)
        return (_snap_bd(steady), _snap_bd(first), f"{steady.phase}: {steady.op}",
                _replayed_fields(peaks))
    from planner.reference_parallel import unsupported_reason

    if (par.data_parallel > 1 or par.zero_stage > 0) and unsupported_reason(tr, par) is None:
        # ZeRO on one data-parallel rank included: DDP + ZeroRedundancyOptimizer, or FSDP2's
        # world-size-1 path, replayed (measured by tests/test_zero_one_rank.py)
        return _data_parallel(model, tr, par, device, ckpt, assumptions, notes)
    if par.pipeline_parallel > 1 and not ckpt:
        from planner.pipeline_memory import pipelined_estimate

        pp = pipelined_estimate(model, tr, par, device)
        if pp is not None:  # every pipeline rank replayed; the worst one reported
            worst, _, extra, pp_notes = pp
            assumptions.extend(extra)
            notes.extend(pp_notes)
            return (_bd(worst.steady.as_dict()), _bd(worst.first.as_dict()),
                    f"{worst.steady.phase}: {worst.steady.op} (rank {worst.rank})", {})
    return _composed(model, tr, par, device, ckpt, assumptions, notes)


def _dp_peaks(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              checkpointed: frozenset[int]):
    from planner.reference_parallel import data_parallel_peaks

    def simulate(model, tr, par, rank, device, ck):
        return step_cache.simulate(model, tr, device, checkpointed, par, rank)

    def ownership(model, tr, par):
        return step_cache.setup_memo(_worst_ownership, model, tr, par)
    return data_parallel_peaks(model, tr, par, device, set(checkpointed), every_rank=False,
                               simulate=simulate, ownership=ownership)


def _worst_ownership(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec):
    """zero1_ownership kept for the worst-rank candidates only (what is memoised: a million
    ranks' keys would not be)."""
    from planner.reference_parallel import zero1_ownership

    keys, worst = zero1_ownership(model, tr, par)
    return {r: keys[r] for r in worst}, worst


def _data_parallel(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
                   ckpt: set[int], assumptions: list[Assumption], notes: list[str]):
    """Data parallelism (DDP, ZeRO 1-3): every rank's step replayed op by op with what its
    implementation allocates (planner/reference_parallel.py); the worst rank is reported."""
    from planner.zero import shard_model_states

    peaks = _dp_peaks(model, tr, par, device, frozenset(ckpt))
    rank, worst = max(peaks, key=lambda rp: (rp[1].steady.total, -rp[0]))
    ms = step_cache.setup_memo(shard_model_states, model, tr, par)
    assumptions.append(_PROFILE_DATA_PARALLEL)
    assumptions.append(_assumption("implementation", ms.implementation, "what each rank holds"))
    assumptions.append(_assumption("worst_rank", str(rank),
                                   "the rank with the highest steady-state peak"))
    return (_snap_bd(worst.steady), _snap_bd(worst.first), f"{worst.steady.phase}: {worst.steady.op}",
            _replayed_fields(worst))


_PROFILE_DATA_PARALLEL = Assumption(
    name="profile", value="reference step per data-parallel rank, simulated op by op",
    note="the step measured by multi-rank validation jobs")
@functools.lru_cache(maxsize=4096)
def _assumption(name: str, value: str, note: str) -> Assumption:
    """An Assumption, shared between estimates (frozen specs)."""
    return Assumption(name=name, value=value, note=note)


def _composed(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              ckpt: set[int], assumptions: list[Assumption], notes: list[str]):
    """Several devices: model states per rank from planner.zero; activations and temporaries of
    the simulated single-device step, split as the parallel layout splits them."""
    from planner.zero import shard_model_states

    try:
        ms = step_cache.setup_memo(shard_model_states, model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "parallelism") from exc
    t, p = par.tensor_parallel, par.pipeline_parallel
    peaks = step_cache.simulate(model, tr, device, frozenset(ckpt))
    fb = peaks.act_peak.as_dict()
    act, tmp = fb["activations"], fb["temporaries"]
    act_max = peaks.act_max.total
    assumptions.append(Assumption(
        name="composition", value="sharded model states + single-device activation peak",
        note="activations and temporaries at their own peak in the reference step, added to the "
             "per-rank model states (an upper bound when the two peaks do not coincide)"))
    if t > 1:
        # Megatron tensor parallelism (Korthikanti et al. 2022, Table 2): of the 34·sbh + 5·as²b
        # per-layer terms, 10·sbh stay replicated without sequence parallelism and the rest divide
        # by t; with sequence parallelism everything divides by t.
        replicated = 0.0 if par.sequence_parallel else 10 / 34
        act = int(act * (replicated + (1 - replicated) / t))
        act_max = int(act_max * (replicated + (1 - replicated) / t))
        tmp = tmp // t
        assumptions.append(Assumption(name="tensor_parallel_activations",
                                      value="Korthikanti et al. 2022 Table 2 split",
                                      note="not measured by the reference step"))
    if p > 1:
        per_stage = math.ceil(model.num_layers / p) / model.num_layers
        inflight = _first_stage_in_flight(par.pipeline_schedule, p,
                                          max(tr.gradient_accumulation_steps, p),
                                          par.virtual_pipeline_stages)
        act = int(act * per_stage * inflight)
        act_max = int(act_max * per_stage * inflight)
        assumptions.append(Assumption(
            name="pipeline_in_flight", value=str(inflight),
            note=f"micro-batches in flight on the first stage under {par.pipeline_schedule} "
                 "(planner.pipeline simulation); the first stage is the bottleneck"))
    bd = Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                   optimizer_states=ms.optimizer_states, activations=act,
                   temporaries=tmp + ms.buffers,
                   total=ms.parameters + ms.gradients + ms.optimizer_states + act + tmp + ms.buffers)
    assumptions.append(Assumption(name="implementation", value=ms.implementation,
                                  note="what the per-rank model states describe"))
    notes.extend(ms.notes)
    phase = "backward (activations of all in-flight micro-batches live)"
    return bd, None, phase, _fb_fields(act_max, bd, phase)


@functools.lru_cache(maxsize=256)
def _first_stage_in_flight(schedule: str, p: int, m: int, v: int) -> int:
    """Micro-batches in flight on the first stage (planner.pipeline's simulation; p where the
    schedule's constraints do not hold: /v1/pipeline reports those)."""
    from planner.pipeline import in_flight_microbatches

    try:
        return in_flight_microbatches(schedule, p, m, v)[0]
    except Exception:  # noqa: BLE001 - schedule constraints are reported by /v1/pipeline
        return p


def _megatron(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
              assumptions: list[Assumption]):
    from planner.megatron import megatron_activation_bytes
    from planner.zero import shard_model_states

    try:
        act = int(megatron_activation_bytes(model, tr, par))
        ms = shard_model_states(model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "training.activation_checkpointing") from exc
    assumptions.append(Assumption(name="profile", value="megatron",
                                  note="Korthikanti et al. 2022, Table 2 and §4.3"))
    bd = Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                   optimizer_states=ms.optimizer_states, activations=act, temporaries=ms.buffers,
                   total=ms.parameters + ms.gradients + ms.optimizer_states + act + ms.buffers)
    return bd, "end of forward (Korthikanti et al. activation total)"


def _model_states_only(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec,
                       assumptions: list[Assumption]) -> Breakdown:
    from planner.zero import shard_model_states

    try:
        ms = shard_model_states(model, tr, par)
    except ValueError as exc:
        raise PlanningError(str(exc), "parallelism") from exc
    tmp = ms.buffers + ms.step_temporaries
    assumptions.append(Assumption(name="implementation", value=ms.implementation))
    return Breakdown(parameters=ms.parameters, gradients=ms.gradients,
                     optimizer_states=ms.optimizer_states, activations=0, temporaries=tmp,
                     total=ms.parameters + ms.gradients + ms.optimizer_states + tmp)


def _max_micro_batch(req: MemoryRequest, model: ResolvedModel, device: str, ckpt: set[int],
                     mem_bytes: int) -> int | None:
    """Largest micro-batch whose peak (plus allocator reserve) fits.

    Every live tensor is non-decreasing in the batch, so the peak is monotone and a bracket
    [largest size seen to fit, smallest seen not to] always holds the answer. Every tensor's size
    is also affine in the batch (the op sequence does not depend on it), so the peak is a maximum
    of affine functions: the secant through two probes predicts where the budget is crossed, and
    it is exact on each linear piece. Probes follow the secant (clamped into the bracket) and
    then its neighbour, falling back to bisection when the bracket stops shrinking; every answer
    is a measured fit and a measured non-fit next to it, so the result equals the exponential +
    binary search (``_max_micro_batch_search``) whatever the prediction's quality."""
    from planner.specs import MAX_BATCH

    memo: dict[int, int] = {}
    direct = _template_need(req, model, device, ckpt)

    def need(b: int) -> int:
        if b not in memo:
            fast = direct(b) if direct is not None else None
            if fast is None:
                tr = req.training.model_copy(update={"micro_batch_size": b})
                r = _estimate(req.model_copy(update={"training": tr, "hardware": None}), model,
                              device, ckpt)
                fast = r.breakdown.total + r.allocator_reserve_bytes
            memo[b] = fast
        return memo[b]

    if need(1) > mem_bytes:
        return None
    if MAX_BATCH == 1:
        return 1
    lo, hi = 1, MAX_BATCH + 1  # need(lo) fits; hi does not (MAX_BATCH + 1 is never allowed)

    def probe(b: int) -> None:
        nonlocal lo, hi
        if need(b) <= mem_bytes:
            lo = max(lo, b)
        else:
            hi = min(hi, b)

    probe(2)
    while hi - lo > 1:
        width = hi - lo
        # secant through the two highest probes at or below lo (all fit) or through lo and hi
        known = sorted(memo)
        if hi in memo:
            x0, x1 = lo, hi
        else:
            below = [b for b in known if b <= lo]
            x0, x1 = (below[-2], below[-1]) if len(below) >= 2 else (lo, lo)
        slope = (memo[x1] - memo[x0]) / (x1 - x0) if x1 != x0 else 0.0
        if slope > 0:
            g = x0 + int((mem_bytes - memo[x0]) // slope)
        else:
            g = hi - 1
        g = min(max(g, lo + 1), hi - 1)
        probe(g)
        if lo == g and g + 1 < hi:  # the prediction fits: is it the last that does?
            probe(g + 1)
        if hi - lo > width // 2 and hi - lo > 1:  # little progress: bisect once
            probe((lo + hi) // 2)
    return lo


def _template_need(req: MemoryRequest, model: ResolvedModel, device: str, ckpt):
    """For a single-device reference estimate: ``b -> peak + reserve`` straight from the setup's
    template when it is compiled for b's domain (None otherwise: the caller estimates), the
    same number ``_estimate`` gives without building a response."""
    tr, par = req.training, req.parallelism
    if not (model.architecture_known and tr.implementation == "reference"
            and _single_device(par)):
        return None
    t, ck = tr.sequence_length, frozenset(ckpt)

    def need(b: int) -> int | None:
        tpl = step_cache.compiled_template(model, tr, device, ck, b)
        if tpl is None:
            return None
        total = tpl.evaluate(b, t).steady.total
        return total + _reserve(total, device)
    return need


def _max_micro_batch_search(req: MemoryRequest, model: ResolvedModel, device: str,
                            ckpt: set[int], mem_bytes: int) -> int | None:
    """The straightforward answer: exponential then binary search, one estimate per probe
    (the reference ``_max_micro_batch`` is tested against)."""
    from planner.specs import MAX_BATCH

    def fits(b: int) -> bool:
        tr = req.training.model_copy(update={"micro_batch_size": b})
        r = _estimate(req.model_copy(update={"training": tr, "hardware": None}), model, device, ckpt)
        return r.breakdown.total + r.allocator_reserve_bytes <= mem_bytes

    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _budget(req: MemoryRequest, model: ResolvedModel, device: str,
            explain: bool = False) -> MemoryResult:
    """Fewest checkpointed blocks whose peak fits the budget. The reference model's blocks are
    identical, so recompute time grows with their number while the peak falls: the smallest
    feasible count is optimal for this homogeneous chain (explicit heterogeneous chains go to
    POST /v1/checkpointing)."""
    if not model.architecture_known:
        raise PlanningError("strategy 'budget' needs the architecture", "model")
    ac = req.training.activation_checkpointing
    _, mem = _hardware_bytes(req.hardware)
    budget = ac.budget_bytes or mem
    if budget is None:
        raise PlanningError("strategy 'budget' needs budget_bytes or hardware",
                            "training.activation_checkpointing.budget_bytes")
    L = model.num_layers

    def peak(k: int) -> int:
        r = _estimate(req.model_copy(update={"hardware": None}), model, device, set(range(k)))
        return r.breakdown.total + r.allocator_reserve_bytes

    if peak(L) > budget:
        return _estimate(req, model, device, set(range(L)), [
            f"no placement fits the budget of {budget} bytes: the smallest achievable peak is "
            f"{peak(L)} bytes (every block checkpointed)"], explain=explain)
    lo, hi = 0, L
    while lo < hi:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return _estimate(req, model, device, set(range(lo)), [
        f"budget {budget} bytes: {lo} of {L} blocks checkpointed"], explain=explain)
