"""Optimizer state and in-step temporary bytes, as torch.optim (PyTorch 2.13) allocates them.

Two figures per optimizer:
- ``optimizer_state_bytes``: every tensor in ``optimizer.state`` once it is initialised: the
  per-element buffers (exp_avg, exp_avg_sq, momentum_buffer, ...) in the dtype of the tensor they
  update, plus per-tensor scalars (``step`` is a 0-dim float32 tensor, 4 bytes, per parameter in
  Adam/AdamW/Adagrad/RMSprop/Adadelta/Adafactor; SGD and the bitsandbytes optimizers keep a Python
  int).
- ``optimizer_step_temporary_bytes``: the peak of the tensors ``optimizer.step()`` allocates and
  frees again, beyond parameters, gradients and states, in a steady-state step (step >= 2).
  Derived by replaying the allocations of each implementation (``torch/optim/<name>.py``:
  ``_single_tensor_*`` = for-loop, ``_multi_tensor_*`` = foreach, ``_fused_*``) through ``_Live``
  below; ``tests/test_optimizers_measured.py`` checks both figures byte-for-byte against real
  torch.optim with a dispatch-level storage tracker.

Hyper-parameters are the torch defaults of each class (maximize=False, amsgrad=False,
weight_decay: 0 except AdamW's decoupled 0.01, which works in place), lr a float, capturable=False.

Where a step tensor lives: foreach and for-loop keep ``step`` on the CPU (``torch.tensor(0.0)``)
even for CUDA parameters; fused (and capturable) put it on the parameter's device. Pass
``device="cuda"`` to count only bytes in device memory. On CUDA the caching allocator rounds each
block to 512 bytes; that rounding is not applied here (it is the allocator's, not torch.optim's).
"""

from __future__ import annotations

import math
from typing import Literal

from planner.catalog.precision import DTYPE_BYTES, resolve_precision
from planner.catalog.specs import FUSED_OPTIMIZERS, TrainingSpec

STEP_BYTES = 4  # 0-dim float32 step tensor (torch.optim.optimizer._get_scalar_dtype())
CPU_SCALAR_BYTES = 4  # torch.tensor(1.0, device="cpu") the foreach paths add to CPU step tensors

# bitsandbytes 8-bit Adam (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization";
# bitsandbytes/optim/optimizer.py Optimizer2State.init_state): two uint8 states, one fp32 absmax per
# 2048-element block per state; tensors under 4096 elements (min_8bit_size) keep fp32 states; the
# two 256-entry fp32 quantization maps ("dynamic", "udynamic") are shared by all tensors.
BNB_BLOCK_ELEMENTS = 2048
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAP_BYTES = 2 * 256 * 4

Device = Literal["cpu", "cuda"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


_numel = math.prod  # elements of a shape (1 for a 0-dim tensor)


def _shapes(tensor_numels: list[int], tensor_shapes: list[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    if tensor_shapes is None:
        return [(n,) for n in tensor_numels]  # unknown shapes: treated as vectors
    if list(map(_numel, tensor_shapes)) != list(tensor_numels):
        raise ValueError("tensor_shapes do not match tensor_numels")
    return [tuple(s) for s in tensor_shapes]


def _check_implementation(training: TrainingSpec) -> None:
    impl, opt = training.optimizer_implementation, training.optimizer
    if impl == "fused" and opt not in FUSED_OPTIMIZERS:
        raise ValueError(f"torch.optim has no fused implementation of {opt!r} "
                         "(fused exists for SGD, Adam, AdamW, Adagrad)")


def _step_scalar_bytes(training: TrainingSpec, device: Device) -> int:
    """Bytes of one per-tensor ``step`` in the counted memory."""
    if training.optimizer in ("sgd", "sgd-momentum", "adam-8bit", "lion"):
        return 0  # no step tensor (SGD) or a Python int (bitsandbytes, lion-pytorch)
    on_device = training.optimizer_implementation == "fused"
    return STEP_BYTES if device == "cpu" or on_device else 0


def optimizer_state_bytes(training: TrainingSpec, tensor_numels: list[int], state_dtype: str,
                          tensor_shapes: list[tuple[int, ...]] | None = None, *,
                          device: Device = "cpu") -> int:
    """Bytes of all tensors in ``optimizer.state`` for these parameter tensors.

    ``state_dtype`` is the dtype of the tensors the optimizer updates (the master copies for
    mixed-* precision). Adafactor needs ``tensor_shapes`` to factor matrices; without them every
    tensor is treated as a vector (unfactored, an upper bound).
    """
    _check_implementation(training)
    b = int(DTYPE_BYTES[state_dtype])
    n = sum(tensor_numels)
    k = len(tensor_numels)
    step = _step_scalar_bytes(training, device) * k
    opt = training.optimizer
    if opt == "sgd":
        return 0
    if opt == "sgd-momentum":
        return n * b  # momentum_buffer (torch/optim/sgd.py)
    if opt in ("adam", "adamw"):
        return 2 * n * b + step  # exp_avg, exp_avg_sq (Kingma & Ba 2015, Alg. 1)
    if opt == "adagrad":
        return n * b + step  # sum (Duchi et al. 2011)
    if opt == "rmsprop":
        # square_avg, + grad_avg if centered (Graves 2013), + momentum_buffer if momentum > 0
        per = 1 + int(training.rmsprop_centered) + int(training.rmsprop_momentum)
        return per * n * b + step
    if opt == "adadelta":
        return 2 * n * b + step  # square_avg, acc_delta (Zeiler 2012, Alg. 1)
    if opt == "lion":
        return n * b  # one momentum buffer (Chen et al. 2023, Alg. 1; lion-pytorch exp_avg)
    if opt == "adafactor":
        # Shazeer & Stern 2018 §3: a matrix keeps row and column second-moment factors, a vector
        # its full second moment (torch/optim/_adafactor.py: row_var shape[:-1]+(1,), col_var
        # with shape[-2] = 1, variance for 1-D). As products of the shape, not quotients of the
        # numel: an FSDP2 shard with no rows (0, c) still keeps a (1, c) column factor.
        elems = 0
        for s in _shapes(tensor_numels, tensor_shapes):
            m = _numel(s)
            elems += (_numel(s[:-1]) + _numel(s[:-2]) * s[-1]) if len(s) > 1 else m
        return elems * b + step
    if opt == "adam-8bit":
        total, any_8bit = 0, False
        for m in tensor_numels:
            if m < BNB_MIN_8BIT_SIZE:
                total += 2 * 4 * m  # state1, state2 in fp32
            else:
                any_8bit = True
                total += 2 * m + 2 * 4 * _ceil_div(m, BNB_BLOCK_ELEMENTS)  # uint8 + absmax1/2
        return total + (BNB_QMAP_BYTES if any_8bit else 0)
    raise ValueError(f"unknown optimizer {opt!r}")


class _Live:
    """Replays allocations of named tensors and keeps the peak of their sum, in bytes."""

    def __init__(self) -> None:
        self.vars: dict[str, int] = {}
        self.peak = 0

    @property
    def live(self) -> int:
        return sum(self.vars.values())

    def alloc(self, name: str, nbytes: int) -> None:
        """A new tensor bound to ``name``; a tensor the name held before is freed afterwards
        (Python rebinding: the right-hand side exists before the old value is released)."""
        self.peak = max(self.peak, self.live + nbytes)
        self.vars[name] = nbytes

    def transient(self, nbytes: int) -> None:
        """A tensor created and freed again before anything else is allocated."""
        self.peak = max(self.peak, self.live + nbytes)

    def free(self, *names: str) -> None:
        for name in names:
            self.vars.pop(name, None)


def _for_loop(opt: str, training: TrainingSpec, sizes: list[int], shapes: list[tuple[int, ...]],
              b: int) -> int:
    live = _Live()
    for n, s in zip(sizes, shapes):
        nb = n * b
        if opt in ("adam", "adamw"):
            # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            live.alloc("sqrt", nb)
            live.alloc("denom_new", nb)
            live.free("sqrt")
            live.vars["denom"] = live.vars.pop("denom_new")
        elif opt == "adagrad":
            live.alloc("std", nb)  # std = state_sum.sqrt().add_(eps)
        elif opt == "rmsprop":
            live.alloc("avg", nb)  # avg = square_avg.sqrt() (centered: .addcmul(...).sqrt_())
        elif opt == "adadelta":
            live.alloc("std", nb)  # std = square_avg.add(eps).sqrt_()
            live.alloc("delta", nb)  # delta = acc_delta.add(eps).sqrt_()
        elif opt == "adafactor":
            live.transient(b)  # param.norm(2).item()
            if len(s) > 1:
                live.alloc("row_mean", _numel(s[:-1]) * b)  # torch.norm(grad, dim=-1, keepdim=True)
                live.alloc("col_mean", _numel(s[:-2]) * s[-1] * b)  # torch.norm(grad, dim=-2, keepdim=True)
                live.alloc("var_estimate", nb)  # row_var @ col_var; previous still held by `update`
                live.transient(_numel(s[:-2]) * b)  # row_var.mean(dim=-2, keepdim=True)
            else:
                live.alloc("grad_squared", nb)  # grad * grad
                live.alloc("var_estimate", nb)  # variance.clone()
            live.free("update")
            live.vars["update"] = live.vars.pop("var_estimate")  # update = var_estimate....rsqrt_()
            live.transient(b)  # update.norm(2).item()
        elif opt == "lion":
            # lion-pytorch update_fn: exp_avg.clone().mul_(beta1).add(grad, 1-beta1).sign_()
            live.alloc("clone", nb)
            live.alloc("update", nb)
            live.free("clone")
    return live.peak


def _foreach(opt: str, training: TrainingSpec, sizes: list[int], shapes: list[tuple[int, ...]],
             b: int) -> int:
    live = _Live()
    s_bytes = sum(sizes) * b
    if opt not in ("sgd", "sgd-momentum", "lion"):
        live.transient(CPU_SCALAR_BYTES)  # _foreach_add_(steps, torch.tensor(1.0, device="cpu"))
    if opt in ("adam", "adamw", "rmsprop"):
        live.alloc("sqrt", s_bytes)  # exp_avg_sq_sqrt = _foreach_sqrt(...) / avg = _foreach_sqrt(...)
    elif opt in ("adagrad", "adadelta"):
        live.alloc("a", s_bytes)  # adagrad: std = _foreach_sqrt; adadelta: std = _foreach_add
        live.alloc("b", s_bytes)  # adagrad: numerator = _foreach_mul; adadelta: deltas
    elif opt == "adafactor":
        # one group per dimensionality (matrices, vectors), in order of first appearance
        groups: dict[bool, list[tuple[int, tuple[int, ...]]]] = {}
        for n, s in zip(sizes, shapes):
            groups.setdefault(len(s) > 1, []).append((n, s))
        first = True
        for multidim, members in groups.items():
            if not first:
                live.transient(CPU_SCALAR_BYTES)  # each group adds 1.0 to its CPU step tensors
            first = False
            live.transient(b)  # alphas: p.norm(2).item(), one at a time
            n_bytes = sum(n for n, _ in members) * b
            if multidim:
                live.alloc("row_means", sum(_numel(s[:-1]) for n, s in members) * b)
                live.free("row_means")
                live.alloc("col_means", sum(_numel(s[:-2]) * s[-1] for n, s in members) * b)
                live.free("col_means")
                live.alloc("var_estimates", n_bytes)  # row_var @ col_var per tensor
                live.alloc("row_var_means", sum(_numel(s[:-2]) for n, s in members) * b)
                live.free("row_var_means")
            else:
                live.alloc("grads_squared", n_bytes)
                live.free("grads_squared")
                live.alloc("var_estimates", n_bytes)  # [v.clone() for v in variances]
            live.free("updates")  # the previous group's updates live until rebinding here
            live.vars["updates"] = live.vars.pop("var_estimates")
            live.transient(b)  # update.norm(2).item()
    return live.peak


def optimizer_step_temporary_bytes(training: TrainingSpec, tensor_numels: list[int], dtype: str,
                                   tensor_shapes: list[tuple[int, ...]] | None = None) -> int:
    """Peak bytes ``optimizer.step()`` allocates beyond params, grads and states (step >= 2).

    ``dtype``: the dtype of the tensors the torch optimizer steps on (for mixed-* precision, the
    fp32 master copies; see ``reference_step_temporary_bytes``). All tensors are one dtype, so the
    foreach paths form a single device/dtype group. SGD, momentum SGD and every fused kernel work
    in place (0); adam-8bit runs one in-place CUDA kernel per tensor (0).
    """
    _check_implementation(training)
    b = int(DTYPE_BYTES[dtype])
    sizes = list(tensor_numels)
    if not sizes:
        return 0
    opt = training.optimizer
    shapes = _shapes(sizes, tensor_shapes)
    if opt in ("sgd", "sgd-momentum", "adam-8bit") or training.optimizer_implementation == "fused":
        return 0
    if training.optimizer_implementation == "foreach" and opt != "lion":  # lion-pytorch: a loop
        return _foreach(opt, training, sizes, shapes, b)
    return _for_loop(opt, training, sizes, shapes, b)


def master_weight_step_temporary_bytes(training: TrainingSpec, tensor_numels: list[int]) -> int:
    """fp32 gradient copies of the reference step's master-weight scheme (mixed-* precision).

    At ``step()`` the reference step sets ``master.grad = p.grad.float()`` for all parameters at
    once, steps the inner torch optimizer on the fp32 masters, copies them back with
    ``p.copy_(master)`` and drops the fp32 grads: 4 bytes/param live during the inner step.
    ``Tensor.float()`` of an fp32 tensor returns the tensor itself, so with fp32 gradients
    (precision override) no copy is made. 0 without a master copy.
    """
    plan = resolve_precision(training)
    if plan.master_dtype is None or plan.grad_dtype == plan.master_dtype:
        return 0
    return sum(tensor_numels) * int(DTYPE_BYTES[plan.master_dtype])


def overflow_check_temporary_bytes(training: TrainingSpec, tensor_numels: list[int]) -> int:
    """Peak temporaries of the reference step's overflow check under a static loss scale
    (mixed-fp16), run on the unscaled fp32 gradients before the inner step:
    ``torch.isfinite(g).all()`` per gradient, one at a time. isfinite is composite,
    ``(g == g) * (g.abs() != inf)``, and its temporaries live to the end of the expression: abs
    like g plus three bool tensors (1 byte per element). 0 without that check."""
    plan = resolve_precision(training)
    if training.precision != "mixed-fp16" or plan.master_dtype is None or not tensor_numels:
        return 0
    return max(tensor_numels) * (int(DTYPE_BYTES[plan.master_dtype]) + 3)


def reference_step_temporary_bytes(training: TrainingSpec, tensor_numels: list[int],
                                   tensor_shapes: list[tuple[int, ...]] | None = None) -> int:
    """Peak temporaries of the reference step's whole ``step()``: the master-weight fp32 grads
    (live throughout the inner step) plus the larger of the overflow check (mixed-fp16) and the
    inner torch optimizer's own temporaries."""
    plan = resolve_precision(training)
    dtype = plan.master_dtype or plan.optimizer_state_dtype
    return master_weight_step_temporary_bytes(training, tensor_numels) + \
        max(overflow_check_temporary_bytes(training, tensor_numels),
            optimizer_step_temporary_bytes(training, tensor_numels, dtype, tensor_shapes))


def bytes_per_param(training: TrainingSpec) -> float:
    """Per-element optimizer-state bytes (scalars and block constants excluded): the K of the
    ZeRO paper (§3.1: K = 12 for mixed-precision Adam, counting the fp32 master copy)."""
    plan = resolve_precision(training)
    b = DTYPE_BYTES[plan.master_dtype or plan.optimizer_state_dtype]
    per_elem = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2, "adagrad": 1, "adadelta": 2,
                "lion": 1, "adafactor": 0,
                "rmsprop": 1 + int(training.rmsprop_centered) + int(training.rmsprop_momentum)}
    if training.optimizer == "adam-8bit":
        states = 2.0  # two uint8 states (Dettmers et al. 2022, Table 1: 2 bytes/param)
    else:
        states = per_elem[training.optimizer] * b
    return states + (DTYPE_BYTES[plan.master_dtype] if plan.master_dtype else 0)


__all__ = ["optimizer_state_bytes", "optimizer_step_temporary_bytes",
           "master_weight_step_temporary_bytes", "overflow_check_temporary_bytes",
           "reference_step_temporary_bytes",
           "bytes_per_param", "STEP_BYTES", "BNB_BLOCK_ELEMENTS", "BNB_MIN_8BIT_SIZE"]
