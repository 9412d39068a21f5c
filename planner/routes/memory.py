"""Per-device memory of one training step: the answer to POST /v1/memory.

For ``implementation="reference"`` on one device the breakdown is the step simulator's replay of
the reference step (``planner/step/program.py``): byte-exact against the measured step on CPU
(tests/test_accuracy.py). Data, tensor and pipeline parallelism and ZeRO change what each device
holds; ``planner/layouts/sharding.py`` states how, per implementation, and the response lists every such
assumption. ``implementation="megatron"`` uses Korthikanti et al. 2022 (``planner/layouts/megatron.py``).
"""

from __future__ import annotations

import contextlib
import functools
import threading

from planner.catalog.errors import PlanningError
from planner.catalog.presets import (
    allocator_reserve,
    get_gpu,
    hf_config_of,
    resolve_model,
)
from planner.catalog.specs import (
    Assumption,
    Fit,
    HardwareSpec,
    MemoryRequest,
    MemoryResult,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.compose import (
    fb_fields,
    megatron,
    model_states_only,
    single_device,
)
from planner.layouts.expert import validate as validate_expert_parallel
from planner.layouts.pipelined import Overflows, stop_above
from planner.machine import cache
from planner.machine.recording import domain_of
from planner.routes import memory_answers, memory_notes
from planner.routes.activation_floor import floor_for
from planner.routes.fused_variant import kept_variant
from planner.routes.checkpoint_blocks import (
    ckpt_assumption,
    frozen_blocks,
)
from planner.routes.loss_rules import loss_assumption
from planner.routes.memory_allocator import (
    _RESERVE_CPU,
    _RESERVE_CUDA,
    _RESERVE_SIMULATED,
    _cuda_allocator,
)
from planner.routes.memory_checks import check_request, check_sizes
from planner.routes.memory_known import ZERO_GRAD as _ZERO_GRAD
from planner.routes.memory_known import result_of, step_answer, step_frame
from planner.routes.memory_reference import _compiled, _one_step, _reference, _template_need
from planner.routes.micro_batch import (
    compile_ahead_pays,
    hold_compiles,
    largest_fitting,
    largest_fitting_search,
)
from planner.routes.plan_suggest import suggestions
from planner.step import simulate as step_cache
from planner.step.allocator_replay import clear_cache as clear_allocator_cache


def hardware_bytes(hw: HardwareSpec | None) -> tuple[str | None, int | None]:
    if hw is None:
        return None, None
    if hw.gpu is not None:
        g = get_gpu(hw.gpu)
        return g.name, hw.memory_bytes or g.memory_bytes
    return None, hw.memory_bytes


def clear_caches() -> None:
    """Forget every memoised replay and template (benchmarks measure cold estimates with it)."""
    step_cache.clear()
    clear_allocator_cache()




def estimate_memory(req: MemoryRequest, device: str = "cuda", explain: bool = True,
                    allocator: bool | None = None) -> MemoryResult:
    """Per-device peak of one training step, by category (see module docstring).

    ``device`` selects kernel details that differ between CPU and CUDA builds of the reference
    step (e.g. layer-norm statistics dtype); estimates for a GPU use ``cuda``. ``explain``: the
    notes that read the figures (bytes per parameter, what fits instead), each of which may
    replay a variant of the setup; searches that read only the peak pass False. ``allocator``
    (default: the request's ``hardware.allocator == "replay"``): replay the CUDA caching
    allocator for ``cuda_allocator`` and the reserve; without it the reserve is the assumed
    fraction."""
    if allocator is None:
        allocator = req.hardware is not None and req.hardware.allocator == "replay"
    key = memory_answers.answer_key(req, device, explain, allocator)
    h, hit = memory_answers.known(key)  # the same request again (planner/routes/memory_answers.py)
    if hit is not None:
        return hit
    setup = None if key is None else _setups_get(key[0])
    if setup is not None:  # a setup that passed every rule: only the sizes' rule is left
        model, ckpt, how, kept = setup
        tr = req.training
        check_sizes(model, tr)
        step_peaks = ranks = None
        if how is not None:  # the step's (rank 0's, the ranks') templates, kept per size domain
            domain = domain_of(tr.micro_batch_size, tr.sequence_length)
            got = kept.get(domain)
            if got is None:
                got = kept[domain] = _compiled(how, model, tr, req.parallelism, device, ckpt)
            if got is not None and how == "pipeline":
                ranks = got
            elif got is not None and req.hardware is None and not allocator:  # step, rank0
                result = step_answer(req, model, device, ckpt, got, *step_frame(
                    kept, how, tr, req.parallelism, device, ckpt, _variant), explain)
                memory_answers.keep(h, key, result)
                return result
            elif got is not None:
                step_peaks = got.evaluate(tr.micro_batch_size, tr.sequence_length)
        result = _estimate(req, model, device, ckpt, explain=explain, allocator=allocator,
                           step_peaks=step_peaks, ranks=ranks,
                           variant=kept_variant(kept, _variant) if how == "step" else _variant)
    else:
        result = _answer(req, device, explain, allocator, None if h is None else key[0])
    memory_answers.keep(h, key, result)
    return result


# a request's setup -> (model, checkpointed blocks, how its answer is evaluated from templates
# and those templates per size domain: ``_one_step``), for setups that passed every rule
_SETUPS: dict[tuple, tuple] = {}
_SETUPS_MAX = 4096
_SETUPS_LOCK = threading.Lock()
cache.on_clear(_SETUPS.clear)


def _setups_get(setup: tuple) -> tuple | None:
    try:
        return _SETUPS.get(setup)
    except TypeError:  # a list inside the request
        return None


def _answer(req: MemoryRequest, device: str, explain: bool, allocator: bool,
            setup: tuple | None = None) -> MemoryResult:
    """The estimate of a request whose setup is not known to pass the rules: checked in full;
    ``setup`` (its key, ``memory_answers.answer_key``) is kept with its model and blocks when
    it passes."""
    if req.parallelism.expert_parallel > 1:  # 422 for a dense model or a misfit ep
        validate_expert_parallel(hf_config_of(req.model), req.parallelism)
    if req.training.implementation == "transformers":
        from planner.routes.hf_memory import estimate_transformers

        return estimate_transformers(req, device)
    model = resolve_model(req.model)
    if model.model_type is not None and not model.architecture_known:
        raise PlanningError(
            f"model_type {model.model_type!r} is estimated through training.implementation "
            "'transformers' (the reference step builds gpt2 and llama configs only, without "
            "biases and with head_dim = hidden_size / heads)", "training.implementation")
    check_request(model, req.training, req.parallelism)
    ac = req.training.activation_checkpointing
    if ac.strategy == "budget" and ac.blocks is None:  # unresolved: search the plan
        return _budget(req, model, device, explain, allocator)
    ckpt = frozen_blocks(req.training, model.num_layers) if model.architecture_known else frozenset()
    if setup is not None:
        with _SETUPS_LOCK:
            if len(_SETUPS) >= _SETUPS_MAX:
                _SETUPS.pop(next(iter(_SETUPS)), None)
            _SETUPS[setup] = (model, ckpt, *_one_step(model, req.training, req.parallelism))
    return _estimate(req, model, device, ckpt, explain=explain, allocator=allocator)


def _estimate(req: MemoryRequest, model: ResolvedModel, device: str, ckpt: set[int],
              extra_notes: list[str] | None = None, explain: bool = False,
              allocator: bool = False, step_peaks=None, ranks=None,
              variant=None) -> MemoryResult:
    """``step_peaks``: the step's peaks (one device, or data-parallel rank 0: StepPeaks)
    already evaluated from its template; ``ranks``: a pipelined setup's compiled ranks
    (``compiled_ranks``), both found for the setup's own estimate; ``variant``: the fused
    note's estimate of a changed setup (``fused_variant``; default ``_variant``)."""
    tr, par = req.training, req.parallelism
    gpu_name, mem_bytes = (None, None) if req.hardware is None else hardware_bytes(req.hardware)
    assumptions: list[Assumption] = [_RESERVE_CPU if device == "cpu" else _RESERVE_CUDA,
                                     _ZERO_GRAD]
    notes: list[str] = list(extra_notes or [])
    first, peaks = None, {}
    if not model.architecture_known:
        bd, phase = model_states_only(model, tr, par, assumptions), "model states only"
        notes.append("bare num_parameters: activations and temporaries need the architecture "
                     "(family, layers, hidden size, heads, vocabulary), so only model states are given")
        if explain:
            notes.extend(memory_notes.bytes_per_parameter(model, tr, par, bd, bare=True))
    elif tr.implementation == "megatron":
        bd, phase = megatron(model, tr, par, assumptions)
        peaks = fb_fields(bd.activations, bd, phase)  # Korthikanti et al.: the forward's end
    else:
        # a micro-batch search follows: compile the template now when it will pay (the sizes
        # it can ask end below the first one a shared activation floor rules out)
        ahead = mem_bytes is not None and compile_ahead_pays(
            _search_top(model, tr, par, device, ckpt, mem_bytes))
        if ahead:
            with cache.compile_first():
                bd, first, phase, peaks = _reference(model, tr, par, device, ckpt, assumptions,
                                                     notes, step_peaks, ranks)
        else:
            bd, first, phase, peaks = _reference(model, tr, par, device, ckpt, assumptions, notes,
                                                 step_peaks, ranks)
        assumptions.append(loss_assumption(tr.loss))
        if ckpt:
            assumptions.append(ckpt_assumption(frozenset(ckpt)))
    cuda_alloc = _cuda_allocator(model, tr, par, device, ckpt, first) if allocator else None
    if cuda_alloc is not None:
        reserve = max(0, cuda_alloc.reserved_bytes - bd.total)
        assumptions[0] = _RESERVE_SIMULATED
    else:
        reserve = allocator_reserve(bd.total, device)
    fit = None
    if mem_bytes is not None:
        fit = Fit(gpu=gpu_name, memory_bytes=mem_bytes, fits=bd.total + reserve <= mem_bytes,
                  headroom_bytes=mem_bytes - bd.total - reserve,
                  max_micro_batch_size=_max_micro_batch(
                      req, model, device, ckpt, mem_bytes,
                      None if cuda_alloc is not None else bd.total + reserve)
                  if model.architecture_known else None)
        if cuda_alloc is not None and fit.max_micro_batch_size is not None:
            fit = fit.model_copy(update={"max_micro_batch_size": _simulated_boundary(
                req, model, device, ckpt, mem_bytes, fit.max_micro_batch_size)})
    if explain and phase.startswith("optimizer") and model.architecture_known \
            and tr.implementation == "reference" and single_device(par):
        notes.extend(memory_notes.bytes_per_parameter(model, tr, par, bd, bare=False))
        notes.extend(memory_notes.fused_instead(req, model, device, ckpt, bd, variant or _variant))
    suggested = []
    if explain and fit is not None and not fit.fits:
        notes.extend(memory_notes.what_fits(req, model, device, ckpt, bd, phase, reserve, fit, _variant))
        if model.architecture_known:
            suggested = suggestions(req, fit.memory_bytes, fit.max_micro_batch_size,
                                    functools.partial(_suggested, device=device), model, device,
                                    activations=peaks.get("activation_peak_bytes"))
    return result_of(model=model, breakdown=bd, first_step=first, peak_phase=phase,
                     allocator_reserve_bytes=reserve, cuda_allocator=cuda_alloc, fit=fit,
                     assumptions=assumptions, notes=notes, suggestions=suggested, **peaks)


def _suggested(req: MemoryRequest, device: str) -> MemoryResult | None:
    """A suggestion's estimate: POST /v1/memory's for the changed request (None when invalid)."""
    try:
        return estimate_memory(req, device, explain=False)
    except (ValueError, PlanningError):
        return None


def _variant(req: MemoryRequest, model: ResolvedModel, device: str, ckpt,
             **training: object) -> MemoryResult | None:
    """The same setup with ``training`` fields changed, estimated (replayed) without hardware
    and notes; None when the change is not a valid setup."""
    try:  # the spec's own rules (its nested specs, unchanged, are valid already)
        tr = TrainingSpec.model_validate({**req.training.__dict__, **training})
        return _estimate(req.model_copy(update={"training": tr, "hardware": None}), model,
                         device, ckpt)
    except (ValueError, PlanningError):
        return None


def _max_micro_batch(req: MemoryRequest, model: ResolvedModel, device: str, ckpt: set[int],
                     mem_bytes: int, need_here: int | None = None) -> int | None:
    """Largest micro-batch whose peak (plus allocator reserve) fits (planner/routes/micro_batch.py),
    each probe from the setup's template when it is compiled, else estimated (a pipeline's up
    to its first rank over the memory); ``need_here``: the request's own micro-batch's,
    already estimated."""
    direct = _template_need(req, model, device, ckpt)

    def need(b: int) -> int:
        fast = direct(b) if direct is not None else None
        if fast is None:
            tr = req.training.model_copy(update={"micro_batch_size": b})
            try:  # a pipeline stops at its first rank over the memory: that rank's need (at
                # most the setup's, over the memory) stands in; the search reads whether a
                # size fits, and its predictions take a bound as they take ``floor``'s
                with stop_above(mem_bytes):
                    r = _estimate(req.model_copy(update={"training": tr, "hardware": None}),
                                  model, device, ckpt)
            except Overflows as over:
                return over.need
            fast = r.breakdown.total + r.allocator_reserve_bytes
        return fast
    b0 = req.training.micro_batch_size
    known = {b0: need_here} if need_here is not None else None
    top = _search_top(model, req.training, req.parallelism, device, ckpt, mem_bytes)
    hold = None if need_here is None else hold_compiles(top, need_here <= mem_bytes)
    floor = floor_for(model, req.training, req.parallelism, device, ckpt)
    with cache.compile_after(hold) if hold else contextlib.nullcontext():
        return largest_fitting(need, mem_bytes, known=known, bound=floor)


def _search_top(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str, ckpt,
                mem_bytes: int | None) -> int:
    """The request's micro-batch, or the first size a shared activation floor puts above the
    memory when that is smaller (``planner/routes/activation_floor.py``; neither then fits): the
    sizes of 2 and up the micro-batch search can estimate lie below it."""
    b0 = tr.micro_batch_size
    floor = None if mem_bytes is None else floor_for(model, tr, par, device, ckpt)
    over = None if floor is None else floor.first_over(mem_bytes)
    return b0 if over is None else min(b0, over)


def _simulated_boundary(req: MemoryRequest, model: ResolvedModel, device: str, ckpt,
                        mem_bytes: int, m: int) -> int | None:
    """The largest fitting micro-batch found with the assumed reserve, moved to where the
    simulated allocator's reserved peak crosses the memory (a probe or two)."""
    def reserved(b: int) -> int | None:
        tr = req.training.model_copy(update={"micro_batch_size": b})
        try:
            tr = TrainingSpec.model_validate(tr.model_dump())
        except ValueError:
            return None
        return _simulated_need(req.model_copy(update={"training": tr}), model, device, ckpt)

    for _ in range(4):
        if m >= 1 and (r := reserved(m)) is not None and r > mem_bytes:
            m -= 1
        elif (r := reserved(m + 1)) is not None and r <= mem_bytes:
            m += 1
        else:
            break
    return m or None  # None: not even one sequence fits, as largest_fitting says


def _simulated_need(req: MemoryRequest, model: ResolvedModel, device: str, ckpt) -> int:
    r = _estimate(req.model_copy(update={"hardware": None}), model, device, ckpt, allocator=True)
    return r.breakdown.total + r.allocator_reserve_bytes


def _max_micro_batch_search(req: MemoryRequest, model: ResolvedModel, device: str,
                            ckpt: set[int], mem_bytes: int) -> int | None:
    """The straightforward answer, one estimate per probe (``_max_micro_batch`` is tested
    against it)."""
    def fits(b: int) -> bool:
        tr = req.training.model_copy(update={"micro_batch_size": b})
        r = _estimate(req.model_copy(update={"training": tr, "hardware": None}), model, device, ckpt)
        return r.breakdown.total + r.allocator_reserve_bytes <= mem_bytes
    return largest_fitting_search(fits)


def _budget(req: MemoryRequest, model: ResolvedModel, device: str,
            explain: bool = False, allocator: bool = False) -> MemoryResult:
    """Fewest checkpointed blocks whose peak fits the budget. The reference model's blocks are
    identical, so recompute time grows with their number while the peak falls: the smallest
    feasible count is optimal for this homogeneous chain (explicit heterogeneous chains go to
    POST /v1/checkpointing)."""
    if not model.architecture_known:
        raise PlanningError("strategy 'budget' needs the architecture", "model")
    ac = req.training.activation_checkpointing
    _, mem = hardware_bytes(req.hardware)
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
            f"{peak(L)} bytes (every block checkpointed)"], explain=explain, allocator=allocator)
    lo, hi = 0, L
    while lo < hi:
        mid = (lo + hi) // 2
        if peak(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    while allocator and lo < L and _simulated_need(req, model, device, set(range(lo))) > budget:
        lo += 1  # the simulated allocator reserve decides at the boundary
    while allocator and lo > 0 and _simulated_need(req, model, device, set(range(lo - 1))) <= budget:
        lo -= 1
    return _estimate(req, model, device, set(range(lo)), [
        f"budget {budget} bytes: {lo} of {L} blocks checkpointed"], explain=explain,
        allocator=allocator)

