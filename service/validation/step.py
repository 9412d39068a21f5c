"""The reference training step: exactly the step the planner's estimate describes.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of forward + backward, then
``optimizer.step()`` and ``zero_grad(set_to_none=True)``:

    with autocast (amp-* only):
        logits = model(idx)                                   # (B, T, V)
        loss = cross_entropy(logits.float().view(-1, V), targets.view(-1)) / accum
    (scaler.scale(loss) if amp-fp16 else loss).backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)

``training.loss`` may replace the loss line with a chunked one (``chunked_loss`` below,
planner/catalog/loss_specs.py): the model then returns the final norm's output and the head runs
per token chunk, in forward or recomputed in backward.

Precision presets (planner/catalog/precision.py states the bytes):
- fp32: everything fp32.  amp-bf16 / amp-fp16: fp32 model and optimizer, autocast matmuls.
- mixed-bf16 / mixed-fp16: 16-bit model; ``MasterWeightOptimizer`` keeps fp32 master copies and
  steps on them (fp16 with loss scaling).  bf16: 16-bit model, optimizer directly on it.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from planner.hf.precision import MasterWeights
from planner.routes.checkpoint_blocks import checkpointed_blocks as planner_checkpointed_blocks
from planner.step.program import PRECISIONS
from planner.catalog.loss_specs import LossSpec
from planner.catalog.specs import ResolvedModel, TrainingSpec
from service.validation.model import LoRALinear, Transformer

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (param dtype, autocast dtype or None, master weights?, loss scaling?): the planner's table.


# 16-bit model parameters, fp32 master copies stepped by an inner torch optimizer (Micikevicius
# et al. 2018 §3.1 and the ZeRO paper's 2+2+12 bytes/param): one implementation for the reference
# step and the transformers step (planner/hf/precision.py).
MasterWeightOptimizer = MasterWeights


def make_optimizer(training: TrainingSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch optimizer for a contract name (hyper-parameters do not change memory)."""
    impl = training.optimizer_implementation
    kw: dict[str, Any] = {}
    if impl == "foreach":
        kw["foreach"] = True
    elif impl == "fused":
        kw["fused"] = True
    else:
        kw["foreach"] = False
    name = training.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, **kw)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **kw)
    if name == "adagrad":  # fused: torch's _fused_adagrad (CPU kernels)
        return torch.optim.Adagrad(params, lr=1e-3, **kw)
    kw.pop("fused", None)
    if impl == "fused":
        raise ValueError(f"torch has no fused {name}")
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=1e-3, centered=training.rmsprop_centered,
                                   momentum=0.9 if training.rmsprop_momentum else 0.0, **kw)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=1.0, **kw)
    if name == "adafactor" and hasattr(torch.optim, "Adafactor"):
        return torch.optim.Adafactor(params, lr=1e-3, **kw)
    raise ValueError(f"optimizer {name!r} has no torch.optim implementation to run")


def apply_lora(model: Transformer, training: TrainingSpec) -> None:
    """Freeze the base and wrap targeted projections with adapters (dtype of the base)."""
    lora = training.lora
    assert lora is not None
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        targets = {"q": (block.attn, "q"), "k": (block.attn, "k"), "v": (block.attn, "v"),
                   "o": (block.attn, "o"), "up": (block.mlp, "up"), "down": (block.mlp, "down")}
        if hasattr(block.mlp, "gate"):
            targets["gate"] = (block.mlp, "gate")
        for name in lora.target_modules:  # adapters in the parameter dtype
            if name in targets:
                parent, attr = targets[name]
                setattr(parent, attr, LoRALinear(getattr(parent, attr), lora.rank, lora.alpha))
        if lora.base_dtype in TORCH_DTYPE:  # every frozen block projection stored in base_dtype
            dt = TORCH_DTYPE[lora.base_dtype]
            for parent, attr in targets.values():
                lin = getattr(parent, attr)
                lin = lin.base if isinstance(lin, LoRALinear) else lin
                lin.weight = torch.nn.Parameter(lin.weight.detach().to(dt), requires_grad=False)


def checkpointed_blocks(training: TrainingSpec, num_layers: int) -> set[int]:
    """Block indices run under torch.utils.checkpoint: the planner's rule, so the step runs
    exactly the plan the estimate describes."""
    return planner_checkpointed_blocks(training, num_layers)


@dataclass
class StepSetup:
    model: Transformer
    optimizer: torch.optim.Optimizer
    scaler: Any
    loss_scale: float
    autocast_dtype: torch.dtype | None
    device: torch.device
    training: TrainingSpec
    checkpointed: set[int]


def step_optimizer(training: TrainingSpec, params: list,
                   loss_scale: float = 1.0) -> torch.optim.Optimizer:
    """The step's optimizer over ``params``: the torch optimizer, or for mixed-* the
    master-weight optimizer around it (fp32 masters of exactly these parameters)."""
    if PRECISIONS[training.precision][2]:
        return MasterWeightOptimizer(params, lambda ps: make_optimizer(training, ps),
                                     loss_scale=loss_scale)
    return make_optimizer(training, params)


def build(cfg: ResolvedModel, training: TrainingSpec, device: torch.device,
          checkpointed: set[int] | None = None) -> StepSetup:
    param_dtype, amp_dtype, master, scaling = PRECISIONS[training.precision]
    ov = training.precision_overrides
    if ov is not None and ov.parameters is not None:
        param_dtype = ov.parameters
    # Built directly in the parameter dtype (no .to(): FakeTensorMode cannot swap parameters);
    # the rotary tables are made in fp32 explicitly, as in the Llama reference code.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPE[param_dtype])
    try:
        with torch.device(device):
            model = Transformer(cfg, attention=training.attention, dropout=training.dropout)
    finally:
        torch.set_default_dtype(prev)
    if training.lora is not None:
        apply_lora(model, training)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if ov is not None and ov.gradients in TORCH_DTYPE:  # e.g. fp32 gradients on bf16 parameters
        for p in params:
            p.grad_dtype = TORCH_DTYPE[ov.gradients]
    scaler, loss_scale = None, 1.0
    if master:
        loss_scale = 2.0**10 if scaling else 1.0
    elif scaling:  # amp-fp16: torch's dynamic loss scaler
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    opt = step_optimizer(training, params, loss_scale)
    if checkpointed is None:
        checkpointed = checkpointed_blocks(training, cfg.num_layers)
    return StepSetup(model, opt, scaler, loss_scale, TORCH_DTYPE[amp_dtype] if amp_dtype else None,
                     device, training, checkpointed)


def forward_loss(s: StepSetup, idx: torch.Tensor, targets: torch.Tensor,
                 on_recompute: Callable[[], Any] | None = None) -> torch.Tensor:
    """Forward pass and loss, with the configured blocks checkpointed."""
    ctx = torch.autocast(s.device.type, dtype=s.autocast_dtype) if s.autocast_dtype else nullcontext()
    if s.training.activation_checkpointing.strategy == "selective":
        def run_core(core: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return checkpoint(_recompute_aware(core, on_recompute), q, k, v, use_reentrant=False)
        for block in s.model.blocks:
            block.attn.core_runner = run_core

    def run_block(i: int, block: torch.nn.Module, x: torch.Tensor, rope: Any) -> torch.Tensor:
        if i in s.checkpointed:
            return checkpoint(_recompute_aware(block, on_recompute), x, rope, use_reentrant=False)
        return block(x, rope)

    with ctx:
        if s.training.loss.kind != "standard":
            loss = chunked_loss(s.model.lm_head, s.model(idx, run_block, head=False), targets,
                                s.training.loss, on_recompute)
        else:
            logits = s.model(idx, run_block)  # (B, T, V)
            V = logits.shape[-1]
            loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1))
    return loss / s.training.gradient_accumulation_steps


def _head_nll(lm_head: torch.nn.Module, rows: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """One chunk's summed cross-entropy: head, fp32 upcast, log-softmax and NLL."""
    return F.cross_entropy(lm_head(rows).float(), tgt, reduction="sum")


def chunked_loss(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                 spec: LossSpec, on_recompute: Callable[[], Any] | None = None) -> torch.Tensor:
    """Mean cross-entropy over the B·T tokens, ``spec.chunks`` token chunks at a time
    (planner/catalog/loss_specs.py). ``h``: the final norm's output (B, T, C)."""
    n, C = h.shape[0] * h.shape[1], h.shape[-1]
    rows = h.view(n, C).chunk(spec.chunks)
    tgts = targets.view(n).chunk(spec.chunks)
    if spec.kind == "chunked":  # torchtune: the chunks' logits, then each chunk's fp32 loss
        logits = [lm_head(r) for r in rows]
        nlls = [F.cross_entropy(lc.float(), t, reduction="sum") for lc, t in zip(logits, tgts)]
        del logits
    elif spec.kind == "chunked-linear":  # each chunk recomputed in backward
        fn = _recompute_aware(functools.partial(_head_nll, lm_head), on_recompute)
        nlls = [checkpoint(fn, r, t, use_reentrant=False) for r, t in zip(rows, tgts)]
    else:
        raise ValueError(f"loss kind {spec.kind!r} is not chunked")
    total = nlls[0]
    for nll in nlls[1:]:
        total = total + nll
    return total / n


def _recompute_aware(block: torch.nn.Module, on_recompute: Callable[[], Any] | None) -> Callable:
    if on_recompute is None:
        return block

    def run(*args: Any) -> torch.Tensor:
        if torch._C._current_graph_task_id() != -1:  # inside backward: this is the recompute
            with on_recompute():
                return block(*args)
        return block(*args)

    return run


def backward(s: StepSetup, loss: torch.Tensor) -> None:
    if s.scaler is not None:
        loss = s.scaler.scale(loss)
    elif s.loss_scale != 1.0:
        loss = loss * s.loss_scale
    loss.backward()


def optimizer_step(s: StepSetup) -> None:
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def make_batch(cfg: ResolvedModel, training: TrainingSpec, device: torch.device,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (training.micro_batch_size, training.sequence_length)
    idx = torch.randint(0, cfg.vocab_size, shape, generator=g)
    tgt = torch.randint(0, cfg.vocab_size, shape, generator=g)
    return idx.to(device), tgt.to(device)
