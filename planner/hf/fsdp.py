"""FSDP2 (``fully_shard``) for the transformers step, and the meter that follows it.

ZeRO-3 is ``fully_shard(layer, reshard_after_forward=True)`` on every decoder layer, then on the
root model (torchtitan's and the transformers trainer's FSDP2 wrapping); ZeRO-2 the same with
``reshard_after_forward=False`` (unsharded parameters kept from forward to backward).

FSDP2 frees and re-allocates each unsharded parameter's storage with ``UntypedStorage.resize_``,
which no dispatch mode sees: ``DistributedMeter`` follows it (as torch's ``FSDPMemTracker`` /
``MemTracker`` patch ``resize_`` for the same reason). Under FakeTensorMode on torch's fake
process group the collectives send nothing but FSDP2 allocates its all-gather and reduce-scatter
buffers and resizes its storages exactly as on real ranks, so one traced rank's memory is a real
rank's. Shards: every rank's sharded storage is padded to ``ceil(dim0 / world)`` rows (FSDP2's
padded sharded size), the gradients are views of the padded reduce-scatter output, but optimizer
states are made from the unpadded local shard (``torch.chunk``: rank 0 has the most rows), so
ranks differ in optimizer states and the optimizer's scratch, and rank 0 is never below another.

The validation's rank programs (service/validation/distributed.py, service/validation/hf_ranks.py)
use the same meter and collective phases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from planner.hf.meter import LiveMemoryMeter, Record, _flat_tensors, _storages

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "amp-bf16", "bf16")


def unsupported(tr: Any, par: Any, moe: bool) -> tuple[str, str] | None:
    """(field, why) for a zero_stage > 0 setup the transformers step does not run sharded."""
    if par.zero_stage not in ZERO_STAGES:
        return ("parallelism.zero_stage", "implementation 'transformers' runs zero_stage 0 "
                f"(DDP), 1 (ZeroRedundancyOptimizer), 2 and 3 (FSDP2), not {par.zero_stage}")
    if par.data_parallel < 2:
        return ("parallelism.zero_stage", "zero_stage 1-3 shards over data_parallel ranks: "
                "data_parallel must be at least 2")
    if moe:
        return ("parallelism.zero_stage", "implementation 'transformers' runs MoE models under "
                "DDP (zero_stage 0) only")
    if tr.precision not in PRECISIONS:
        return ("training.precision", "implementation 'transformers' under ZeRO runs precision "
                f"{', '.join(PRECISIONS)}, not {tr.precision!r} (no sharded loss scaler or "
                "master-weight copy)")
    if tr.optimizer_implementation == "fused":
        return ("training.optimizer_implementation", "implementation 'transformers' under ZeRO "
                "runs the foreach or for-loop optimizer, not 'fused'")
    if tr.lora is not None:
        return ("training.lora", "implementation 'transformers' runs LoRA at zero_stage 0")
    return None


class DistributedMeter(LiveMemoryMeter):
    """``LiveMemoryMeter`` that also follows ``UntypedStorage.resize_`` (FSDP2 frees and
    re-allocates unsharded parameters that way; MemTracker patches it for the same reason) and
    remembers every record a storage has had, so that a later ``mark`` classifies the storage's
    past sizes too (the peak snapshot may hold one of them)."""

    def __init__(self) -> None:
        super().__init__()
        # storage -> its earlier records (only storages that were resized); weak, so a dead
        # storage's id never lends its history to a new one
        self._history: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._orig_resize = None

    def mark(self, tensors: Any, category: str) -> None:
        super().mark(tensors, category)
        for t in _flat_tensors(tensors):
            for st in _storages(t):
                for rec in self._history.get(st, []):
                    rec.category = category

    def _resized(self, st: torch.UntypedStorage) -> None:
        old = self._drop(st)
        if old is not None:
            self._history.setdefault(st, []).append(old)
        self._add(st, Record(int(st.nbytes()), self.phase, "resize_",
                             old.category if old else None))
        self._raise_peak("resize_")

    def __enter__(self):  # type: ignore[no-untyped-def]
        self._orig_resize = orig = torch.UntypedStorage.resize_
        meter = self

        def resize_(st: torch.UntypedStorage, size: int) -> None:
            orig(st, size)
            meter._resized(st)

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        return super().__exit__(*exc)


@contextmanager
def fsdp_collectives_as(meter: LiveMemoryMeter, phase: str) -> Iterator[None]:
    """Run FSDP2's all-gather / copy-out / reduce-scatter with the meter in ``phase``: their flat
    buffers are communication temporaries, not activations, even inside forward."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as G

    names = ("foreach_all_gather", "foreach_all_gather_copy_out", "foreach_reduce")
    saved = {n: getattr(G, n) for n in names}

    def wrap(fn: Callable) -> Callable:
        def inner(*a: Any, **k: Any) -> Any:
            with meter.in_phase(phase):
                return fn(*a, **k)
        return inner

    for n in names:
        setattr(G, n, wrap(saved[n]))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(G, n, fn)


def fsdp_unsharded(root: Any) -> list[torch.Tensor]:
    """The all-gather outputs every FSDP2 parameter keeps (its unsharded storage)."""
    out: list[torch.Tensor] = []
    for mod in root.modules():
        state = getattr(mod, "_get_fsdp_state", None)
        if state is None:
            continue
        group = state()._fsdp_param_group
        if group is None:
            continue
        for fp in group.fsdp_params:
            out += list(getattr(fp, "all_gather_outputs", []))
            out += list(getattr(fp, "_unsharded_inner_tensors", []))
    return out


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (``model.model.layers``; GPT-2's
    ``transformer.h``), the units FSDP2 wraps one by one."""
    for path in (("model", "layers"), ("transformer", "h")):
        m = model
        for name in path:
            m = getattr(m, name, None)
        if m is not None:
            return list(m)
    raise ValueError(f"no decoder layers found on {type(model).__name__}")


def default_mesh() -> Any:
    """FSDP2's default mesh (one dimension over the default group's ranks), made outside any
    FakeTensorMode: the mesh reads its rank tensor's values."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh

    with unset_fake_temporarily():
        return init_device_mesh("cpu", (dist.get_world_size(),))


def shard(model: Any, zero_stage: int, mesh: Any, gloo: bool) -> list[torch.nn.Module]:
    """``fully_shard`` every decoder layer, then the root (ZeRO-3: reshard after forward;
    ZeRO-2: keep the unsharded parameters until backward); ``gloo``: the deterministic gloo
    collectives (planner/hf/gloo_comms.py). Returns the wrapped modules."""
    from torch.distributed.fsdp import fully_shard

    reshard = zero_stage == 3
    mods = decoder_layers(model)
    for layer in mods:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    if gloo:
        from planner.hf.gloo_comms import install_gloo_comms

        install_gloo_comms([model, *mods])
    return [model, *mods]


@contextmanager
def as_real_storages() -> Iterator[None]:
    """FSDP2's lazy init tells whether a sharded parameter is still the padded shard it made
    (``reset_sharded_param``) only for a plain tensor, by its storage's data pointer: a
    FakeTensor is neither, so a trace would pad every unevenly sharded parameter (a rank with
    fewer rows than the padded shard) a second time, in the first forward.
    A real run finds the pointers equal and keeps the shard; this compares the storages
    themselves and does what the real run does then."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    orig = FSDPParam.reset_sharded_param

    def reset_sharded_param(self: Any) -> None:
        info = self._module_info
        data = self._sharded_param_data
        if getattr(info.module, info.param_name) is self.sharded_param and not self.pin_memory \
                and type(data) is FakeTensor and data.untyped_storage().nbytes() > 0 \
                and data.untyped_storage()._cdata == \
                self.sharded_param._local_tensor.untyped_storage()._cdata:
            self._sharding_spec = self.sharded_param._spec  # the real run's same-shard path
            return
        orig(self)

    FSDPParam.reset_sharded_param = reset_sharded_param  # type: ignore[method-assign]
    try:
        yield
    finally:
        FSDPParam.reset_sharded_param = orig  # type: ignore[method-assign]


def zero_redundancy(params: list, make: Callable[[list], Any]) -> Any:
    """ZeRO-1: torch's ``ZeroRedundancyOptimizer`` over ``params`` (whole tensors assigned to
    ranks, greedily by size; each rank steps its own and broadcasts them), with the class and
    constructor defaults of the optimizer ``make`` builds (the reference path's recipe)."""
    import inspect

    from torch.distributed.optim import ZeroRedundancyOptimizer

    probe = make([torch.nn.Parameter(torch.zeros(1))])
    accepted = inspect.signature(type(probe).__init__).parameters
    kw = {k: v for k, v in probe.defaults.items() if k in accepted}
    return ZeroRedundancyOptimizer(params, optimizer_class=type(probe), **kw)


def zero1_partition(numels: list[int], world: int) -> list[int]:
    """Each rank's parameter count under ZeroRedundancyOptimizer: torch's own greedy partition
    (``_partition_parameters``: tensors by decreasing numel, stable, each to the first rank with
    the fewest elements so far)."""
    sizes = [0] * world
    for n in sorted(numels, reverse=True):
        sizes[sizes.index(min(sizes))] += n
    return sizes


def zero1_candidates(numels: list[int], world: int) -> list[int]:
    """The ranks that can be the worst under ZeRO-1, from the trainable parameters' numels:
    every rank holds the same parameters and DDP gradient buckets, and differs only in its
    optimizer states and the step's scratch, which grow with its share (the foreach step's
    scratch with the share's total, the for-loop step's with its largest tensor, which rank 0
    gets first). So the rank with the largest share, and rank 0."""
    sizes = zero1_partition(numels, world)
    return sorted({0, sizes.index(max(sizes))})
