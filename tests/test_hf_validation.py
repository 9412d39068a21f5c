"""Validation jobs of implementation 'transformers': the whole transformers model run for real
(CPU) or traced (FakeTensorMode), against the estimate from its traced proxies. Tolerance:
none (the estimate equals the measurement in every category, first and steady step)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from planner.catalog.specs import ValidationRequest  # noqa: E402
from service.jobs.requirements import runner_refusal  # noqa: E402
from service.validation.runner import run_validation  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128}
MOE = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 48,
       "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
       "vocab_size": 128}


def _request(model: dict, mode: str, **training) -> ValidationRequest:
    return ValidationRequest(model={"hf_config": model}, mode=mode, steps=3, device="cpu",
                             training={"implementation": "transformers", "precision": "fp32",
                                       "micro_batch_size": 2, "sequence_length": 16,
                                       **training})


@pytest.mark.parametrize("model, mode, training", [
    (LLAMA, "real", {"optimizer": "adamw"}),
    (LLAMA, "traced", {"optimizer": "sgd", "activation_checkpointing": {"strategy": "full"}}),
    (MOE, "real", {"optimizer": "adamw", "precision": "amp-bf16"}),
    (MOE, "traced", {"optimizer": "adam", "attention": "eager"}),
])
def test_job_measures_what_the_estimate_says(model, mode, training):
    res = run_validation(_request(model, mode, **training))
    assert res.mode == mode
    assert res.measured == res.estimate and res.first_step_measured == res.first_step_estimate
    assert res.relative_error.total == 0.0
    assert (res.step_time_s is not None) == (mode == "real")
    assert ("FakeTensorMode" in res.device) == (mode == "traced")


def test_refused_at_submission_with_the_field():
    req = _request(LLAMA, "real", activation_checkpointing={"strategy": "sqrt"})
    field, reason = runner_refusal(req)
    assert field == "body.training.activation_checkpointing.strategy" and "full" in reason
    req = ValidationRequest(model={"hf_config": LLAMA}, parallelism={"data_parallel": 2},
                            training={"implementation": "transformers"})
    assert runner_refusal(req)[0] == "body.parallelism"
