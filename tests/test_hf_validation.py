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
    req = ValidationRequest(model={"hf_config": LLAMA},
                            parallelism={"data_parallel": 2, "zero_stage": 3,
                                         "offload_optimizer": True},
                            training={"implementation": "transformers"})
    assert runner_refusal(req)[0] == "body.parallelism"


def test_job_through_the_api(tmp_path):
    """A full-size preset built from a config.json, traced by a worker, through the API."""
    from fastapi.testclient import TestClient

    from tests.jobtargets import poll
    from tests.test_validations_api import make_client

    app, embedded = make_client(f"sqlite:///{tmp_path}/jobs.db", worker=True,
                                target="service.validation.runner:run_validation")
    embedded.start()
    try:
        with TestClient(app) as api:
            body = {"model": {"preset": "qwen3-0.6b"}, "device": "cpu", "mode": "traced",
                    "steps": 2, "timeout_s": 240,
                    "training": {"implementation": "transformers", "precision": "amp-bf16",
                                 "optimizer": "adamw", "sequence_length": 256}}
            r = api.post("/v1/validations", json=body)
            assert r.status_code == 202, r.text
            done = poll(api, r.json()["id"], lambda j: j["status"] in ("failed", "succeeded"),
                        250)
            refused = api.post("/v1/validations", json={
                **body, "training": {**body["training"],
                                     "precision_overrides": {"gradients": "fp32"}}})
    finally:
        embedded.stop(15)
        app.state.jobs.close()
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["measured"] == result["estimate"]
    assert result["measured"]["parameters"] >= 596_049_920 * 4
    assert refused.status_code == 422
    assert refused.json()["invalid-params"][0]["name"] == "body.training.precision_overrides"
