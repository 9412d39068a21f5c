"""Idempotency-Key on POST /v1/validations, on SQLite and PostgreSQL, and the v2 migration."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from service.app import create_app
from service.jobs.migrations import LATEST, MIGRATIONS, migrate, schema_version
from service.jobs.store import make_engine
from service.security import hash_token
from service.settings import DeviceInfo, Settings

CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
SPEC = {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32}, "device": "cpu", "steps": 3}


@pytest.fixture
def client(db_url):
    with TestClient(create_app(Settings(database_url=db_url, worker_device=CPU))) as c:
        yield c
    c.app.state.jobs.close()


def post(client: TestClient, body: dict, key: str | None, token: str | None = None):
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/v1/validations", json=body, headers=headers)


def queued(client: TestClient) -> int:
    return client.app.state.jobs.get().queue_depth()["queued"]


def test_same_key_and_body_returns_the_same_job(client):
    first = post(client, SPEC, "k-1")
    assert first.status_code == 202
    again = post(client, SPEC, "k-1")
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert queued(client) == 1


def test_same_body_differently_written_is_the_same_request(client):
    first = post(client, SPEC, "k-2").json()
    # Key order, and a default spelled out, do not make it another request.
    reordered = {"steps": 3, "device": "cpu", "training": SPEC["training"], "model": SPEC["model"],
                 "mode": "real"}
    assert post(client, reordered, "k-2").json()["id"] == first["id"]
    assert queued(client) == 1


def test_same_key_different_body_is_422(client):
    post(client, SPEC, "k-3")
    r = post(client, {**SPEC, "steps": 4}, "k-3")
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["invalid-params"][0]["name"] == "header.idempotency-key"
    assert queued(client) == 1


def test_no_key_means_a_new_job_each_time_and_keys_are_bounded(client):
    ids = {post(client, SPEC, None).json()["id"] for _ in range(3)}
    assert len(ids) == 3
    assert post(client, SPEC, "x" * 201).status_code == 422
    assert post(client, SPEC, "x" * 200).status_code == 202


def test_a_replay_is_not_refused_by_the_queue_cap(db_url):
    settings = Settings(database_url=db_url, worker_device=CPU, max_queued_per_token=1)
    with TestClient(create_app(settings)) as client:
        job = post(client, SPEC, "k-4").json()
        assert post(client, SPEC, "k-4").json()["id"] == job["id"]  # the retry, not a new job
        assert post(client, SPEC, "k-5").status_code == 429  # a new job is over the cap
    client.app.state.jobs.close()


def test_keys_belong_to_their_token(db_url):
    alice, bob = "alice-secret", "bob-secret"
    settings = Settings(database_url=db_url, worker_device=CPU,
                        api_tokens=(hash_token(alice), hash_token(bob)))
    with TestClient(create_app(settings)) as client:
        a = post(client, SPEC, "shared-key", alice).json()
        b = post(client, {**SPEC, "steps": 5}, "shared-key", bob)
        assert b.status_code == 202 and b.json()["id"] != a["id"]
        assert post(client, SPEC, "shared-key", alice).json()["id"] == a["id"]
    client.app.state.jobs.close()


def test_concurrent_retries_with_one_key_create_one_job(client):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(client, SPEC, "race"), range(12)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert queued(client) == 1


def test_v2_migration_upgrades_a_version_1_database_in_place(db_url):
    """A database made by version 1 (with a job in it) gains the columns and keeps its job."""
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            schema_version.create(conn)
            MIGRATIONS[0][2](conn)
            conn.execute(schema_version.insert().values(version=1, description="v1"))
            conn.execute(text(
                "INSERT INTO validation_jobs (id, status, request, phase, step, total_steps, "
                "attempts, history, ranks, peak_bytes, needs, timeout_s, created_at, updated_at) "
                "VALUES ('old', 'queued', :r, 'queued', 0, 3, 0, '[]', 1, 0, 'any', 60, 1, 1)"),
                {"r": json.dumps(SPEC)})
        assert migrate(engine) == 1
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("validation_jobs")}
            assert {"owner", "idempotency_key", "request_hash"} <= columns
            row = conn.execute(text("SELECT owner, idempotency_key FROM validation_jobs "
                                    "WHERE id = 'old'")).one()
        assert tuple(row) == ("", None)
        assert migrate(engine) == LATEST
    finally:
        engine.dispose()
    with TestClient(create_app(Settings(database_url=db_url, worker_device=CPU))) as client:
        assert client.get("/v1/validations/old").json()["status"] == "queued"
        assert post(client, SPEC, "after-upgrade").status_code == 202
    client.app.state.jobs.close()
