"""Precision presets: which dtype each model-state tensor is stored in.

A preset names one way the reference training step runs; ``TrainingSpec.precision_overrides``
changes individual dtypes on top of it. Bytes per element are those of the torch dtypes; the
quantized base-weight formats of QLoRA (int8, nf4) carry their quantization constants too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.catalog.specs import TrainingSpec

# Bytes per element of each storage dtype (torch.float32 / bfloat16 / float16 / int8; nf4 packs
# two 4-bit codes per byte, Dettmers et al. 2023 §3).
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "nf4": 0.5}

# QLoRA (Dettmers et al. 2023, §3 "Double Quantization"): NF4 codes in 64-element blocks, one
# 8-bit quantized absmax per block, and those absmax values quantized again in blocks of 256 with
# one fp32 constant each: 0.5 + 1/64 + 4/(64*256) bytes/param (= 4.127 bits/param, the paper's
# 0.127-bit overhead). bitsandbytes additionally stores one fp32 offset (the mean absmax) per tensor.
NF4_BLOCK_ELEMENTS = 64
NF4_SECOND_BLOCK_BLOCKS = 256
# LLM.int8 (Dettmers et al. 2022; bitsandbytes Int8Params): int8 codes plus one fp32 scale per row.
INT8_SCALE_BYTES_PER_ROW = 4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tensor_bytes(numel: int, dtype: str, rows: int | None = None) -> int:
    """Storage bytes of one tensor of ``numel`` elements (integers; quantized formats rounded as
    bitsandbytes rounds them: whole bytes of packed codes plus the per-block constants)."""
    if dtype == "nf4":
        blocks = _ceil_div(numel, NF4_BLOCK_ELEMENTS)
        return (_ceil_div(numel, 2)  # packed 4-bit codes, two per uint8
                + blocks  # uint8 absmax per 64-element block
                + 4 * _ceil_div(blocks, NF4_SECOND_BLOCK_BLOCKS)  # fp32 per 256 absmax
                + 4)  # fp32 absmax offset per tensor
    if dtype == "int8":
        return numel + (INT8_SCALE_BYTES_PER_ROW * rows if rows else 0)
    return numel * int(DTYPE_BYTES[dtype])


@dataclass(frozen=True)
class PrecisionPlan:
    """Storage dtype of each model-state tensor and how the forward computes."""

    name: str
    param_dtype: str  # the module's parameters
    grad_dtype: str  # .grad of those parameters
    master_dtype: str | None  # fp32 copy held by the optimizer (mixed-*), else None
    optimizer_state_dtype: str  # torch.optim states follow the dtype of the tensors they update
    compute_dtype: str  # matmul dtype in forward/backward
    autocast: bool  # forward runs under torch.autocast
    grad_scaler: bool  # fp16 loss scaling (torch.amp.GradScaler)

    @property
    def bytes_per_param_without_optimizer(self) -> int:
        """Parameters + gradients + master copy, bytes per trainable parameter."""
        return int(DTYPE_BYTES[self.param_dtype] + DTYPE_BYTES[self.grad_dtype]
                   + (DTYPE_BYTES[self.master_dtype] if self.master_dtype else 0))


PRESETS: dict[str, PrecisionPlan] = {
    "fp32": PrecisionPlan("fp32", "fp32", "fp32", None, "fp32", "fp32", False, False),
    # torch.autocast: fp32 weights, grads and optimizer states; matmuls cast to 16 bit on the fly
    # (PyTorch AMP recipe: torch.amp docs; fp16 adds GradScaler, Micikevicius et al. 2018).
    "amp-bf16": PrecisionPlan("amp-bf16", "fp32", "fp32", None, "fp32", "bf16", True, False),
    "amp-fp16": PrecisionPlan("amp-fp16", "fp32", "fp32", None, "fp32", "fp16", True, True),
    # 16-bit weights and grads, fp32 master weights and states in the optimizer: ZeRO paper §3.1,
    # 2 + 2 + (4 master + 4 + 4 Adam) = 16 bytes/param.
    "mixed-bf16": PrecisionPlan("mixed-bf16", "bf16", "bf16", "fp32", "fp32", "bf16", False, False),
    "mixed-fp16": PrecisionPlan("mixed-fp16", "fp16", "fp16", "fp32", "fp32", "fp16", False, True),
    # pure bf16: no master copy, states in the parameters' dtype.
    "bf16": PrecisionPlan("bf16", "bf16", "bf16", None, "bf16", "bf16", False, False),
}


def resolve_precision(training: TrainingSpec) -> PrecisionPlan:
    """The preset named by ``training.precision`` with ``training.precision_overrides`` applied.

    Overriding ``master_weights`` on a preset without a master copy adds one (and the optimizer
    then updates that copy, so its states take the master's dtype); overriding ``parameters`` on a
    preset without a master copy moves the optimizer states with them, as torch.optim does.
    """
    plan = PRESETS[training.precision]
    ov = training.precision_overrides
    if ov is None:
        return plan
    changes: dict[str, object] = {}
    if ov.parameters is not None:
        changes["param_dtype"] = ov.parameters
        if plan.master_dtype is None and ov.master_weights is None:
            changes["optimizer_state_dtype"] = ov.parameters
    if ov.gradients is not None:
        changes["grad_dtype"] = ov.gradients
    if ov.master_weights is not None:
        changes["master_dtype"] = ov.master_weights
        changes["optimizer_state_dtype"] = ov.master_weights
    return replace(plan, **changes)


__all__ = ["DTYPE_BYTES", "NF4_BLOCK_ELEMENTS", "NF4_SECOND_BLOCK_BLOCKS", "PrecisionPlan",
           "PRESETS", "resolve_precision", "tensor_bytes"]
