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


def make_client(db_url: str, worker: bool, target: str = "tests.jobtargets:scripted", **kw):
    settings = Settings(**{**dict(database_url=db_url, lease_s=5, heartbeat_s=0.3, poll_s=0.1,
                                  job_target=target, worker_device=CPU, shutdown_grace_s=0),
                           **kw})
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


def test_oversized_real_job_is_refused_at_submission_with_the_numbers(db_url):
    """A full-size 70B model cannot be allocated on the only live worker (16 GiB of host memory):
    it is refused before it is queued, with the estimate and the worker's memory, and the
    suggestion of traced mode, in the words of the worker's own fit check."""
    app, embedded = make_client(db_url, worker=True,
                                target="service.validation.runner:run_validation")
    embedded.start()
    try:
        with TestClient(app) as api:
            body = {"model": {"preset": "llama-2-70b"}, "device": "cpu", "mode": "real",
                    "training": {"precision": "mixed-bf16", "optimizer": "adamw"}}
            r = api.post("/v1/validations", json=body)
            assert r.status_code == 422, r.text
            assert r.headers["content-type"] == "application/problem+json"
            problem = r.json()
            assert [p["name"] for p in problem["invalid-params"]] == ["body.mode"]
            detail = problem["detail"]
            assert "no live worker can run this real job" in detail
            assert "GiB" in detail and "17,179,869,184 bytes" in detail  # the worker's memory
            assert "allocator reserve included" in detail and '"mode": "traced"' in detail
            assert "1 worker with 2 x cpu (16.0 GiB each)" in detail
            assert api.get("/v1/validations").json()["items"] == []  # nothing queued
            traced = api.post("/v1/validations", json={**body, "mode": "traced"})
            assert traced.status_code == 202  # traced allocates nothing: it is accepted
            api.delete(f"/v1/validations/{traced.json()['id']}")
    finally:
        embedded.stop(15)
        app.state.jobs.close()


def test_crafted_cursor_is_422_naming_cursor(api_no_worker):
    """A cursor decoding to an integer beyond the job table's key is bad input (422), not a 500
    (SQLite's OverflowError) nor a 503 (PostgreSQL's refusal read as an outage)."""
    api_no_worker.post("/v1/validations", json=spec())
    for cursor in ("czk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OQ",  # 's' + 31 nines
                   "czkyMjMzNzIwMzY4NTQ3NzU4MDg"):  # 's' + 2**63
        r = api_no_worker.get("/v1/validations", params={"cursor": cursor})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert [p["name"] for p in r.json()["invalid-params"]] == ["query.cursor"]
        assert str(2**63 - 1) in r.json()["detail"]


def test_jobs_the_runner_would_refuse_are_422_at_submission(api_no_worker):
    """What the validation runner refuses whatever worker takes it is refused before it is
    queued, naming the field, instead of being accepted and failing later."""
    api = api_no_worker
    cases = [
        ({**spec(), "mode": "traced", "model": {"num_parameters": 1_000_000}}, "body.model",
         "a bare num_parameters model cannot be built"),
        ({**spec(), "model": {"num_parameters": 1_000_000}}, "body.model", "num_parameters"),
        ({**spec(), "parallelism": {"tensor_parallel": 2}},
         "body.parallelism.tensor_parallel", "tensor_parallel > 1"),
        ({**spec(), "training": {**spec()["training"], "optimizer": "lion"}},
         "body.training.optimizer", "'lion' has no torch.optim implementation"),
        ({**spec(), "mode": "traced", "parallelism": {"data_parallel": 2}}, "body.mode",
         "FakeTensorMode"),
    ]
    for body, field, words in cases:
        r = api.post("/v1/validations", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert [p["name"] for p in problem["invalid-params"]] == [field], problem
        assert words in problem["detail"] and "runner would refuse" in problem["detail"]
    assert api.get("/v1/validations").json()["items"] == []


def test_a_job_no_live_worker_can_run_says_why_then_fails(db_url):
    """A CUDA job with only a CPU worker live: queued, with the reason on the job, then failed
    with it after unrunnable_timeout_s; it no longer counts against the queue allowance."""
    app, embedded = make_client(db_url, worker=True, unrunnable_timeout_s=1.0,
                                max_queued_per_token=1)
    embedded.start()
    try:
        with TestClient(app) as api:
            r = api.post("/v1/validations", json={**spec(), "device": "cuda"})
            assert r.status_code == 202
            job = r.json()
            assert job["waiting_reason"] == ("no live worker has a cuda device; live workers: "
                                             "1 worker with 2 x cpu (16.0 GiB each)")
            assert api.post("/v1/validations", json=spec()).status_code == 429  # allowance
            failed = poll(api, job["id"], lambda j: j["status"] != "queued", 20)
            assert failed["status"] == "failed" and failed["attempts"] == 0
            assert failed["waiting_reason"] is None
            assert failed["error"].startswith("no live worker could run it for")
            assert "no live worker has a cuda device" in failed["error"]
            ok = api.post("/v1/validations", json=spec())
            assert ok.status_code == 202 and ok.json()["waiting_reason"] is None
            assert poll(api, ok.json()["id"])["status"] == "succeeded"
    finally:
        embedded.stop(15)
        app.state.jobs.close()


def test_with_no_live_worker_jobs_wait_and_say_so(api_no_worker):
    job = api_no_worker.post("/v1/validations", json={**spec(), "device": "cuda"}).json()
    assert job["waiting_reason"].startswith("no live worker (none has sent a heartbeat")
    got = api_no_worker.get(f"/v1/validations/{job['id']}").json()
    assert got["status"] == "queued" and got["waiting_reason"] == job["waiting_reason"]


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


def test_submission_checks_load_no_torch_into_the_api(tmp_path):
    """The runner's refusals and the worker checks are decided without torch for a
    single-device job: the API process stays light and its first submission fast."""
    import subprocess
    import sys

    code = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
app = create_app(Settings(database_url="sqlite:///{tmp_path}/jobs.db"))
with TestClient(app) as api:
    body = {{"model": {{"num_parameters": 1000000}}, "mode": "traced", "device": "cpu"}}
    assert api.post("/v1/validations", json=body).status_code == 422
    tiny = {{"model": {{"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
            "vocab_size": 256, "max_sequence_length": 64}}, "device": "cpu",
            "training": {{"sequence_length": 32}}}}
    assert api.post("/v1/validations", json=tiny).status_code == 202
app.state.jobs.close()
assert "torch" not in sys.modules, "torch was imported"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
