"""Validation jobs through the API: lifecycle with progress, cancel, failures, refusal, paging."""

from __future__ import annotations


import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.jobs.embedded import EmbeddedWorker
from service.settings import DeviceInfo, Settings
from tests.jobtargets import SCRIPT, crash, poll

CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
STEPS = {fn: steps for steps, fn in SCRIPT.items()}
KEYS = {"parameters", "gradients", "optimizer_states", "activations", "temporaries", "total"}


def spec(steps: int = 3, **extra) -> dict:
    return {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                      "vocab_size": 256, "max_sequence_length": 64},
            "training": {"precision": "fp32", "sequence_length": 32, "optimizer": "adamw"},
            "device": "cpu", "steps": steps, **extra}


def make_client(db_url: str, worker: bool, target: str = "tests.jobtargets:scripted"):
    settings = Settings(database_url=db_url, lease_s=5, heartbeat_s=0.3, poll_s=0.1,
                        job_target=target, worker_device=CPU, shutdown_grace_s=0)
    app = create_app(settings)
    embedded = EmbeddedWorker(app.state.jobs.get(), settings) if worker else None
    return app, embedded


@pytest.fixture
def api(db_url):
    """A client with an embedded worker running the scripted test target."""
    app, embedded = make_client(db_url, worker=True)
    embedded.start()
    with TestClient(app) as client:
        yield client
    embedded.stop(15)
    app.state.jobs.close()


@pytest.fixture
def api_no_worker(db_url):
    app, _ = make_client(db_url, worker=False)
    with TestClient(app) as client:
        yield client
    app.state.jobs.close()


def test_lifecycle_submit_running_with_progress_succeeded(api, monkeypatch):
    monkeypatch.setenv("MEMPLAN_TEST_STEP_S", "0.3")
    r = api.post("/v1/validations", json=spec(steps=8))
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/validations/{job['id']}"
    assert job["status"] == "queued" and job["progress"]["total_steps"] == 8
    running = poll(api, job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
    assert running["progress"]["phase"] == "step" and running["started_at"]
    done = poll(api, job["id"], lambda j: j["status"] not in ("queued", "running"))
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["step"] == 8 and done["attempts"] == 1 and done["finished_at"]
    result = done["result"]
    for key in ("estimate", "measured", "relative_error"):
        assert set(result[key]) == KEYS


def test_crash_fails_with_reason_and_the_next_job_runs(api):
    bad = api.post("/v1/validations", json=spec(steps=STEPS[crash])).json()
    good = api.post("/v1/validations", json=spec(steps=3)).json()
    failed = poll(api, bad["id"], lambda j: j["status"] in ("failed", "succeeded"))
    assert failed["status"] == "failed" and "exited with code 3" in failed["error"]
    assert poll(api, good["id"], lambda j: j["status"] in ("failed", "succeeded"))["status"] == \
        "succeeded"


def test_cancel_running_job(api, monkeypatch):
    monkeypatch.setenv("MEMPLAN_TEST_STEP_S", "1.0")
    job = api.post("/v1/validations", json=spec(steps=30)).json()
    poll(api, job["id"], lambda j: j["status"] == "running")
    r = api.delete(f"/v1/validations/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # The worker notices at its next heartbeat and takes the next job.
    nxt = api.post("/v1/validations", json=spec(steps=3)).json()
    assert poll(api, nxt["id"], lambda j: j["status"] == "succeeded", 20)["status"] == "succeeded"
    assert api.get(f"/v1/validations/{job['id']}").json()["status"] == "cancelled"


def test_cancel_queued_then_conflict_and_unknown_ids(api_no_worker):
    api = api_no_worker
    job = api.post("/v1/validations", json=spec()).json()
    r = api.delete(f"/v1/validations/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = api.delete(f"/v1/validations/{job['id']}")
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert "already cancelled" in r.json()["detail"]
    for method in ("get", "delete"):
        r = getattr(api, method)("/v1/validations/does-not-exist")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["status"] == 404


def test_list_with_cursor_and_status_filter(api_no_worker):
    api = api_no_worker
    ids = [api.post("/v1/validations", json=spec()).json()["id"] for _ in range(5)]
    api.delete(f"/v1/validations/{ids[1]}")
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.get("/v1/validations", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled = api.get("/v1/validations", params={"status": "cancelled"}).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[1]] and cancelled["next_cursor"] is None
    assert len(api.get("/v1/validations", params={"status": "queued"}).json()["items"]) == 4
    for params in ({"cursor": "nonsense"}, {"status": "done"}, {"limit": 0}, {"limit": 10**6}):
        r = api.get("/v1/validations", params=params)
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"


def test_invalid_requests_are_422_problems(api_no_worker):
    api = api_no_worker
    r = api.post("/v1/validations", json={**spec(), "steps": 1})
    assert r.status_code == 422
    assert any(p["name"] == "body.steps" for p in r.json()["invalid-params"])
    r = api.post("/v1/validations", json={**spec(), "model": {"preset": "no-such-model"}})
    assert r.status_code == 422 and "no-such-model" in r.json()["detail"]
    assert api.get("/v1/validations").json()["items"] == []


def test_oversized_real_job_is_refused_with_the_numbers(db_url):
    """A full-size 70B model cannot be allocated on this machine: the worker refuses it before
    running, with the estimate and the free memory, and suggests traced mode."""
    app, embedded = make_client(db_url, worker=True,
                                target="service.validation.runner:run_validation")
    embedded.start()
    try:
        with TestClient(app) as api:
            body = {"model": {"preset": "llama-2-70b"}, "device": "cpu", "mode": "real",
                    "training": {"precision": "mixed-bf16", "optimizer": "adamw"}}
            job = api.post("/v1/validations", json=body).json()
            failed = poll(api, job["id"], lambda j: j["status"] in ("failed", "succeeded"))
    finally:
        embedded.stop(15)
        app.state.jobs.close()
    assert failed["status"] == "failed"
    error = failed["error"]
    assert "refused before running" in error and "GiB" in error and "bytes" in error
    assert "available" in error and '"traced"' in error


def test_readyz_checks_the_database(api_no_worker):
    r = api_no_worker.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_unreachable_database_is_503_not_500():
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:9/none"
                        "?connect_timeout=2")
    with TestClient(create_app(settings)) as api:
        r = api.get("/readyz")
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        r = api.get("/v1/validations")
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert api.get("/healthz").status_code == 200


def test_traced_full_size_job_succeeds(db_url):
    """'traced' is the refusal's suggested alternative: the same 7B step under FakeTensorMode,
    exact bytes without allocating them, through the real runner."""
    app, embedded = make_client(db_url, worker=True,
                                target="service.validation.runner:run_validation")
    embedded.start()
    try:
        with TestClient(app) as api:
            body = {"model": {"preset": "llama-2-7b"}, "device": "cpu", "mode": "traced",
                    "steps": 2, "timeout_s": 240,
                    "training": {"precision": "mixed-bf16", "optimizer": "adamw",
                                 "sequence_length": 512}}
            job = api.post("/v1/validations", json=body).json()
            done = poll(api, job["id"], lambda j: j["status"] in ("failed", "succeeded"), 250)
    finally:
        embedded.stop(15)
        app.state.jobs.close()
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    assert result["mode"] == "traced" and result["measured"]["parameters"] > 7 * 10**9
    for key in ("estimate", "measured", "relative_error"):
        assert set(result[key]) == KEYS
