"""POST /v1/memory for ``training.implementation: "transformers"``: the Hugging Face model code's
step, traced (planner/hf/estimate.py), on one device or as one DDP rank of data_parallel (dense
and MoE models); for MoE models composed with expert parallelism (planner/layouts/expert.py);
every other layout refused."""

from __future__ import annotations

from planner.catalog.errors import PlanningError
from planner.catalog.hf_config import expert_tensor_numels as expert_numels
from planner.catalog.hf_config import num_experts
from planner.catalog.moe_specs import MoEStates
from planner.catalog.presets import (
    allocator_reserve,
    get_gpu,
    hf_config_of,
    resolve_model,
)
from planner.catalog.specs import (
    Assumption,
    Breakdown,
    Fit,
    MemoryRequest,
    MemoryResult,
    TrainingSpec,
)
from planner.hf.errors import require_transformers
from planner.layouts import expert
from planner.layouts.expert import validate
from planner.machine.deadline import WorkLimitExceeded
from planner.routes.hf_micro_batch import max_micro_batch

_TRACE_NOTE = ("the step traced under FakeTensorMode on the CPU device (CPU kernels' saved "
               "tensors, e.g. sdpa's flash-attention-for-CPU logsumexp)")

_EP_ASSUMPTIONS = [
    Assumption(name="expert_parallel_states", value="exact",
               note="routed experts' parameters, optimizer states and (optimizer window) "
               "gradients divided by expert_parallel; router, attention, embeddings, norms and "
               "shared experts whole on every rank"),
    Assumption(name="expert_parallel_routing", value="balanced, no token dropping",
               note="each rank's experts process the one-device trace's b*s*top_k token-expert "
               "pairs: activations as traced on one device (capacity factor not modelled)"),
    Assumption(name="expert_parallel_dispatch", value="b*s*top_k*hidden*activation bytes",
               note="one sparse block's all-to-all receive buffer added to the forward and "
               "backward peaks' temporaries"),
    Assumption(name="expert_parallel_bounds", value="optimizer scratch",
               note="the optimizer step's scratch is the one-device trace's (an upper bound)"),
    Assumption(name="expert_parallel_gradients", value="the rank's experts' share, every phase",
               note="the DDP rank's gradient buckets (held from the wrap on) hold the routed "
               "experts' gradients divided by expert_parallel"),
    Assumption(name="moe_layout_note", value="expert_parallel ranks inside data_parallel",
               note="ZeRO 0; tensor and pipeline parallel 1"),
]
# fp16 loss scaling (planner/hf/precision.py): a step whose gradients overflow is skipped, a
# value only a real run reads; the trace takes every step
_LOSS_SCALING = {
    "amp-fp16": Assumption(name="loss_scaling", value="GradScaler, init_scale 2**16",
                           note="every step taken (no overflow); a skipped step allocates no "
                           "optimizer states or step scratch, so peaks no higher"),
    "mixed-fp16": Assumption(name="loss_scaling", value="static 2**10, fp32 master weights",
                             note="every step taken (no overflow); a skipped step allocates no "
                             "optimizer states or step scratch, so peaks no higher"),
}
_DDP_ASSUMPTION = Assumption(
    name="data_parallel_ddp", value="DistributedDataParallel(gradient_as_bucket_view=True)",
    note="one rank traced under torch's fake process group: the reducer's gradient buckets live "
    "from the wrap on (param.grad views them), all-reduce in place; the same on every rank. "
    "The reducer's one bucket rebuild before the second forward is not traced: the same bytes "
    "re-cut into buckets (measured equal on CPU past the 1 MB first bucket)")

_FSDP_NOTE = ("one rank traced under torch's fake process group: FSDP2 allocates its all-gather "
              "and reduce-scatter buffers (temporaries) and frees/re-allocates the unsharded "
              "parameters (UntypedStorage.resize_) as on real ranks. Rank 0 traced: every "
              "rank's sharded storage is padded to ceil(dim0/world) rows, but optimizer states "
              "and the step's scratch follow the unpadded shard, which is largest on rank 0")
_FSDP_ASSUMPTIONS = {
    0: _DDP_ASSUMPTION,
    1: Assumption(name="data_parallel_zero1",
                  value="DistributedDataParallel + ZeroRedundancyOptimizer",
                  note="DDP's gradient buckets on every rank; whole parameter tensors assigned "
                  "to ranks by torch's greedy partition, each rank's optimizer states and step "
                  "its share's; the worst rank traced (the largest share, and rank 0 with the "
                  "largest tensor), the whole model (the partition is not linear in the blocks)"),
    2: Assumption(name="data_parallel_fsdp2",
                  value="fully_shard(reshard_after_forward=False) per decoder layer, then root",
                  note="ZeRO-2: unsharded parameters kept from forward to backward; " + _FSDP_NOTE),
    3: Assumption(name="data_parallel_fsdp2",
                  value="fully_shard(reshard_after_forward=True) per decoder layer, then root",
                  note="ZeRO-3: unsharded parameters freed after each layer's forward, gathered "
                  "again for backward; " + _FSDP_NOTE),
}


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
    validate(hf_config_of(req.model), par)
    # data parallel ranks at ZeRO 0 are DDP, one rank traced (fake process group); expert
    # parallelism composes on that rank's trace (planner/layouts/expert.py): ep ranks of a
    # data-parallel group; every other layout is refused
    moe = bool(num_experts(hf_config_of(req.model)))
    dp_ok = par.data_parallel == 1 or (moe and par.data_parallel % par.expert_parallel == 0) \
        or (not moe and par.expert_parallel == 1)
    if not dp_ok or (par.tensor_parallel, par.pipeline_parallel) != (1, 1) \
            or par.offload_optimizer or par.offload_parameters or par.fsdp_mixed_precision:
        raise PlanningError("implementation 'transformers' is estimated on one device, with "
                            "data parallelism (DDP, ZeRO-1, or FSDP2 at zero_stage 2/3; for MoE "
                            "models DDP composed with parallelism.expert_parallel): "
                            "parallelism.tensor_parallel, pipeline_parallel, offload_* and "
                            "fsdp_mixed_precision must stay at their defaults", "parallelism")
    why = unsupported(req.training)
    if why is not None:
        raise PlanningError(why[1], why[0])
    if par.zero_stage:  # ZeRO-1 and FSDP2 (planner/hf/fsdp.py)
        from planner.hf.fsdp import unsupported as fsdp_unsupported

        why = fsdp_unsupported(req.training, par, moe)
        if why is not None:
            raise PlanningError(why[1], why[0])
    from planner.hf.lora import FIELD as LORA_TARGETS
    from planner.hf.lora import family_refusal

    fused = family_refusal(cfg["model_type"], req.training)
    if fused is not None:
        raise PlanningError(fused, LORA_TARGETS)
    if moe and req.training.lora is not None:
        raise PlanningError("training.lora: implementation 'transformers' puts adapters on dense "
                            "models only (an MoE model's routed experts are fused 3-D "
                            "parameters)", "training.lora")
    return cfg


def _traced(req: MemoryRequest, cfg: dict, tr: TrainingSpec, device: str):
    """(the traced estimate, its steady phase peaks composed for the layout: {phase:
    (breakdown, op)}) of ``req``'s model and layout with training ``tr``."""
    from planner.hf.estimate import estimate

    par = req.parallelism
    try:
        ranks = [0]
        if par.zero_stage == 1:  # ranks differ by their share of the optimizer
            from planner.hf.estimate import parameter_numels
            from planner.hf.fsdp import zero1_candidates

            ranks = zero1_candidates(parameter_numels(cfg), par.data_parallel)
        est = max((estimate(cfg, tr, par.data_parallel, device, zero_stage=par.zero_stage,
                            rank=r) for r in ranks), key=lambda e: e.steady.breakdown["total"])
    except (PlanningError, WorkLimitExceeded):
        raise
    except Exception as exc:  # noqa: BLE001 - the transformers code failing on this config
        raise PlanningError(
            f"model.hf_config: the transformers step fails on this config: "
            f"{type(exc).__name__}: {str(exc).strip()[:300]}", "model.hf_config") from None
    full = hf_config_of(req.model)
    return est, {n: (expert.compose(full, tr, par.expert_parallel, n, p.breakdown,
                                    par.data_parallel > 1), p.op)
                 for n, p in est.steady_phases.items()}


def estimate_transformers(req: MemoryRequest, device: str = "cuda") -> MemoryResult:
    cfg = check(req)
    model = resolve_model(req.model)
    require_transformers(cfg.get("model_type"))
    tr = req.training
    ddp = req.parallelism.data_parallel  # > 1: one DDP rank traced (dense and MoE models)
    est, phases = _traced(req, cfg, tr, device)
    ep = req.parallelism.expert_parallel
    full = hf_config_of(req.model)
    top = max(phases, key=lambda n: phases[n][0]["total"])
    bd = Breakdown(**phases[top][0])
    peak_phase = f"{top}: {phases[top][1]}"
    # the first step is not composed (its optimizer states are created inside the window)
    first = Breakdown(**est.first.breakdown) if ep == 1 else None
    fb = [(n, p) for n, p in phases.items() if n != "optimizer"]
    fbp = max(fb, key=lambda np: np[1][0]["total"]) if fb else None
    moe = None
    if expert_numels(full):
        E = num_experts(full)
        s = expert.rank_split(full, tr, ep, phases["optimizer"][0])
        moe = MoEStates(num_experts=E, experts_per_device=E // ep, expert_parallel=ep,
                        dispatch_buffer_bytes=expert.dispatch_bytes(full, tr) if ep > 1 else 0,
                        **vars(s))
    reserve = allocator_reserve(bd.total, device)
    fit = None
    hw = req.hardware
    if hw is not None:
        name, mem = (hw.gpu, hw.memory_bytes) if hw.gpu is None else (
            get_gpu(hw.gpu).name, hw.memory_bytes or get_gpu(hw.gpu).memory_bytes)
        search = max_micro_batch(
            lambda b: _traced(req, cfg, tr.model_copy(update={"micro_batch_size": b}),
                              device)[1],
            mem, device, tr.micro_batch_size, phases)
        fit = Fit(gpu=name, memory_bytes=mem, fits=bd.total + reserve <= mem,
                  headroom_bytes=mem - bd.total - reserve,
                  max_micro_batch_size=search.largest)
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
    if tr.precision in _LOSS_SCALING:
        assumptions.append(_LOSS_SCALING[tr.precision])
    if tr.lora is not None:
        lo = tr.lora
        assumptions.append(Assumption(
            name="lora", value=f"rank {lo.rank}, alpha {lo.alpha:g}, on "
            f"{', '.join(dict.fromkeys(lo.target_modules))} of every decoder layer",
            note="every model parameter frozen; each targeted nn.Linear wrapped: base(x) + "
            "(alpha/r)(x A^T) B^T, A and B trainable in the base's dtype (planner/hf/lora.py)"))
    notes = []
    if ddp > 1:
        assumptions.append(_FSDP_ASSUMPTIONS[req.parallelism.zero_stage])
    if ep > 1:
        assumptions.extend(_EP_ASSUMPTIONS)
        notes.append("first_step is not given with expert_parallel > 1 (the composition is "
                     "stated for the steady step)")
    if fit is not None:
        assumptions.append(search.assumption())
        if search.note is not None:
            notes.append(search.note)
    return MemoryResult(
        model=model, breakdown=bd, first_step=first,
        peak_phase=peak_phase,
        forward_backward_peak=Breakdown(**fbp[1][0]) if fbp else None,
        forward_backward_peak_phase=f"{fbp[0]}: {fbp[1][1]}" if fbp else None,
        allocator_reserve_bytes=reserve, fit=fit, assumptions=assumptions, notes=notes, moe=moe)
