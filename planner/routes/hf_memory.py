"""POST /v1/memory for ``training.implementation: "transformers"``: the Hugging Face model code's
step, traced (planner/hf/estimate.py), on one device."""

from __future__ import annotations

from planner.catalog.errors import PlanningError
from planner.catalog.presets import allocator_reserve, get_gpu, hf_config_of, resolve_model
from planner.catalog.specs import Assumption, Breakdown, Fit, MemoryRequest, MemoryResult
from planner.hf.errors import require_transformers
from planner.machine.deadline import WorkLimitExceeded

_TRACE_NOTE = ("the step traced under FakeTensorMode on the CPU device (CPU kernels' saved "
               "tensors, e.g. sdpa's flash-attention-for-CPU logsumexp)")


def check(req: MemoryRequest) -> dict:
    """The validated config transformers builds from; PlanningError naming what does not run."""
    from planner.hf.step import unsupported

    cfg = hf_config_of(req.model, fill=False)
    if cfg is None:
        raise PlanningError(
            "implementation 'transformers' needs a Hugging Face model: model.hf_config (a "
            "config.json's contents) or a preset built from one (GET /v1/models, those with a "
            "model_type)", "model")
    par = req.parallelism
    if (par.data_parallel, par.tensor_parallel, par.pipeline_parallel, par.zero_stage) != \
            (1, 1, 1, 0) or par.offload_optimizer or par.offload_parameters \
            or par.fsdp_mixed_precision:
        raise PlanningError("implementation 'transformers' is estimated on one device: "
                            "parallelism must be left at its defaults", "parallelism")
    why = unsupported(req.training)
    if why is not None:
        raise PlanningError(why[1], why[0])
    return cfg


def estimate_transformers(req: MemoryRequest, device: str = "cuda") -> MemoryResult:
    cfg = check(req)
    model = resolve_model(req.model)
    require_transformers()
    from planner.hf.estimate import estimate

    tr = req.training
    try:
        est = estimate(cfg, tr)
    except (PlanningError, WorkLimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - the transformers code failing on this config
        raise PlanningError(
            f"model.hf_config: the transformers step fails on this config: "
            f"{type(exc).__name__}: {str(exc).strip()[:300]}", "model.hf_config") from None
    bd, first = Breakdown(**est.steady.breakdown), Breakdown(**est.first.breakdown)
    fb = [p for n, p in est.steady_phases.items() if n != "optimizer"]
    fbp = max(fb, key=lambda p: p.breakdown["total"]) if fb else None
    reserve = allocator_reserve(bd.total, device)
    fit = None
    hw = req.hardware
    if hw is not None:
        name, mem = (hw.gpu, hw.memory_bytes) if hw.gpu is None else (
            get_gpu(hw.gpu).name, hw.memory_bytes or get_gpu(hw.gpu).memory_bytes)
        fit = Fit(gpu=name, memory_bytes=mem, fits=bd.total + reserve <= mem,
                  headroom_bytes=mem - bd.total - reserve, max_micro_batch_size=None)
    opts = tr.transformers
    use_cache = "the config's" if opts is None or opts.use_cache is None else str(opts.use_cache)
    assumptions = [
        Assumption(name="profile", value="transformers model code, trainer-style step",
                   note="AutoModelForCausalLM.from_config; loss = model(input_ids, labels).loss; "
                   "backward; optimizer.step(); zero_grad(set_to_none=True)"),
        Assumption(name="attn_implementation", value=tr.attention),
        Assumption(name="use_cache", value=use_cache,
                   note="off under gradient checkpointing (transformers turns it off)"),
        Assumption(name="traced", value="CPU kernels", note=_TRACE_NOTE),
        Assumption(name="traced_layers", value=",".join(map(str, est.traced_layers)),
                   note="proxies extrapolated over the blocks" if est.extrapolated
                   else "the whole model traced"),
        Assumption(name="allocator_reserve", value="0" if device == "cpu" else "5% of peak",
                   note="caching-allocator rounding and fragmentation, on top of the "
                   "allocated peak"),
    ]
    if tr.activation_checkpointing.strategy == "full":
        reentrant = bool(opts and opts.use_reentrant)
        assumptions.append(Assumption(
            name="gradient_checkpointing", value=f"every decoder layer, use_reentrant={reentrant}"))
    notes = []
    if fit is not None:
        notes.append("max_micro_batch_size is not searched for implementation 'transformers' "
                     "(each size is a traced step): ask again with another micro_batch_size")
    return MemoryResult(
        model=model, breakdown=bd, first_step=first,
        peak_phase=f"{est.steady.phase}: {est.steady.op}",
        forward_backward_peak=Breakdown(**fbp.breakdown) if fbp else None,
        forward_backward_peak_phase=f"{fbp.phase}: {fbp.op}" if fbp else None,
        allocator_reserve_bytes=reserve, fit=fit, assumptions=assumptions, notes=notes)
