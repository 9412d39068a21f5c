"""GET /metrics (Prometheus text format), request ids and structured logs."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from planner.catalog.specs import Breakdown, ValidationRequest
from planner.catalog.validation_specs import ValidationResult, relative_error
from service.app import create_app
from service.jobs.migrations import jobs
from service.jobs.store import Requirements
from service.logs import JsonFormatter, bind_job
from service.metrics import Histogram
from service.settings import DeviceInfo, Settings
from tests.jobtargets import fake_result

CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
SPEC = {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32}, "device": "cpu", "steps": 3}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)?\})? '
                    r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text format 0.0.4 -> {sample name: {sorted label pairs: value}}; every line
    must be a comment or a well-formed sample, and every family must have a TYPE."""
    families, samples = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"malformed line: {line!r}"
        name, labels = m.group(1), tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"',
                                                           m.group(2) or "")))
        assert re.sub(r"_(bucket|sum|count)$", "", name) in families or name in families, name
        samples.setdefault(name, {})[labels] = float(m.group(3))
    return samples


def series(samples: dict, name: str, **labels: str) -> dict[tuple, float]:
    want = set(labels.items())
    return {k: v for k, v in samples.get(name, {}).items() if want <= set(k)}


def buckets(samples: dict, name: str, **labels: str) -> dict[str, float]:
    out = {dict(k)["le"]: v for k, v in series(samples, name + "_bucket", **labels).items()}
    ordered = sorted(out.items(), key=lambda kv: float(kv[0]))
    values = [v for _, v in ordered]
    assert values == sorted(values), "buckets must be cumulative"
    (count,) = series(samples, name + "_count", **labels).values()
    assert out["+Inf"] == count
    return out


@pytest.fixture
def client(db_url):
    with TestClient(create_app(Settings(database_url=db_url, worker_device=CPU))) as c:
        yield c
    c.app.state.jobs.close()


def test_request_latency_is_labelled_by_route_template(client):
    job = client.post("/v1/validations", json=SPEC).json()
    for _ in range(3):
        assert client.get(f"/v1/validations/{job['id']}").status_code == 200
    assert client.get("/v1/validations/nope").status_code == 404
    assert client.get("/no/such/path").status_code == 404
    samples = parse(client.get("/metrics").text)
    name = "memplan_http_request_duration_seconds"
    ok = buckets(samples, name, method="GET", route="/v1/validations/{job_id}", status="200")
    assert ok["+Inf"] >= 3
    assert buckets(samples, name, method="GET", route="/v1/validations/{job_id}",
                   status="404")["+Inf"] >= 1
    assert buckets(samples, name, method="POST", route="/v1/validations", status="202")
    assert series(samples, name + "_count", route="unmatched", status="404")
    # Raw paths never become labels (their number would be unbounded).
    routes = {dict(k)["route"] for k in samples[name + "_count"]}
    assert not any(job["id"] in r or "nope" in r or "/no/such" in r for r in routes)
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")


def test_queue_depth_by_state(client):
    ids = [client.post("/v1/validations", json=SPEC).json()["id"] for _ in range(3)]
    client.delete(f"/v1/validations/{ids[0]}")
    depth = series(parse(client.get("/metrics").text), "memplan_jobs")
    assert {dict(k)["state"]: v for k, v in depth.items()} == {
        "queued": 2, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1}
    assert parse(client.get("/metrics").text)["memplan_job_store_up"][()] == 1


def _finish(store, result: ValidationResult | None, seconds: float, reason: str = "boom") -> str:
    """A job run to its end by a worker, its duration set to ``seconds``."""
    job = store.submit(ValidationRequest.model_validate(SPEC), Requirements())
    claim = store.claim("w", CPU)
    assert claim.job_id == job.id
    assert store.complete(claim, result) if result else store.fail(claim, reason)
    with store.engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(
            started_at=1000.0, finished_at=1000.0 + seconds))
    return job.id


def test_job_duration_and_estimate_error_come_from_finished_jobs(client):
    store = client.app.state.jobs.get()
    _finish(store, fake_result(), 3.0)       # errors: activations 3.8%, temporaries 25%
    _finish(store, fake_result(), 45.0)
    traced_est = Breakdown(parameters=10, gradients=10, optimizer_states=20, activations=7,
                           temporaries=0, total=47)
    traced_meas = Breakdown(parameters=10, gradients=10, optimizer_states=20, activations=7,
                            temporaries=5, total=47)
    traced = ValidationResult(device="cpu", mode="traced", estimate=traced_meas,
                              measured=traced_est,
                              relative_error=relative_error(traced_meas, traced_est))
    assert traced.relative_error.temporaries is None  # measured 0, estimated 5: undefined
    _finish(store, traced, 0.5)
    _finish(store, None, 700.0)
    samples = parse(client.get("/metrics").text)

    dur = "memplan_job_duration_seconds"
    ok = buckets(samples, dur, status="succeeded")
    assert (ok["1"], ok["5"], ok["30"], ok["60"], ok["+Inf"]) == (1, 2, 2, 3, 3)
    assert series(samples, dur + "_sum", status="succeeded") == {(("status", "succeeded"),): 48.5}
    failed = buckets(samples, dur, status="failed")
    assert (failed["600"], failed["1800"], failed["+Inf"]) == (0, 1, 1)

    err = "memplan_estimate_relative_error"
    act = buckets(samples, err, category="activations", mode="real")
    assert (act["0.02"], act["0.05"], act["+Inf"]) == (0, 2, 2)
    tmp = buckets(samples, err, category="temporaries", mode="real")
    assert (tmp["0.2"], tmp["0.5"]) == (0, 2)
    (tmp_sum,) = series(samples, err + "_sum", category="temporaries", mode="real").values()
    assert tmp_sum == pytest.approx(0.5)
    total = buckets(samples, err, category="total", mode="traced")
    assert (total["0.001"], total["+Inf"]) == (1, 1)
    assert buckets(samples, err, category="temporaries", mode="traced")["+Inf"] == 0


def test_metrics_answer_while_the_database_is_down():
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        worker_device=CPU)
    with TestClient(create_app(settings)) as client:
        client.get("/healthz")
        r = client.get("/metrics")
        assert r.status_code == 200
        samples = parse(r.text)
        assert samples["memplan_job_store_up"][()] == 0
        assert "memplan_jobs" not in samples
        assert series(samples, "memplan_http_request_duration_seconds_count", route="/healthz")


def test_histogram_rendering_is_cumulative_and_escaped():
    h = Histogram("x_seconds", "help", ("route",), (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value, 'a"b\\c')
    samples = parse("\n".join(h.render()))
    label = (("le", "0.1"), ("route", 'a\\"b\\\\c'))
    assert samples["x_seconds_bucket"][label] == 2  # 0.1 falls in le="0.1"
    assert samples["x_seconds_bucket"][(("le", "1"), ("route", 'a\\"b\\\\c'))] == 3
    assert samples["x_seconds_bucket"][(("le", "+Inf"), ("route", 'a\\"b\\\\c'))] == 4
    assert samples["x_seconds_sum"][(("route", 'a\\"b\\\\c'),)] == pytest.approx(3.65)


# ---- request ids and structured logs -----------------------------------------------------------
@pytest.fixture
def log_lines():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("memplan")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_request_ids_are_echoed_or_generated(client):
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    # A header that is not a plain token is not copied into logs or responses.
    r = client.get("/healthz", headers={"X-Request-ID": "x" * 300})
    assert r.headers["x-request-id"] != "x" * 300
    assert client.post("/v1/validations", content=b"{", headers={
        "content-type": "application/json", "X-Request-ID": "bad-1"}).headers["x-request-id"] \
        == "bad-1"


def test_access_lines_are_json_with_request_and_job_ids(client, log_lines):
    job = client.post("/v1/validations", json=SPEC, headers={"X-Request-ID": "req-1"}).json()
    client.get(f"/v1/validations/{job['id']}", headers={"X-Request-ID": "req-2"})
    client.get("/healthz", headers={"X-Request-ID": "req-3"})
    access = {line["request_id"]: line for line in log_lines()
              if line["logger"] == "memplan.access"}
    assert access["req-1"]["job_id"] == job["id"] and access["req-1"]["status"] == 202
    assert access["req-1"]["route"] == "/v1/validations"
    assert access["req-2"]["job_id"] == job["id"]
    assert access["req-2"]["route"] == "/v1/validations/{job_id}"
    assert "job_id" not in access["req-3"]
    assert access["req-3"]["duration_ms"] >= 0 and access["req-3"]["level"] == "info"


def test_worker_lines_carry_their_job_id(log_lines):
    log = logging.getLogger("memplan.worker")
    log.info("job %s: claimed (attempt %d)", "j-42", 1)
    log.info("worker %s serving %s", "w1", "cpu")

    def in_a_job() -> None:  # a context of its own, so the binding ends with it
        bind_job("j-43")
        log.warning("anything")
    contextvars.copy_context().run(in_a_job)
    log.info("after")
    lines = log_lines()
    assert lines[0]["job_id"] == "j-42" and lines[0]["msg"] == "job j-42: claimed (attempt 1)"
    assert "job_id" not in lines[1]
    assert lines[2]["job_id"] == "j-43" and lines[2]["level"] == "warning"
    assert "job_id" not in lines[3]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
               for line in lines)
