"""The MoE peak floors (planner/layouts/expert_bounds.py) against the traced estimate they bound.

POST /v1/plan rejects an MoE layout on its floor without a trace, so a floor above POST
/v1/memory's peak would drop a layout that fits: every floor here is at or below the composed
peak, over the three MoE families, the precisions the transformers step runs, each
optimizer and kernel (foreach, for-loop, fused), both checkpoint strategies, accumulation 1 and
more, and ep 1 to E. The model-state floors are the composed optimizer window's gradients to the
byte, its parameters to the model's buffers (counted with them), its optimizer states to the
per-tensor step scalars.
"""

from __future__ import annotations

import pytest

from planner.catalog.hf_config import normalize
from planner.catalog.specs import MemoryRequest, TrainingSpec
from planner.layouts import expert_bounds as B
from tests.test_expert_parallel import MIXTRAL, QWEN2_MOE, QWEN3_MOE

pytest.importorskip("transformers")

# (config, training overrides, ep)
CASES = [
    (MIXTRAL, {}, 1),
    (MIXTRAL, {}, 4),
    (MIXTRAL, {"precision": "bf16", "activation_checkpointing": {"strategy": "full"},
               "gradient_accumulation_steps": 2}, 2),
    (MIXTRAL, {"precision": "amp-bf16", "optimizer_implementation": "for-loop"}, 4),
    (MIXTRAL, {"optimizer_implementation": "fused", "gradient_accumulation_steps": 2}, 2),
    (MIXTRAL, {"optimizer": "sgd-momentum", "gradient_accumulation_steps": 3}, 4),
    (QWEN2_MOE, {"optimizer": "adagrad"}, 3),
    (QWEN2_MOE, {"precision": "bf16", "optimizer": "rmsprop",
                 "activation_checkpointing": {"strategy": "full"},
                 "gradient_accumulation_steps": 2}, 2),
    (QWEN2_MOE, {"precision": "amp-bf16", "optimizer": "adadelta",
                 "gradient_accumulation_steps": 2}, 6),
    (QWEN3_MOE, {"optimizer": "adam"}, 6),
    (QWEN3_MOE, {"precision": "bf16", "optimizer": "sgd",
                 "activation_checkpointing": {"strategy": "full"}}, 2),
    (QWEN3_MOE, {"attention": "eager", "transformers": {"use_cache": False},
                 "gradient_accumulation_steps": 2}, 3),
    (MIXTRAL, {"precision": "mixed-bf16"}, 2),
    (QWEN2_MOE, {"precision": "mixed-fp16", "optimizer": "sgd-momentum",
                 "activation_checkpointing": {"strategy": "full"}}, 3),
    (QWEN3_MOE, {"precision": "amp-fp16", "gradient_accumulation_steps": 2}, 2),
]


def _training(over: dict) -> dict:
    return {"implementation": "transformers", "precision": "fp32", "optimizer": "adamw",
            "micro_batch_size": 2, "sequence_length": 16, **over}


def _estimate(config: dict, over: dict, ep: int):
    from planner.routes.memory import estimate_memory

    E = config.get("num_local_experts") or config["num_experts"]
    req = MemoryRequest(model={"hf_config": config}, training=_training(over),
                        parallelism={"data_parallel": E, "expert_parallel": ep})
    return estimate_memory(req, explain=False)


@pytest.mark.parametrize("config,over,ep", CASES,
                         ids=[f"{c['model_type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_floor_is_at_or_below_the_composed_peak(config, over, ep):
    r = _estimate(config, over, ep)
    cfg, tr = normalize(config), TrainingSpec(**_training(over))
    n = r.model.num_parameters
    E = config.get("num_local_experts") or config["num_experts"]
    floor = B.peak_floor(cfg, n, tr, ep, data_parallel=E)
    assert 0 < floor <= r.breakdown.total
    # the DDP rank's buckets (data_parallel > 1) raise the forward floor by up to its gradients
    # (less where the optimizer window's floor is the larger)
    rise = floor - B.peak_floor(cfg, n, tr, ep)
    assert 0 <= rise <= B.model_states(cfg, n, tr, ep)[1]
    # the model-state floors are what the composed optimizer window holds
    P, G, O = B.model_states(cfg, n, tr, ep)
    moe = r.moe
    # the traced parameters also hold the model's buffers (rotary inv_freq): bytes per head dim
    assert 0 <= moe.expert_parameters + moe.dense_parameters - P <= 16 * 64
    assert G == moe.expert_gradients + moe.dense_gradients
    assert O <= moe.expert_optimizer_states + moe.dense_optimizer_states
    assert moe.expert_optimizer_states + moe.dense_optimizer_states - O < 4 * 64  # step scalars


def test_floor_rises_with_the_micro_batch_and_falls_with_ep():
    cfg = normalize(MIXTRAL)
    tr = [TrainingSpec(**_training({"micro_batch_size": b})) for b in (1, 2, 4)]
    acts = [B.activation_floor(cfg, t) for t in tr]
    assert acts[0] < acts[1] < acts[2]
    n = 200_000
    assert B.peak_floor(cfg, n, tr[0], 4) < B.peak_floor(cfg, n, tr[0], 2)
