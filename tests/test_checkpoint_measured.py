"""Checkpoint plans measured on CPU: the reference step runs the plan with torch.utils.checkpoint
and the live-storage meter measures its steady-state peak.

Source of truth: the measured step (service/validation/runner.py). Tolerance: the issue asks
that a 'budget' plan's measured peak be within the budget and within 2% of the planned peak; the
planner replays the step byte for byte, so the tests also check equality.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from planner.routes.checkpoint_specs import CheckpointRequest
from planner.routes.checkpointing import plan_checkpointing
from planner.catalog.specs import (
    ActivationCheckpointing,
    ModelSpec,
    TrainingSpec,
    ValidationRequest,
)
from service.app import create_app
from service.validation.runner import measure, run_validation

MODELS = {
    "gpt2": ModelSpec(family="gpt2", num_layers=4, hidden_size=64, num_heads=4, vocab_size=256,
                      max_sequence_length=64),
    "llama": ModelSpec(family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                       vocab_size=256, max_sequence_length=64),
}
TRAINING = TrainingSpec(precision="fp32", micro_batch_size=4, sequence_length=64)


def _planned(model: ModelSpec, **kw):
    return plan_checkpointing(CheckpointRequest(model=model, training=TRAINING, device="cpu", **kw))


def _request(model: ModelSpec, ac: ActivationCheckpointing, steps: int = 2) -> ValidationRequest:
    return ValidationRequest(model=model, device="cpu", steps=steps,
                             training=TRAINING.model_copy(update={"activation_checkpointing": ac}))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_budget_plan_measured_within_budget_and_planned_peak(family):
    model = MODELS[family]
    none, full = _planned(model, strategy="none"), _planned(model, strategy="full")
    assert full.total_peak_bytes < none.total_peak_bytes
    budget = (none.total_peak_bytes + 2 * full.total_peak_bytes) // 3
    plan = _planned(model, strategy="budget", budget_bytes=budget)
    assert plan.fits and 0 < len(plan.checkpointed_blocks) < model.num_layers
    assert plan.peak_phase.startswith("backward")  # where checkpointing matters
    # the unresolved budget: the runner asks the planner, applies the plan, reports it
    result = run_validation(_request(model, ActivationCheckpointing(strategy="budget",
                                                                    budget_bytes=budget)))
    assert result.checkpointed_blocks == plan.checkpointed_blocks
    measured = result.measured.total
    assert measured <= budget
    assert abs(measured - plan.total_peak_bytes) <= 0.02 * plan.total_peak_bytes
    assert measured == plan.total_peak_bytes == result.estimate.total
    # step time: measured against an unchecked run in the same job, and the planned ratio
    assert result.step_time_ratio is not None and result.step_time_ratio > 0
    assert result.planned_step_time_ratio == pytest.approx(1 + plan.recompute_time_fraction)
    assert result.planned_step_time_ratio > 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kw", [
    {"strategy": "full"}, {"strategy": "every-k", "every_k": 3}, {"strategy": "sqrt"},
    {"strategy": "blocks", "blocks": [1, 2]},
])
def test_named_plans_measured_equal_planned(family, kw):
    model = MODELS[family]
    plan = _planned(model, **kw)
    m = measure(_request(model, plan.plan))  # the returned plan, applied as it is
    assert m["steady"]["phase"] in ("backward", "recompute")
    assert m["checkpointed_blocks"] == plan.checkpointed_blocks
    assert m["steady"]["breakdown"]["total"] == plan.total_peak_bytes
    first = plan_checkpointing(CheckpointRequest(model=model, training=TRAINING, device="cpu",
                                                 **kw))
    assert first.total_peak_bytes == plan.total_peak_bytes  # deterministic


def test_api_plan_is_posted_to_validations_as_is(tmp_path):
    from service.settings import DeviceInfo, Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path}/jobs.db",
                        worker_device=DeviceInfo(kind="cpu", count=1, memory_bytes=2**34))
    setup = {"model": MODELS["gpt2"].model_dump(exclude_none=True),
             "training": TRAINING.model_dump(exclude_none=True)}
    app = create_app(settings)
    with TestClient(app) as client:
        none = client.post("/v1/checkpointing", json={**setup, "strategy": "none",
                                                      "device": "cpu"}).json()
        plan = client.post("/v1/checkpointing", json={
            **setup, "strategy": "budget", "device": "cpu",
            "budget_bytes": none["total_peak_bytes"] - 1}).json()
        assert plan["fits"] and plan["plan"]["blocks"]
        body = {**setup, "training": {**setup["training"], "activation_checkpointing":
                                      plan["plan"]}, "device": "cpu", "steps": 2}
        r = client.post("/v1/validations", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["request"]["training"]["activation_checkpointing"] == plan["plan"]
        bad = {**body, "training": {**body["training"], "activation_checkpointing": {
            "strategy": "blocks", "blocks": [4]}}}
        r = client.post("/v1/validations", json=bad)
        assert r.status_code == 422 and "activation_checkpointing.blocks" in r.json()["detail"]
    app.state.jobs.close()
    # what the worker runs for that job: the same plan, measured at the planned peak
    result = run_validation(ValidationRequest.model_validate(body))
    assert result.checkpointed_blocks == plan["checkpointed_blocks"]
    assert result.measured.total == plan["total_peak_bytes"] <= plan["budget_bytes"]
