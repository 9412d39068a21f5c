"""Lower bounds of an MoE layout's peak (POST /v1/memory's, ``planner/layouts/expert.py``'s
composition of the transformers step) from closed forms, without a trace.

POST /v1/plan's MoE search (``planner/routes/plan_moe.py``) rejects a layout whose bound plus
the allocator reserve is over the GPU's memory before it traces anything, as the dense search
does with its model-state bound. A bound is held at or below the composed peak, for every family,
precision, optimizer kernel, checkpoint strategy, accumulation and ep, by
tests/test_expert_parallel.py (against the traced estimate). With N the model's parameters,
p the parameter and gradient bytes, a the activation bytes (``expert._bytes``), per rank
(P, G, O: parameters, gradients, optimizer states under ep, ``expert.split`` for the routed
experts, the rest whole):

- optimizer window: P + G + O + the one-device step scratch. Every parameter, gradient and
  state is live inside ``optimizer.step()`` (zero_grad(set_to_none) comes after); the composition
  subtracts the experts' share of each and keeps the step's temporaries at the one-device trace's
  value. The scratch floor is torch.optim's (``optimizer_step_temporary_bytes``): foreach
  kernels allocate each list op's outputs for all tensors at once (one dtype group: the sum over
  the model, as if one tensor), a for-loop one tensor at a time (at least the input embedding's,
  V·h), fused kernels none.
- forward window, at the loss: P + O (+ G, the rank's gradients, when data_parallel > 1: the
  traced DDP rank's buckets hold them from the wrap on, composed to the rank's experts' share;
  or, on one device, from the second micro-batch on when the accumulation is 2 or more), + the
  all-to-all receive buffer when ep > 1, +
  activations live when cross-entropy's log_softmax has run: its fp32 output b·s·V·4 (saved for
  backward) and, per decoder block, one (b, s, h) tensor at a or more (the block's input, saved by
  its checkpoint under 'full' and, under 'none', by its first RMSNorm, in fp32 when the input is
  bf16); under 'none' also, per sparse block, the routed experts' down projection input
  (b·s·k, I_e) at a (saved by the matmul for its weight gradient).

The optimizer states of the dense tensors are counted as one tensor's (one per-tensor ``step``
scalar, where the model has one per tensor): a floor.
"""

from __future__ import annotations

from planner.catalog.hf_config import dims, expert_tensor_numels, num_experts
from planner.catalog.optimizers import (
    optimizer_state_bytes,
    optimizer_step_temporary_bytes,
)
from planner.catalog.precision import DTYPE_BYTES, PRESETS
from planner.catalog.specs import TrainingSpec
from planner.layouts import expert


def model_states(cfg: dict, num_parameters: int, tr: TrainingSpec,
                 ep: int) -> tuple[int, int, int]:
    """Floors of (parameters, gradients, optimizer states) bytes on one rank of ep."""
    p, _ = expert._bytes(tr)
    xp, xg, xo = expert.split(cfg, tr, ep)
    dense = num_parameters - sum(expert_tensor_numels(cfg))
    plan = PRESETS[tr.precision]  # mixed-*: the fp32 master copies are optimizer states
    masters = dense * int(DTYPE_BYTES[plan.master_dtype]) if plan.master_dtype else 0
    return dense * p + xp, dense * p + xg, \
        optimizer_state_bytes(tr, [dense], plan.optimizer_state_dtype) + masters + xo


def step_scratch(cfg: dict, num_parameters: int, tr: TrainingSpec) -> int:
    """A floor of the one-device ``optimizer.step()`` temporaries (module docstring)."""
    dtype = "bf16" if tr.precision == "bf16" else "fp32"
    if tr.optimizer_implementation == "foreach":
        return optimizer_step_temporary_bytes(tr, [num_parameters], dtype)
    if tr.optimizer_implementation == "for-loop":
        d = dims(cfg)
        return optimizer_step_temporary_bytes(tr, [d["vocab"] * d["hidden"]], dtype)
    return 0


def activation_floor(cfg: dict, tr: TrainingSpec) -> int:
    """Bytes of activations live in the forward window when log_softmax has run."""
    _, a = expert._bytes(tr)
    d = dims(cfg)
    tokens = tr.micro_batch_size * tr.sequence_length
    out = tokens * d["vocab"] * 4 + d["layers"] * tokens * d["hidden"] * a
    if tr.activation_checkpointing.strategy == "none" and num_experts(cfg):
        k = cfg.get("num_experts_per_tok") or 0
        downs = expert_tensor_numels(cfg)[1::2]  # per sparse block (E, h, I_e)
        out += sum(tokens * k * (n // (num_experts(cfg) * d["hidden"])) * a for n in downs)
    return out


def peak_floor(cfg: dict, num_parameters: int, tr: TrainingSpec, ep: int,
               data_parallel: int = 1) -> int:
    """A lower bound of the composed steady-step peak of this layout (module docstring)."""
    P, G, O = model_states(cfg, num_parameters, tr, ep)
    optimizer = P + G + O + step_scratch(cfg, num_parameters, tr)
    grads = G if data_parallel > 1 or tr.gradient_accumulation_steps >= 2 else 0
    forward = P + O + grads + (expert.dispatch_bytes(cfg, tr) if ep > 1 else 0) + \
        activation_floor(cfg, tr)
    return max(optimizer, forward)
