"""The precisions of the transformers step, as the reference step defines them.

planner/catalog/precision.py names them and service/validation/step.py runs them for the
reference model; the transformers step (planner/hf/step.py) runs the same schemes around the
transformers model:

- ``amp-bf16`` / ``amp-fp16``: fp32 model and optimizer, the forward under ``torch.autocast`` in
  16 bit; fp16 adds torch's dynamic loss scaler, ``torch.amp.GradScaler(init_scale=2**16)``:
  ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
- ``mixed-bf16`` / ``mixed-fp16``: a 16-bit model, fp32 master copies stepped by the torch
  optimizer (``MasterWeights``, the reference's ``MasterWeightOptimizer``); fp16 with a static
  loss scale of 2**10 (``loss * 2**10`` before backward, the gradients unscaled and checked for
  overflow at ``step()``).
- ``bf16``: a bf16 model, the optimizer directly on it.

Both loss scalers skip an optimizer step whose gradients overflowed: a value the step reads.
A traced step (FakeTensorMode) cannot read it, so it runs every op the real check runs and takes
the step, as a real run does whenever the gradients are finite: the estimate describes steps
that are taken. A skipped step allocates neither the optimizer states nor the step's scratch; the
real run reports it (``skipped`` per step, planner/hf/step.py) and tests/test_hf_precision.py
measures what it changes.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

# (model dtype, autocast dtype or None, fp32 master weights?, loss scaling?): as the reference
# step's table (planner/step/program.py PRECISIONS)
SCHEMES: dict[str, tuple[str, str | None, bool, bool]] = {
    "fp32": ("fp32", None, False, False),
    "amp-bf16": ("fp32", "bf16", False, False),
    "amp-fp16": ("fp32", "fp16", False, True),
    "bf16": ("bf16", None, False, False),
    "mixed-bf16": ("bf16", None, True, False),
    "mixed-fp16": ("fp16", None, True, True),
}
GRAD_SCALER_INIT = 2.0**16  # torch.amp.GradScaler's default, the reference step's
STATIC_LOSS_SCALE = 2.0**10  # the reference step's mixed-fp16 scale


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def model_dtype(precision: str):
    return torch_dtype(SCHEMES[precision][0])


def autocast(precision: str, device_type: str):
    amp = SCHEMES[precision][1]
    return torch.autocast(device_type, dtype=torch_dtype(amp)) if amp else nullcontext()


def wrap_optimizer(precision: str, params: list, make: Callable[[list], Any], traced: bool):
    """The step's optimizer: ``make(params)``, or for mixed-* ``MasterWeights`` around it."""
    _, _, master, scaling = SCHEMES[precision]
    if not master:
        return make(params)
    return MasterWeights(params, make, STATIC_LOSS_SCALE if scaling else 1.0, traced)


class LossScaling:
    """How the step scales the loss and steps the optimizer for a precision: torch's GradScaler
    (amp-fp16), the static scale (mixed-fp16, unscaled by ``MasterWeights``) or none. ``skipped``:
    whether the last ``step`` skipped the optimizer (a real run's overflow; never when traced)."""

    def __init__(self, precision: str, device_type: str, traced: bool) -> None:
        _, _, master, scaling = SCHEMES[precision]
        self.scaler = _scaler(device_type, traced) if scaling and not master else None
        self.static = STATIC_LOSS_SCALE if scaling and master else 1.0
        self.skipped = False

    def scale(self, loss):
        if self.scaler is not None:
            return self.scaler.scale(loss)
        return loss * self.static if self.static != 1.0 else loss

    def step(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
            self.skipped = self.scaler.skipped
        else:
            opt.step()
            self.skipped = bool(getattr(opt, "skipped", False))


def _scaler(device_type: str, traced: bool) -> torch.amp.GradScaler:
    class Scaler(torch.amp.GradScaler):
        """torch's GradScaler; traced, the found-inf read (``.item()``, no allocation) is taken
        as no overflow, so the optimizer steps."""

        skipped = False

        def _maybe_opt_step(self, optimizer, optimizer_state, *args: Any, **kwargs: Any):
            if traced:
                self.skipped = False
                return optimizer.step(*args, **kwargs)
            self.skipped = bool(sum(v.item() for v in
                                    optimizer_state["found_inf_per_device"].values()))
            return None if self.skipped else optimizer.step(*args, **kwargs)

    return Scaler(device_type, init_scale=GRAD_SCALER_INIT)


class MasterWeights(torch.optim.Optimizer):
    """16-bit model parameters, fp32 master copies stepped by an inner torch optimizer: the
    reference step's ``MasterWeightOptimizer`` (service/validation/step.py; Micikevicius et al.
    2018 §3.1), the same ops in the same order: at ``step()`` every gradient is cast to fp32 at
    once (``master.grad``), unscaled and checked for overflow under a static loss scale (skipping
    the step when one is not finite; traced, the check's ops run and the step is taken), the
    inner optimizer steps the masters, and the 16-bit parameters are copied from them.
    tests/test_hf_precision.py holds its updates equal to the reference's."""

    def __init__(self, params: list, make_inner: Callable[[list], Any], loss_scale: float = 1.0,
                 traced: bool = False) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().to(torch.float32).clone() for p in self.model_params]
        for m in self.masters:
            m.requires_grad_(True)
        self.inner = make_inner(self.masters)
        self.loss_scale, self.traced, self.skipped = loss_scale, traced, False
        super().__init__(self.masters, {})
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state  # type: ignore[assignment]

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        with torch.no_grad():
            for p, m in zip(self.model_params, self.masters):
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
            self.skipped = False
            if self.loss_scale != 1.0:
                grads = [m.grad for m in self.masters if m.grad is not None]
                torch._foreach_mul_(grads, 1.0 / self.loss_scale)
                if not self._all_finite(grads):  # overflow: skip this step
                    self.skipped = True
                    for m in self.masters:
                        m.grad = None
                    return
            self.inner.step()
            for p, m in zip(self.model_params, self.masters):
                p.copy_(m)
                m.grad = None

    def _all_finite(self, grads: list) -> bool:
        if self.traced:  # the real check's ops, each gradient's (all finite), nothing read
            for g in grads:
                torch.isfinite(g).all()
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
