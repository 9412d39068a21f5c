"""Model states per device under data, tensor, pipeline and ZeRO sharding.

ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models") shards optimizer states (stage 1), + gradients (stage 2), + parameters (stage 3) over the
Nd data-parallel ranks. Each stage is described by the torch implementation the validation runs:

- stage 0: ``DistributedDataParallel(gradient_as_bucket_view=True)``: grads are views into the
  reducer's buckets, no bytes added (with ``False`` a bucket copies grads: ``ddp_bucket_bytes``).
- stage 1: DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer``: whole tensors are assigned to
  ranks greedily (``zero1_partition``, the algorithm of ``_partition_parameters``), so shards are
  uneven; the worst rank is reported.
- stage 2: FSDP2 ``fully_shard(reshard_after_forward=False)`` per transformer block and the root:
  sharded params/grads/states, unsharded params kept from forward to backward.
- stage 3: FSDP2 ``fully_shard``: every parameter sharded on dim 0 into ``torch.chunk`` pieces, each
  rank's storage padded to the first (largest) chunk, ceil(d0/Nd) rows (``_fsdp_param.py``
  ``_init_sharded_param``); rank 0 is the worst rank.

For mixed-* precision the DDP/ZeRO-1 step keeps 16-bit params/grads and fp32 masters in the
optimizer (category optimizer_states); these model states count FSDP2 as keeping fp32 *sharded*
params (they are the master weights, category parameters) and all-gathering 16-bit copies
(``MixedPrecisionPolicy``), what ``ParallelSpec.fsdp_mixed_precision`` runs; the per-rank replay
(planner/layouts/data_parallel.py) is the figure the estimate reports either way.
For a bare parameter count (no shapes) the ZeRO paper's arithmetic is used (§5, Fig. 1).
The tensors a stage holds, with their shapes and tensor-parallel split, are listed by
planner/layouts/parameter_tensors.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from planner.catalog.optimizers import (
    optimizer_state_bytes,
    optimizer_step_temporary_bytes,
    reference_step_temporary_bytes,
)
from planner.catalog.precision import DTYPE_BYTES, PrecisionPlan, resolve_precision, tensor_bytes
from planner.catalog.specs import ParallelSpec, ResolvedModel, TrainingSpec
from planner.layouts.parameter_tensors import (
    Shape,
    _ceil_div,
    _layer_tensors,
    _lora_shapes,
    _stage_tensors,
    _tp_split,
)
from planner.layouts.rank_tables import (
    RankTable,
    fsdp_local_shard_shape,
    fsdp_row_classes,
    fsdp_shard_shape,
    zero1_partition,
)
from planner.machine import cache

DDP_BUCKET_CAP_BYTES = 25 * 1024 * 1024
# ParallelSpec.fsdp_mixed_precision: mixed-bf16 as torchtitan runs it under FSDP2
MP_POLICY = ("; MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on fp32 sharded "
             "parameters (the master weights)")  # DistributedDataParallel(bucket_cap_mb=25) default


@dataclass(frozen=True)
class ModelStates:
    """Per-device model-state bytes of the worst rank (all integers)."""

    parameters: int  # on the device, at the step's peak (incl. unsharded copies kept fwd->bwd)
    gradients: int
    optimizer_states: int  # torch.optim states + fp32 master copies held by the optimizer
    buffers: int  # communication buffers in flight (FSDP all-gather/reduce-scatter, DDP buckets)
    step_temporaries: int  # peak extra bytes inside optimizer.step() on this rank
    offloaded_bytes: int  # model-state bytes held in host memory instead (offload)
    comm_bytes_per_step: int  # bytes this rank sends per optimizer step
    implementation: str
    worst_rank: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.buffers


_numel = math.prod  # elements of a shape (1 for a 0-dim tensor)


def pipeline_stage_layers(num_layers: int, p: int) -> list[int]:
    """Layers per pipeline stage: even split, the first ``L mod p`` stages take one more."""
    return list(stage_layers(num_layers, p))


@functools.lru_cache(maxsize=256)
def stage_layers(num_layers: int, p: int) -> tuple[int, ...]:
    """``pipeline_stage_layers`` as a tuple, kept (a deep pipeline's ranks each read it)."""
    return tuple(num_layers // p + (1 if s < num_layers % p else 0) for s in range(p))


def data_parallel_implementation(zero_stage: int, world_size: int) -> str:
    """The torch implementation a data-parallel rank of ``zero_stage`` runs (without offload)."""
    if zero_stage == 0:
        return "torch DistributedDataParallel(gradient_as_bucket_view=True)" if world_size > 1 \
            else "single data-parallel rank (no gradient reduction)"
    return ("",
            "torch DistributedDataParallel + torch.distributed.optim.ZeroRedundancyOptimizer "
            "(whole-tensor greedy partition)",
            "torch FSDP2 fully_shard(reshard_after_forward=False) per block + root",
            "torch FSDP2 fully_shard per block + root (dim-0 sharding, padded)")[zero_stage]


# ---- per-rank model states --------------------------------------------------------------------

def _b(dtype: str) -> int:
    return int(DTYPE_BYTES[dtype])


def _ring_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-gather or reduce-scatter of ``nbytes`` (Thakur et al.
    2005; the ZeRO paper §7 counts an all-reduce as reduce-scatter + all-gather = 2x this)."""
    return nbytes * (n - 1) // n


def _stage_states(tensors: list[Shape], trainable: list[bool], frozen_dtype: str | None,
                  training: TrainingSpec, parallel: ParallelSpec, plan: PrecisionPlan,
                  unit_elems: list[int], root_elems: int = 0) -> ModelStates:
    n = parallel.data_parallel
    z = parallel.zero_stage
    pb, gb = _b(plan.param_dtype), _b(plan.grad_dtype)
    master = plan.master_dtype
    opt_dtype = master or plan.optimizer_state_dtype
    train_shapes = [s for s, tr in zip(tensors, trainable) if tr]
    frozen = [s for s, tr in zip(tensors, trainable) if not tr]
    if z == 3:  # FSDP2 shards frozen base weights too
        frozen = [fsdp_shard_shape(s, n) for s in frozen]
    frozen_bytes = sum(tensor_bytes(_numel(s), frozen_dtype or plan.param_dtype, rows=s[0])
                       for s in frozen)
    numels = list(map(_numel, train_shapes))
    psi = sum(numels)
    notes: list[str] = []
    ga = training.gradient_accumulation_steps

    def opt_bytes(shapes: list[Shape]) -> int:
        ns = list(map(_numel, shapes))
        return optimizer_state_bytes(training, ns, opt_dtype, shapes) + \
            (sum(ns) * _b(master) if master else 0)

    def step_tmp(shapes: list[Shape]) -> int:
        return reference_step_temporary_bytes(training, list(map(_numel, shapes)), shapes)

    if z <= 1:
        params = psi * pb + frozen_bytes
        grads = psi * gb
        comm = 2 * _ring_bytes(psi * gb, n) if n > 1 else 0  # DDP all-reduce of the grads
        if z == 0:
            owned = train_shapes
            impl = data_parallel_implementation(0, n)
            worst = 0
        else:
            parts = zero1_partition(numels, n)
            worst = parts.worst(lambda part: opt_bytes([train_shapes[i] for i in part]))
            owned = [train_shapes[i] for i in parts[worst]]
            impl = data_parallel_implementation(1, n)
            comm += _ring_bytes(psi * pb, n)  # broadcast of each owner's updated params
            notes.append("ZeroRedundancyOptimizer all-reduces grads (DDP) and broadcasts updated "
                         "params: 3x the param bytes per rank vs the ZeRO paper's 2x (§7)")
        opt = opt_bytes(owned)
        tmp = step_tmp(owned)
        buffers = 0
    else:
        padded = {s: fsdp_shard_shape(s, n) for s in set(train_shapes)}  # per distinct shape
        sharded = list(map(padded.__getitem__, train_shapes))
        shard_numels = list(map(_numel, sharded))
        # FSDP2 sharded params are the stored (master) weights: fp32 for mixed-*, else param dtype
        store_b = _b(master) if master else pb
        shard_elems = sum(shard_numels)
        params = shard_elems * store_b + frozen_bytes
        grads = shard_elems * store_b  # sharded grads take the sharded param's dtype
        opt = optimizer_state_bytes(training, shard_numels, opt_dtype, sharded)
        # no separate master copy: the optimizer steps on the sharded params directly
        tmp = optimizer_step_temporary_bytes(training, shard_numels, opt_dtype, sharded)
        largest_unit = max(unit_elems) if unit_elems else psi
        if z == 2:
            # unsharded 16-bit params of every unit are kept from forward to backward
            params += psi * pb if n > 1 else 0
            buffers = largest_unit * gb * 2 if n > 1 else 0  # unsharded grads + RS output
            impl = data_parallel_implementation(2, n)
            comm = (_ring_bytes(psi * pb, n) * ga + _ring_bytes(psi * gb, n) * ga) if n > 1 else 0
        else:
            # current and one prefetched unit all-gathered, one unit's grads reduce-scattering
            # (in fp32 under FSDP2's MixedPrecisionPolicy, reduce_dtype=fp32)
            rb = store_b if parallel.fsdp_mixed_precision else gb
            buffers = (2 * largest_unit * pb + largest_unit * rb) if n > 1 else 0
            impl = data_parallel_implementation(3, n)
            if parallel.fsdp_mixed_precision:
                impl += MP_POLICY
            comm = (2 * _ring_bytes(psi * pb, n) * ga + _ring_bytes(psi * rb, n) * ga) if n > 1 else 0
        worst = 0
        if n > 1:
            notes.append("FSDP2 all-gather/reduce-scatter buffers: largest unit in flight "
                         "(estimate; exact for the sharded states)")

    offloaded = 0
    if parallel.offload_optimizer:
        offloaded += opt
        opt, tmp = 0, 0  # the optimizer steps on the CPU (ZeRO-Offload, Ren et al. 2021 §4)
        if z >= 2:
            offloaded += grads
            grads = 0  # reduce-scattered gradients stream to host memory (ZeRO-Offload §4.1)
        impl += "; optimizer states and step on CPU (ZeRO-Offload)"
    if parallel.offload_parameters:
        if z != 3:
            raise ValueError("offload_parameters needs zero_stage 3 (FSDP2 CPUOffloadPolicy)")
        stored = params - frozen_bytes
        offloaded += stored
        params = frozen_bytes
        buffers += root_elems * pb  # FSDP2's root unit stays gathered (accuracy-cuda.md §4)
        impl += "; sharded params on CPU, the root unit all-gathered (FSDP2 CPUOffloadPolicy)"
    return ModelStates(parameters=params, gradients=grads, optimizer_states=opt, buffers=buffers,
                       step_temporaries=tmp, offloaded_bytes=offloaded, comm_bytes_per_step=comm,
                       implementation=impl, worst_rank=worst, notes=tuple(notes))


def _bare_states(model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec,
                 plan: PrecisionPlan) -> ModelStates:
    """ZeRO paper §5.1 / Fig. 1 arithmetic for a bare parameter count Ψ: stage 1 divides the
    optimizer states (K·Ψ) by Nd, stage 2 also the gradients, stage 3 also the parameters."""
    from planner.catalog.optimizers import bytes_per_param
    psi = model.num_parameters // (parallel.tensor_parallel * parallel.pipeline_parallel)
    n, z = parallel.data_parallel, parallel.zero_stage
    pb, gb = _b(plan.param_dtype), _b(plan.grad_dtype)
    k = bytes_per_param(training)  # K of the paper (12 for mixed-precision Adam)
    params = psi * pb if z < 3 else _ceil_div(psi * pb, n)
    grads = psi * gb if z < 2 else _ceil_div(psi * gb, n)
    opt = int(psi * k) if z < 1 else _ceil_div(int(psi * k), n)
    comm = 0 if n == 1 else (3 if z == 3 else 2) * _ring_bytes(psi * pb, n)
    offloaded = 0
    if parallel.offload_optimizer:
        offloaded, opt = opt, 0
        if z >= 2:
            offloaded, grads = offloaded + grads, 0
    if parallel.offload_parameters:
        if z != 3:
            raise ValueError("offload_parameters needs zero_stage 3 (FSDP2 CPUOffloadPolicy)")
        offloaded, params = offloaded + params, 0
    impl = ["DDP", "ZeRO-1 (optimizer states sharded)", "ZeRO-2 (+ gradients sharded)",
            "ZeRO-3 (+ parameters sharded)"][z] + " — ZeRO paper arithmetic (bare parameter count)"
    return ModelStates(parameters=params, gradients=grads, optimizer_states=opt, buffers=0,
                       step_temporaries=0, offloaded_bytes=offloaded, comm_bytes_per_step=comm,
                       implementation=impl,
                       notes=("bare parameter count: exact per-tensor sharding, optimizer step "
                              "temporaries and communication buffers need architecture fields",))


def shard_model_states(model: ResolvedModel, training: TrainingSpec,
                       parallel: ParallelSpec) -> ModelStates:
    """Per-device model states of the worst rank (pipeline stage x ZeRO rank). Memoised on
    what they depend on: not the sizes, checkpointing or schedule; the gradient accumulation
    count only scales ZeRO-2/3's per-micro-batch collectives (``comm_bytes_per_step``)."""
    ga = training.gradient_accumulation_steps
    tr = _states_training(training)
    par = parallel.model_copy(update=_NO_SCHEDULE) if parallel.virtual_pipeline_stages != 1 \
        or parallel.pipeline_schedule != "1f1b" else parallel
    try:
        base = _states_memo(model, tr, par)
    except TypeError:  # a list inside the specs (LoRA target modules): memoised by JSON
        base = cache.json_memo(_shard_model_states, model, tr, par)
    if ga == 1 or parallel.zero_stage < 2:
        return base
    return ModelStates(**{**base.__dict__, "comm_bytes_per_step": base.comm_bytes_per_step * ga})


_NO_SCHEDULE = {"virtual_pipeline_stages": 1, "pipeline_schedule": "1f1b"}


def _states_training(tr: TrainingSpec) -> TrainingSpec:
    if (tr.gradient_accumulation_steps, tr.micro_batch_size, tr.sequence_length) == (1, 1, 1) \
            and tr.activation_checkpointing.strategy == "none":
        return tr
    return tr.model_copy(update={"gradient_accumulation_steps": 1, "micro_batch_size": 1,
                                 "sequence_length": 1,
                                 "activation_checkpointing": _NO_CHECKPOINTING})


_NO_CHECKPOINTING = TrainingSpec().activation_checkpointing


@functools.lru_cache(maxsize=8192)
def _states_memo(model: ResolvedModel, training: TrainingSpec,
                 parallel: ParallelSpec) -> ModelStates:
    return _shard_model_states(model, training, parallel)


def _shard_model_states(model: ResolvedModel, training: TrainingSpec,
                        parallel: ParallelSpec) -> ModelStates:
    plan = resolve_precision(training)
    if not model.architecture_known:
        return _bare_states(model, training, parallel, plan)
    p, t = parallel.pipeline_parallel, parallel.tensor_parallel
    if p > model.num_layers:
        raise ValueError(f"pipeline_parallel ({p}) exceeds num_layers ({model.num_layers})")
    layers = pipeline_stage_layers(model.num_layers, p)
    best: ModelStates | None = None
    lo = 0
    lora = training.lora
    seen: dict[tuple[int, bool, bool], ModelStates] = {}  # stages alike hold alike bytes
    for s in range(p):
        hi = lo + layers[s]
        shape_key = (hi - lo, s == 0, s == p - 1)
        if shape_key in seen and lora is None:
            lo = hi
            continue
        tensors = _stage_tensors(model, lo, hi, first=s == 0, last=s == p - 1, tp=t)
        shapes = [sh for sh, _ in tensors]
        block = _layer_tensors(model)
        unit = sum(_numel(_tp_split(sh, k, t)) for sh, k in block)
        if lora is not None:
            trainable = [False] * len(shapes)
            adapters = _lora_shapes(model, lora, hi - lo, t)
            shapes, trainable = shapes + adapters, trainable + [True] * len(adapters)
            unit = sum(_numel(a) for a in adapters) // max(hi - lo, 1)
        else:
            trainable = [True] * len(shapes)
        root = 0 if lora is not None else sum(map(_numel, shapes)) - (hi - lo) * unit
        ms = _stage_states(shapes, trainable, lora.base_dtype if lora else None, training,
                           parallel, plan, [unit], root)
        seen[shape_key] = ms
        if best is None or ms.total + ms.step_temporaries > best.total + best.step_temporaries:
            best = ms if p == 1 else ModelStates(**{**ms.__dict__, "worst_rank": ms.worst_rank + s * parallel.data_parallel * t})
        lo = hi
    assert best is not None
    notes = list(best.notes)
    if parallel.sequence_parallel:
        notes.append("sequence parallelism splits activations only; norms stay replicated")
    return ModelStates(**{**best.__dict__, "notes": tuple(notes)})


def fsdp_gather_floor(model: ResolvedModel, training: TrainingSpec,
                      parallel: ParallelSpec) -> int:
    """Bytes of FSDP2's padded all-gather outputs live at one instant of a step's forward
    beyond what ``ModelStates.parameters`` counts: each parameter's dim 0 is padded to a
    multiple of the ranks (``fsdp_shard_shape``) and the gathered storage is the padded one.
    ZeRO-2 (``reshard_after_forward=False``) keeps every unit's from forward to backward: the
    padding over ``parameters``'s unsharded copies. ZeRO-3 gathers at least one unit (a block,
    or the root's embeddings, norm and head) at a time, which ``parameters`` (the shards)
    leaves out: the largest unit. 0 outside those layouts (one pipeline and tensor rank, no
    LoRA, no parameter offload, more than one rank)."""
    n, z = parallel.data_parallel, parallel.zero_stage
    if z < 2 or n == 1 or parallel.pipeline_parallel != 1 \
            or parallel.tensor_parallel != 1 or training.lora is not None \
            or parallel.offload_parameters or not model.architecture_known:
        return 0
    pb = _b(resolve_precision(training).param_dtype)
    shapes = [sh for sh, _ in _stage_tensors(model, 0, model.num_layers, first=True, last=True,
                                             tp=1)]
    padded = {sh: _numel(fsdp_shard_shape(sh, n)) * n for sh in set(shapes)}
    if z == 2:
        return sum((padded[sh] - _numel(sh)) * pb for sh in shapes)
    block = [sh for sh, _ in _layer_tensors(model)]
    for sh in block:
        padded.setdefault(sh, _numel(fsdp_shard_shape(sh, n)) * n)
    unit = sum(padded[sh] for sh in block) if model.num_layers else 0
    root = sum(padded[sh] for sh in shapes) - model.num_layers * unit
    return max(unit, root) * pb


__all__ = [
    "MP_POLICY",
    "DDP_BUCKET_CAP_BYTES",
    "ModelStates",
    "RankTable",
    "fsdp_local_shard_shape",
    "fsdp_row_classes",
    "fsdp_shard_shape",
    "fsdp_gather_floor",
    "pipeline_stage_layers",
    "shard_model_states",
    "zero1_partition",
]
