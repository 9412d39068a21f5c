"""planner.catalog.optimizers against real torch.optim on CPU, byte for byte.

Source: torch.optim of the installed PyTorch; measured with a TorchDispatchMode that tracks every
storage an op creates (weakref finalizers on the storages give the moment each is freed).
Tolerance: none (exact equality of bytes).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from planner.catalog.optimizers import (
    master_weight_step_temporary_bytes,
    optimizer_state_bytes,
    optimizer_step_temporary_bytes,
    reference_step_temporary_bytes,
)
from planner.catalog.specs import TrainingSpec


class StorageTracker(TorchDispatchMode):
    """Peak of the bytes of storages created while active (outputs of every dispatched op)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self._seen or key in self._existing:
            return
        n = st.nbytes()
        self._seen[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)

        def release(key: int = key, n: int = n) -> None:
            self.live -= n
            self._seen.pop(key, None)
        weakref.finalize(st, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPE_SETS = [
    [(7, 5), (13,), (3, 4, 2), (1,)],
    [(1,), (64, 3), (40,), (9, 11), (2, 3, 5, 7), (100,)],  # ascending/mixed order matters
    [(33, 17), (33,), (8, 8), (256,), (5, 50)],
]


def _make(name: str, impl: str, training: TrainingSpec, params: list[torch.nn.Parameter]):
    kw: dict = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    O = torch.optim
    if name == "sgd":
        return O.SGD(params, lr=0.1, **kw)
    if name == "sgd-momentum":
        return O.SGD(params, lr=0.1, momentum=0.9, **kw)
    if name == "adam":
        return O.Adam(params, **kw)
    if name == "adamw":
        return O.AdamW(params, **kw)
    if name == "adagrad":
        return O.Adagrad(params, **kw)
    if name == "rmsprop":
        return O.RMSprop(params, centered=training.rmsprop_centered,
                         momentum=0.9 if training.rmsprop_momentum else 0.0, **kw)
    if name == "adadelta":
        return O.Adadelta(params, **kw)
    if name == "adafactor":
        return O.Adafactor(params, **kw)
    raise AssertionError(name)


CASES = [("sgd", {}), ("sgd-momentum", {}), ("adam", {}), ("adamw", {}), ("adagrad", {}),
         ("rmsprop", {}), ("rmsprop", {"rmsprop_centered": True}),
         ("rmsprop", {"rmsprop_momentum": True}),
         ("rmsprop", {"rmsprop_centered": True, "rmsprop_momentum": True}),
         ("adadelta", {}), ("adafactor", {})]
FUSED = {"sgd", "sgd-momentum", "adam", "adamw", "adagrad"}


def _params(shapes, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(TORCH_DTYPE[dtype]))
            for s in shapes]


def _measure_steps(opt, params, steps: int = 2) -> list[int]:
    peaks = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        gc.collect()
        tracker = StorageTracker(list(params) + [p.grad for p in params] + _state_tensors(opt))
        with tracker:
            opt.step()
        peaks.append(tracker.peak)
    return peaks


# fused kernels exist only for the optimizers in FUSED
IMPL_CASES = [(name, extra, impl) for name, extra in CASES
              for impl in ("foreach", "for-loop", "fused") if impl != "fused" or name in FUSED]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=["set0", "set1", "set2"])
@pytest.mark.parametrize("name,extra,impl", IMPL_CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(k.split("_")[1] for k in v) or "default")
def test_state_and_step_temporaries_match_torch(name, extra, shapes, impl, dtype):
    training = TrainingSpec(optimizer=name, optimizer_implementation=impl, **extra)
    params = _params(shapes, dtype)
    opt = _make(name, impl, training, params)
    peaks = _measure_steps(opt, params, steps=3)
    numels = [p.numel() for p in params]
    measured_state = sum(t.untyped_storage().nbytes() for t in _state_tensors(opt))
    assert optimizer_state_bytes(training, numels, dtype, shapes) == measured_state
    # steps 2 and 3: steady state, optimizer states already exist
    expected = optimizer_step_temporary_bytes(training, numels, dtype, shapes)
    assert peaks[1] == expected
    assert peaks[2] == expected


def test_fused_step_lives_on_device_and_foreach_step_on_host():
    # torch/optim/adam.py _init_group: step is torch.tensor(0.0) (CPU) unless fused/capturable.
    numels = [10, 20]
    foreach = TrainingSpec(optimizer="adam", optimizer_implementation="foreach")
    fused = TrainingSpec(optimizer="adam", optimizer_implementation="fused")
    assert optimizer_state_bytes(foreach, numels, "bf16", device="cuda") == 2 * 30 * 2
    assert optimizer_state_bytes(fused, numels, "bf16", device="cuda") == 2 * 30 * 2 + 2 * 4


def test_unsupported_fused_is_refused():
    with pytest.raises(ValueError, match="fused"):
        optimizer_state_bytes(TrainingSpec(optimizer="rmsprop", optimizer_implementation="fused"),
                              [4], "fp32")


class _MasterWeightStep:
    """The reference step's master-weight scheme for mixed-* precision, as specified for the
    validation runner: fp32 masters in the optimizer; at step() all fp32 grad copies at once,
    inner step on the masters, copy back, fp32 grads dropped."""

    def __init__(self, params, make_inner):
        self.params = params
        self.masters = [p.detach().float().requires_grad_(True) for p in params]
        self.inner = make_inner(self.masters)

    def step(self):
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.detach().copy_(m.detach())
            m.grad = None


@pytest.mark.parametrize("grads", ["bf16", "fp32"])
@pytest.mark.parametrize("impl", ["foreach", "for-loop", "fused"])
def test_master_weight_scheme_temporaries(impl, grads):
    # mixed-bf16 + adamw: fp32 grad copies (4 B/param) live through the inner fp32 step.
    overrides = {"precision_overrides": {"gradients": "fp32"}} if grads == "fp32" else {}
    training = TrainingSpec(precision="mixed-bf16", optimizer="adamw",
                            optimizer_implementation=impl, **overrides)
    shapes = SHAPE_SETS[1]
    params = _params(shapes, "bf16")
    for p in params:
        # fp32 gradients on bf16 parameters need the tensor's grad_dtype set (torch >= 2.10)
        p.grad_dtype = TORCH_DTYPE[grads]
    step = _MasterWeightStep(params, lambda ms: _make("adamw", impl, training, ms))
    peaks = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p).to(TORCH_DTYPE[grads])
        gc.collect()
        existing = list(params) + [p.grad for p in params] + step.masters + \
            _state_tensors(step.inner)
        tracker = StorageTracker(existing)
        with tracker:
            step.step()
        peaks.append(tracker.peak)
    numels = [p.numel() for p in params]
    expected_master = 0 if grads == "fp32" else 4 * sum(numels)
    assert master_weight_step_temporary_bytes(training, numels) == expected_master
    assert peaks[1] == peaks[2] == reference_step_temporary_bytes(training, numels, shapes)
    assert optimizer_state_bytes(training, numels, "fp32", shapes) == \
        sum(t.untyped_storage().nbytes() for t in _state_tensors(step.inner))


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_loss_scaled_master_weight_step_temporaries(name):
    # mixed-fp16: the reference step's own master-weight optimizer under its static loss scale.
    # Its overflow check (isfinite per fp32 gradient) is the steady peak for momentum SGD, which
    # steps in place; Adam's sqrt of every state outgrows it.
    from service.validation.step import MasterWeightOptimizer

    training = TrainingSpec(precision="mixed-fp16", optimizer=name)
    shapes = SHAPE_SETS[2]
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g).to(torch.float16)) for s in shapes]
    step = MasterWeightOptimizer(params, lambda ms: _make(name, "foreach", training, ms),
                                 loss_scale=2.0**10)
    peaks = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        gc.collect()
        tracker = StorageTracker(list(params) + [p.grad for p in params] + step.masters +
                                 _state_tensors(step.inner))
        with tracker:
            step.step()
        peaks.append(tracker.peak)
    numels = [p.numel() for p in params]
    check = max(numels) * (4 + 3)  # abs (fp32) + ne, eq, their product (bool)
    inner = optimizer_step_temporary_bytes(training, numels, "fp32", shapes)
    assert peaks[1] == peaks[2] == reference_step_temporary_bytes(training, numels, shapes) \
        == 4 * sum(numels) + max(check, inner)
    assert (check > inner) == (name == "sgd-momentum")


# An FSDP2 rank can hold no rows of a tensor (more ranks than chunks of its first dimension): its
# local shard is (0, c). torch's Adafactor divides by the element count and raises there, so the
# planner refuses such a layout (a 422 naming the rule) instead of describing a step that crashes.
@pytest.mark.parametrize("impl", ["foreach", "for-loop"])
def test_adafactor_on_an_empty_shard_raises_in_torch_and_is_refused(impl):
    from planner.catalog.errors import PlanningError
    from planner.catalog.specs import MemoryRequest
    from planner.routes.memory import estimate_memory

    training = TrainingSpec(optimizer="adafactor", optimizer_implementation=impl)
    params = _params([(0, 5), (7, 5)], "fp32")
    opt = _make("adafactor", impl, training, params)
    with pytest.raises(ZeroDivisionError):
        _measure_steps(opt, params, steps=1)

    def req(dp: int) -> MemoryRequest:
        return MemoryRequest.model_validate({
            "model": {"family": "llama", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                      "vocab_size": 128, "max_sequence_length": 64},
            "training": {"micro_batch_size": 2, "sequence_length": 16, "optimizer": "adafactor",
                         "optimizer_implementation": impl, "lora": {"rank": 2}},
            "parallelism": {"data_parallel": dp, "zero_stage": 3}})
    with pytest.raises(PlanningError) as err:  # LoRA A is (2, 64): ranks 2-7 of 8 hold no rows
        estimate_memory(req(8))
    assert err.value.field == "parallelism.data_parallel" and "(2, 64)" in str(err.value)
    assert estimate_memory(req(2)).breakdown.total > 0  # one row each: torch runs it
