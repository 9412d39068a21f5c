"""A pipeline rank builds the tensors of its own stages' blocks only
(``PipelineRankProgram.own_blocks_only``); building every block's and freeing the others', as the
full model is built, gives the same replayed step on every rank: tied and untied embeddings,
uneven stages, LoRA, Adagrad (states at construction) and fp32, under every schedule kind."""

from __future__ import annotations

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import build_schedule
from planner.layouts.pipelined import pipeline_rank_peaks

MODELS = {
    "gpt2": {"family": "gpt2", "num_layers": 8, "hidden_size": 64, "num_heads": 4,
             "vocab_size": 1000, "max_sequence_length": 128},
    "llama-tied": {"family": "llama", "num_layers": 8, "hidden_size": 64, "num_heads": 4,
                   "num_kv_heads": 2, "vocab_size": 1000, "max_sequence_length": 128,
                   "tie_embeddings": True},
    "llama-7-layers": {"family": "llama", "num_layers": 7, "hidden_size": 64, "num_heads": 4,
                       "vocab_size": 1000, "max_sequence_length": 128},
}
TRAINING = {"default": {}, "lora": {"lora": {"rank": 4}}, "adagrad": {"optimizer": "adagrad"},
            "fp32": {"precision": "fp32"}}
SCHEDULES = [("gpipe", 2, 1), ("1f1b", 4, 1), ("interleaved-1f1b", 2, 2), ("zb-h1", 2, 1),
             ("zb-v", 2, 2), ("dualpipe-v", 2, 2)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("training", sorted(TRAINING))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_own_blocks_only_equals_the_full_build(model: str, training: str, schedule,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name, p, v = schedule
    req = MemoryRequest.model_validate({
        "model": MODELS[model],
        "training": {"micro_batch_size": 2, "sequence_length": 32,
                     "gradient_accumulation_steps": 4, **TRAINING[training]},
        "parallelism": {"pipeline_parallel": p, "pipeline_schedule": name,
                        "virtual_pipeline_stages": v}})
    m, tr = resolve_model(req.model), req.training
    plan = build_schedule(name, p, tr.gradient_accumulation_steps, v)
    own = pipeline_rank_peaks(m, tr, plan, "cuda")
    monkeypatch.setattr(PipelineRankProgram, "own_blocks_only", False)
    full = pipeline_rank_peaks(m, tr, plan, "cuda")
    assert own == full
    # the ranks hold different stages: the comparison covers more than one parameter set
    assert len({pk.steady.by_cat[0] for pk in own}) > 1
