"""The estimate routes' safety net (service/estimates.py, planner/machine/deadline.py): a per-request work
limit, a bounded number of concurrent estimates, cancellation when the client goes away, and
health checks that never wait behind estimates."""

from __future__ import annotations

import tempfile
import time

import anyio
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient

from planner.machine.deadline import WorkLimit, WorkLimitExceeded, check, not_counted, work_limit
from planner.routes.memory import estimate_memory
from planner.catalog.specs import MemoryRequest
from service.app import create_app
from service.estimates import EstimateSlots, run_estimate
from service.settings import Settings

# A pipelined estimate that replays 16 ranks x 128 micro-batches of a 128-layer model: seconds
# of work, far past the limits the tests set.
HEAVY = {"model": {"family": "llama", "num_layers": 128, "hidden_size": 1024, "num_heads": 16,
                   "vocab_size": 32000},
         "training": {"micro_batch_size": 1, "sequence_length": 512,
                      "gradient_accumulation_steps": 128},
         "parallelism": {"pipeline_parallel": 16}}
LIGHT = {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 1, "sequence_length": 64}}


def _client(**settings) -> TestClient:
    tmp = tempfile.mkdtemp(prefix="memplan-limits-")
    return TestClient(create_app(Settings(database_url=f"sqlite:///{tmp}/jobs.db", **settings)),
                      raise_server_exceptions=False)


def test_planner_stops_at_its_work_limit() -> None:
    req = MemoryRequest.model_validate(HEAVY)
    with work_limit(WorkLimit(0.0)):
        with pytest.raises(WorkLimitExceeded, match="work limit"):
            estimate_memory(req)
    check()  # outside a limit: nothing to stop


def test_time_not_counted_moves_the_deadline() -> None:
    # a process's one-time import (planner.hf.errors.require_transformers) is not the request's
    # work: the first transformers estimate of a fresh service must not spend its limit on it
    with work_limit(WorkLimit(0.2)):
        with not_counted():
            time.sleep(0.3)
        check()  # 0.3 s passed, none of it counted
        time.sleep(0.25)
        with pytest.raises(WorkLimitExceeded):
            check()


def test_past_the_deadline_is_a_503_naming_the_limit() -> None:
    with _client(estimate_deadline_s=0.05) as client:
        t0 = time.monotonic()
        r = client.post("/v1/memory", json=HEAVY)
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "estimate_deadline_s" in r.json()["detail"]
        assert elapsed < 60  # stopped, not run to the end
        # the slot is free again and the next estimate (with room to finish) is answered
        assert client.app.state.estimates.limiter.borrowed_tokens == 0
        client.app.state.estimates.deadline_s = 600.0
        assert client.post("/v1/memory", json=LIGHT).status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/memory", LIGHT), ("/v1/zero", LIGHT), ("/v1/checkpointing", LIGHT),
    ("/v1/pipeline", {"stages": 2, "microbatches": 4}),
])
def test_busy_slots_are_a_503_with_retry_after_and_health_still_answers(path, body) -> None:
    with _client(max_concurrent_estimates=1, estimate_queue_s=0.05) as client:
        limiter = client.app.state.estimates.limiter
        client.portal.call(limiter.acquire_on_behalf_of, "a running estimate")
        try:
            r = client.post(path, json=body)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "max_concurrent_estimates" in r.json()["detail"]
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/gpus").status_code == 200
        finally:
            client.portal.call(limiter.release_on_behalf_of, "a running estimate")
        assert client.post(path, json=body).status_code == 200


def test_503_is_in_the_contract() -> None:
    doc = _client().app.openapi()
    for path in ("/v1/memory", "/v1/zero", "/v1/checkpointing", "/v1/pipeline"):
        assert "503" in doc["paths"][path]["post"]["responses"], path


class _GoneClient:
    """A request whose client disconnects after the work has started."""

    def __init__(self, slots: EstimateSlots) -> None:
        self.app = type("App", (), {"state": type("State", (), {"estimates": slots})()})()
        self.calls = 0

    async def is_disconnected(self) -> bool:
        self.calls += 1
        return self.calls > 2


def test_work_stops_when_the_client_goes_away() -> None:
    slots = EstimateSlots(max_concurrent=1, queue_s=1.0, deadline_s=600.0)
    request = _GoneClient(slots)
    checks = []

    def forever() -> None:
        while True:
            check()
            checks.append(1)
            time.sleep(0.01)

    async def main() -> None:
        with pytest.raises(HTTPException) as info:
            await run_estimate(request, forever)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        assert "cancelled" in info.value.detail

    anyio.run(main)
    assert checks and slots.limiter.borrowed_tokens == 0


def test_pipelined_memory_takes_the_pipeline_routes_action_bound() -> None:
    """1024 stages x 65,536 micro-batches is 67 million actions to build before any byte is
    counted: refused as POST /v1/pipeline refuses it, naming the field and the limit."""
    body = {"model": {"family": "llama", "num_layers": 1024, "hidden_size": 64, "num_heads": 4,
                      "vocab_size": 128},
            "training": {"micro_batch_size": 1, "sequence_length": 16,
                         "gradient_accumulation_steps": 65536},
            "parallelism": {"pipeline_parallel": 1024}}
    with _client() as client:
        r = client.post("/v1/memory", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.training.gradient_accumulation_steps"
    assert str(2**20) in r.json()["detail"]


def test_a_picture_too_large_to_draw_is_refused_before_the_simulation(monkeypatch) -> None:
    """An SVG of zb-h2 on 1024 ranks x 1024 micro-batches (3 million actions, past the
    50,000-event timeline limit) was simulated in full before the 422."""
    from planner.routes import pipeline as planner_pipeline
    def never(_):
        raise AssertionError("simulated although the picture cannot be drawn")

    monkeypatch.setattr(planner_pipeline, "plan_pipeline", never)
    with _client() as client:
        r = client.post("/v1/pipeline", json={"schedule": "zb-h2", "stages": 1024,
                                              "microbatches": 1024},
                        headers={"accept": "image/svg+xml"})
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.microbatches"
    assert "timeline limit" in r.json()["detail"]


def test_transformers_estimates_have_their_own_limit() -> None:
    """A Hugging Face model traced under FakeTensorMode is held to transformers_deadline_s, the
    reference planner to estimate_deadline_s."""
    hf = {"model": {"preset": "gemma-3-1b"},
          "training": {"implementation": "transformers", "micro_batch_size": 1,
                       "sequence_length": 256}}
    with _client(estimate_deadline_s=600, transformers_deadline_s=0.01) as client:
        r = client.post("/v1/memory", json=hf)
        assert r.status_code == 503, r.text
        assert "transformers_deadline_s = 0.01 s" in r.json()["detail"]
        assert client.post("/v1/memory", json=LIGHT).status_code == 200


def test_an_moe_plan_has_the_transformers_limit() -> None:
    """POST /v1/plan of an MoE model traces the transformers step (planner/routes/plan_moe.py):
    held to transformers_deadline_s like POST /v1/memory's transformers estimates, a dense
    model's search to estimate_deadline_s."""
    moe = {"model": {"hf_config": {"model_type": "mixtral", "hidden_size": 64,
                                   "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "num_local_experts": 4, "num_experts_per_tok": 2,
                                   "vocab_size": 256}},
           "training": {"global_batch_sequences": 4, "sequence_length": 32,
                        "precision": "bf16", "max_micro_batch_size": 2,
                        "checkpoint_strategies": ["none"]},
           "cluster": {"gpu": "h100-80gb", "num_gpus": 2}}
    dense = {**moe, "model": {"preset": "gpt2"}}
    with _client(estimate_deadline_s=600, transformers_deadline_s=0.0001) as client:
        r = client.post("/v1/plan", json=moe)
        assert r.status_code == 503, r.text
        assert "transformers_deadline_s = 0.0001 s" in r.json()["detail"]
        assert client.post("/v1/plan", json=dense).status_code == 200
    with _client(estimate_deadline_s=0.0001, transformers_deadline_s=600) as client:
        assert client.post("/v1/plan", json=moe).status_code == 200
