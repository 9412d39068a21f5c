"""Expert parallelism (``parallelism.expert_parallel``, ep) of MoE models.

Layout (Megatron-Core / DeepSpeed-MoE): the ep ranks of an expert-parallel group lie inside one
data-parallel group (ep divides data_parallel) and each holds E/ep of every sparse block's E
routed experts (ep divides E); the router and every dense tensor (attention, embeddings, norms,
Qwen2-MoE's shared expert) are replicated on all of them.

Composition on the one-device estimate of ``training.implementation: "transformers"`` (the only
implementation that builds MoE models), per steady-state phase peak, with
X = the routed-expert tensors' numels (``hf_config.expert_tensor_numels``, a closed form held
equal to the tensors transformers builds) and x = sum(X):

- parameters: minus x·(1 - 1/ep)·p, p the parameter dtype's bytes (exact: parameters are live
  throughout the step);
- optimizer_states: minus optimizer_state_bytes(X) - optimizer_state_bytes(X/ep) (exact:
  ``planner/catalog/optimizers.py``, per tensor; the per-tensor ``step`` scalars cancel, every
  rank keeps one fused tensor per expert weight);
- gradients: under DDP (below; every layout with ep > 1) the buckets hold every gradient in
  every phase: minus x·(1 - 1/ep)·p in each, exact. Without DDP: at the optimizer-phase peak
  every gradient is live (zero_grad(set_to_none) ends the window), minus x·(1 - 1/ep)·p, exact;
  in the forward window there are none (0); at the backward-phase peak the gradients live are
  the one-device trace's (an upper bound: which expert gradients are live is not split out);
- activations: assumed equal to the one-device trace's: with balanced routing across ranks and
  no token dropping (transformers' MoE blocks drop none: capacity factor infinite), each rank's
  experts process the same b·s·k token-expert pairs as the one device does, and the router
  logits and dense blocks are unchanged (on one rank the split between experts changes nothing:
  the grouped_mm path sizes every buffer by b·s·k; tests/test_hf_moe_routing.py);
- temporaries: plus the all-to-all's receive buffer, b·s·k·h·a bytes (a the activation dtype's
  bytes), in the forward and backward windows (the send buffer is the one-device trace's
  permuted tokens); the optimizer step's scratch is kept at the one-device value (an upper
  bound: foreach scratch over the expert tensors shrinks by ep).

With data_parallel d > 1 (every ep > 1 layout has d >= ep) the one-device trace is instead one
rank of d traced under DistributedDataParallel(gradient_as_bucket_view=True) on torch's fake
process group (planner/hf/estimate.py, as for dense models): the reducer's buckets are allocated
at the wrap, so every phase holds one gradient per parameter. ``compose(..., ddp=True)`` then
takes the routed experts' gradients down to the rank's share in every phase, not only in the
optimizer window (exact under the same layout: each rank's buckets hold the gradients of the
parameters it holds, as Megatron-Core's per-group contiguous gradient buffers do). With ep = 1
nothing is composed: the DDP rank's trace is the answer, measured equal to real gloo ranks
(tests/test_hf_moe_data_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.catalog.errors import PlanningError
from planner.catalog.hf_config import dims, expert_tensor_numels, num_experts
from planner.catalog.optimizers import optimizer_state_bytes
from planner.catalog.precision import DTYPE_BYTES, PRESETS
from planner.catalog.specs import ParallelSpec, TrainingSpec

FIELD = "parallelism.expert_parallel"


@dataclass(frozen=True)
class ExpertSplit:
    """Model-state bytes on one rank: the routed experts' and the rest (dense)."""

    expert_parameters: int
    expert_gradients: int
    expert_optimizer_states: int
    dense_parameters: int
    dense_gradients: int
    dense_optimizer_states: int


def validate(cfg: dict | None, par: ParallelSpec) -> None:
    """422 (PlanningError naming parallelism.expert_parallel) unless ep fits the model and the
    layout; nothing for ep = 1."""
    ep = par.expert_parallel
    if ep == 1:
        return
    E = num_experts(cfg) if cfg is not None else 0
    if not E:
        raise PlanningError(f"{FIELD} = {ep} needs an MoE model (a Hugging Face config of "
                            "mixtral, qwen2_moe or qwen3_moe with experts); this model is dense: "
                            "leave it at 1", FIELD)
    if E % ep:
        raise PlanningError(f"{FIELD} = {ep} must divide the model's {E} experts", FIELD)
    if par.data_parallel % ep:
        raise PlanningError(f"{FIELD} = {ep} must divide parallelism.data_parallel = "
                            f"{par.data_parallel} (expert-parallel groups lie inside the "
                            "data-parallel group)", FIELD)


def _bytes(tr: TrainingSpec) -> tuple[int, int]:
    """(parameter and gradient bytes, activation bytes) of the transformers step's precisions
    (planner/hf/precision.py): fp32 and amp-* build an fp32 model, bf16 and mixed-* a 16-bit
    one; amp-* autocast to 16 bit."""
    plan = PRESETS[tr.precision]
    return int(DTYPE_BYTES[plan.param_dtype]), int(DTYPE_BYTES[plan.compute_dtype])


def split(cfg: dict, tr: TrainingSpec, ep: int) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes of the routed experts on one rank; the
    optimizer states of mixed-* include the fp32 master copies (the meter's category)."""
    p, _ = _bytes(tr)
    X = [n // ep for n in expert_tensor_numels(cfg)]
    plan = PRESETS[tr.precision]
    masters = sum(X) * int(DTYPE_BYTES[plan.master_dtype]) if plan.master_dtype else 0
    states = optimizer_state_bytes(tr, X, plan.optimizer_state_dtype) if X else 0
    return sum(X) * p, sum(X) * p, states + masters


def dispatch_bytes(cfg: dict, tr: TrainingSpec) -> int:
    """The all-to-all receive buffer of one sparse block: b·s·k·h·a."""
    _, a = _bytes(tr)
    k = cfg.get("num_experts_per_tok") or 0
    return tr.micro_batch_size * tr.sequence_length * k * dims(cfg)["hidden"] * a


def compose(cfg: dict, tr: TrainingSpec, ep: int, phase: str, bd: dict[str, int],
            ddp: bool = False) -> dict[str, int]:
    """One phase peak's breakdown on one rank of ep (module docstring); ``ddp``: ``bd`` is a
    DDP rank's, whose gradient buckets live in every phase."""
    if ep == 1:
        return dict(bd)
    one, mine = split(cfg, tr, 1), split(cfg, tr, ep)
    out = dict(bd)
    out["parameters"] -= one[0] - mine[0]
    out["optimizer_states"] -= one[2] - mine[2]
    if phase == "optimizer" or ddp:
        out["gradients"] -= one[1] - mine[1]
    if phase != "optimizer":
        out["temporaries"] += dispatch_bytes(cfg, tr)
    out["total"] = sum(out[c] for c in ("parameters", "gradients", "optimizer_states",
                                          "activations", "temporaries"))
    return out


def rank_split(cfg: dict, tr: TrainingSpec, ep: int, optimizer_bd: dict[str, int]) -> ExpertSplit:
    """The expert/dense split of one rank's model states at its composed optimizer-window peak
    (where every parameter, gradient and optimizer state is live)."""
    ep_p, ep_g, ep_s = split(cfg, tr, ep)
    bd = optimizer_bd
    return ExpertSplit(expert_parameters=ep_p, expert_gradients=ep_g, expert_optimizer_states=ep_s,
                       dense_parameters=bd["parameters"] - ep_p,
                       dense_gradients=bd["gradients"] - ep_g,
                       dense_optimizer_states=bd["optimizer_states"] - ep_s)
