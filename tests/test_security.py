"""Bearer tokens, estimate protection, queued-jobs cap, body size and resource caps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main as cli_main
from service.security import hash_token, parse_token_digests
from service.settings import DeviceInfo, Settings
from tests.jobtargets import terminate

ROOT = Path(__file__).resolve().parents[1]
CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
ALICE, BOB = "alice-token-1234", "bob-token-5678"


def spec(**extra) -> dict:
    base = {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                      "vocab_size": 256, "max_sequence_length": 64},
            "training": {"precision": "fp32", "sequence_length": 32},
            "device": "cpu", "steps": 3}
    for key, value in extra.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return base


MEMORY = {"model": {"preset": "gpt2"}, "training": {"sequence_length": 128}}


def client_for(db_url: str, **overrides) -> TestClient:
    settings = Settings(database_url=db_url, worker_device=CPU, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture
def secured(db_url):
    with client_for(db_url, api_tokens=(hash_token(ALICE), hash_token(BOB)),
                    max_queued_per_token=3) as client:
        yield client
    client.app.state.jobs.close()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# ---- tokens --------------------------------------------------------------------------------------
def test_job_routes_need_a_known_token(secured):
    for method, path in [("post", "/v1/validations"), ("get", "/v1/validations"),
                         ("get", "/v1/validations/abc"), ("delete", "/v1/validations/abc")]:
        kwargs = {"json": spec()} if method == "post" else {}
        r = getattr(secured, method)(path, **kwargs)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = getattr(secured, method)(path, headers=bearer("not-a-token"), **kwargs)
        assert r.status_code == 401
        r = getattr(secured, method)(path, headers={"Authorization": f"Basic {ALICE}"}, **kwargs)
        assert r.status_code == 401
    r = secured.post("/v1/validations", json=spec(), headers=bearer(ALICE))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert secured.get(f"/v1/validations/{job_id}", headers=bearer(BOB)).status_code == 200
    assert secured.get("/v1/validations", headers=bearer(ALICE)).json()["items"][0]["id"] == job_id
    assert secured.delete(f"/v1/validations/{job_id}", headers=bearer(ALICE)).status_code == 200


def test_estimates_stay_open_unless_protected(db_url):
    with client_for(db_url, api_tokens=(hash_token(ALICE),)) as open_client:
        assert open_client.post("/v1/memory", json=MEMORY).status_code == 200
        assert open_client.get("/healthz").status_code == 200
        assert open_client.get("/metrics").status_code == 200
    with client_for(db_url, api_tokens=(hash_token(ALICE),), protect_estimates=True) as closed:
        assert closed.post("/v1/memory", json=MEMORY).status_code == 401
        assert closed.post("/v1/zero", json=MEMORY).status_code == 401
        assert closed.post("/v1/memory", json=MEMORY, headers=bearer(BOB)).status_code == 401
        assert closed.post("/v1/memory", json=MEMORY, headers=bearer(ALICE)).status_code == 200
        assert closed.get("/readyz").status_code == 200  # probes never need a token


ESTIMATE_ROUTES = ["/v1/memory", "/v1/zero", "/v1/checkpointing", "/v1/pipeline", "/v1/plan"]


def test_every_401_is_in_the_contract_as_a_problem(db_url):
    """The protected estimate routes (and the job routes) document the 401 they answer."""
    with client_for(db_url, api_tokens=(hash_token(ALICE),), protect_estimates=True) as closed:
        doc = closed.app.openapi()
        for path in ESTIMATE_ROUTES:
            r = closed.post(path, json=MEMORY)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            documented = doc["paths"][path]["post"]["responses"]["401"]
            assert documented["content"] == {"application/problem+json": {
                "schema": {"$ref": "#/components/schemas/Problem"}}}, path
            assert "WWW-Authenticate" in documented["headers"]
            assert "MEMPLAN_PROTECT_ESTIMATES" in documented["description"]
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if path.startswith("/v1/validations"):
                    assert "401" in op["responses"], (method, path)
                elif path not in ESTIMATE_ROUTES:  # catalog, probes, metrics: always open
                    assert "401" not in op["responses"], (method, path)
    closed.app.state.jobs.close()


def test_no_tokens_configured_means_open_job_routes(db_url):
    with client_for(db_url) as client:
        r = client.post("/v1/validations", json=spec())
        assert r.status_code == 202, r.text
        # A token sent anyway is ignored rather than refused.
        assert client.get("/v1/validations", headers=bearer("anything")).status_code == 200
    client.app.state.jobs.close()


def test_token_settings_take_digests_only(tmp_path):
    digest = hash_token(ALICE)
    assert Settings.from_env({"MEMPLAN_API_TOKENS": f"{digest}, {hash_token(BOB)}"}
                             ).api_tokens == (digest, hash_token(BOB))
    f = tmp_path / "tokens"
    f.write_text(f"# team tokens\n{digest}  # alice\n\n{digest.upper()}\n")
    assert Settings.from_env({"MEMPLAN_API_TOKENS": str(f)}).api_tokens == (digest,)
    with pytest.raises(ValueError, match="SHA-256 hex digests"):
        Settings.from_env({"MEMPLAN_API_TOKENS": ALICE})  # a clear token is never accepted
    with pytest.raises(ValueError):
        parse_token_digests(["0" * 63])
    assert Settings.from_env({"MEMPLAN_PROTECT_ESTIMATES": "1"}).protect_estimates is True


def test_hash_token_cli(capsys, monkeypatch):
    import io

    assert cli_main(["hash-token", ALICE]) == 0
    assert capsys.readouterr().out.strip() == hash_token(ALICE)
    monkeypatch.setattr("sys.stdin", io.StringIO(BOB + "\n"))
    assert cli_main(["hash-token", "-"]) == 0
    assert capsys.readouterr().out.strip() == hash_token(BOB)
    # FIPS 180-2 test vector: the digest is plain SHA-256 of the token's UTF-8 bytes.
    assert hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---- queued-jobs cap -----------------------------------------------------------------------------
def test_queued_jobs_are_capped_per_token(secured):
    for _ in range(3):
        assert secured.post("/v1/validations", json=spec(), headers=bearer(ALICE)).status_code \
            == 202
    r = secured.post("/v1/validations", json=spec(), headers=bearer(ALICE))
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    assert r.headers["content-type"].startswith("application/problem+json")
    # The cap is per token: Bob is not held back by Alice's queue.
    assert secured.post("/v1/validations", json=spec(), headers=bearer(BOB)).status_code == 202
    # Only queued jobs count: cancelling one frees a slot.
    alice_jobs = [j for j in secured.get("/v1/validations", headers=bearer(ALICE)).json()["items"]]
    assert len(alice_jobs) == 4
    store = secured.app.state.jobs.get()
    assert store.queue_depth()["queued"] == 4
    first_alice = [j["id"] for j in alice_jobs][-1]
    assert secured.delete(f"/v1/validations/{first_alice}", headers=bearer(ALICE)).status_code \
        == 200
    assert secured.post("/v1/validations", json=spec(), headers=bearer(ALICE)).status_code == 202


def test_queue_cap_holds_under_concurrent_submissions(db_url):
    from concurrent.futures import ThreadPoolExecutor

    with client_for(db_url, max_queued_per_token=5) as client:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: client.post("/v1/validations",
                                                        json=spec()).status_code, range(16)))
        assert sorted(set(codes)) == [202, 429]
        assert codes.count(202) == 5
        assert client.app.state.jobs.get().queue_depth()["queued"] == 5
    client.app.state.jobs.close()


# ---- body size -----------------------------------------------------------------------------------
def test_request_body_is_capped(db_url):
    with client_for(db_url, max_body_bytes=2000) as client:
        big = json.dumps(spec()).encode() + b" " * 3000
        r = client.post("/v1/validations", content=big,
                        headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "2000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 500

        r = client.post("/v1/memory", content=chunks(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        # Under the cap, the same route answers.
        assert client.post("/v1/memory", json=MEMORY).status_code == 200
        assert client.app.state.jobs.get().queue_depth()["queued"] == 0
    client.app.state.jobs.close()


@pytest.mark.parametrize("length", ["-5", "abc", "1.5", "1, 2", "+3"])
def test_content_length_that_is_not_a_byte_count_is_a_400_problem(db_url, length):
    with client_for(db_url) as client:
        r = client.post("/v1/memory", content=json.dumps(MEMORY).encode(),
                        headers={"content-type": "application/json", "content-length": length})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["invalid-params"][0]["name"] == "header.content-length"
    client.app.state.jobs.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.slow
def test_served_api_answers_a_bad_content_length_with_a_problem(tmp_path):
    """uvicorn's h11 refuses such a request before the app sees it; `memplan serve` runs it with
    a protocol that answers that refusal as problem+json too."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMPLAN_DATABASE_URL":
           f"sqlite:///{tmp_path}/jobs.db", "MEMPLAN_LOG_FORMAT": "text"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--no-worker",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b" 200 " not in _try_readyz(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("server did not start:\n" + (tmp_path / "server.log").read_text())
            time.sleep(0.2)
        for length in (b"-5", b"abc", b"1, 2"):
            reply = _raw_exchange(port, b"POST /v1/memory HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: "
                                  + length + b"\r\n\r\n{}")
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), reply
            assert b"content-type: application/problem+json" in head.lower(), reply
            problem = json.loads(body)
            assert problem["status"] == 400 and "Content-Length" in problem["detail"]
            assert problem["invalid-params"][0]["name"] == "header.content-length"
    finally:
        terminate(proc)
        log.close()


def _try_readyz(port: int) -> bytes:
    try:
        return _raw_exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close"
                             b"\r\n\r\n")
    except OSError:
        return b""


# ---- resource caps -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,field,cap", [
    ({"model": {"num_layers": 200}}, "body.model.num_layers", "128"),
    ({"model": {"hidden_size": 32768, "num_heads": 4}}, "body.model.hidden_size", "16384"),
    ({"training": {"sequence_length": 65536}}, "body.training.sequence_length", "32768"),
    ({"steps": 25}, "body.steps", "20"),
    ({"parallelism": {"data_parallel": 16, "tensor_parallel": 4, "pipeline_parallel": 2}},
     "body.parallelism", "64"),
    ({"timeout_s": 7200.0}, "body.timeout_s", "3600"),
])
def test_job_specs_over_the_caps_are_refused_before_queueing(db_url, extra, field, cap):
    with client_for(db_url, job_timeout_cap_s=3600.0, max_steps=20) as client:
        r = client.post("/v1/validations", json=spec(**extra))
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["type"].endswith("/resource-cap")
        assert [p["name"] for p in body["invalid-params"]] == [field]
        assert cap in body["invalid-params"][0]["reason"]
        assert client.app.state.jobs.get().queue_depth()["queued"] == 0
    client.app.state.jobs.close()


def test_traced_jobs_have_their_own_caps_and_presets_are_resolved(db_url):
    big = {"model": {"num_layers": 200}}
    with client_for(db_url) as client:
        assert client.post("/v1/validations", json=spec(mode="traced", **big)).status_code == 202
        r = client.post("/v1/validations", json=spec(mode="traced", model={"num_layers": 600}))
        assert r.status_code == 422 and "512" in r.text
    with client_for(db_url, max_real_layers=4) as client:
        preset = {"model": {"preset": "gpt2"}, "device": "cpu", "steps": 3,
                  "training": {"sequence_length": 32}}
        r = client.post("/v1/validations", json=preset)
        assert r.status_code == 422, r.text
        assert r.json()["invalid-params"][0]["name"] == "body.model.preset"
        assert "12" in r.json()["invalid-params"][0]["reason"]
        unknown = {**preset, "model": {"preset": "no-such-model"}}
        assert client.post("/v1/validations", json=unknown).status_code == 422
    client.app.state.jobs.close()


def test_several_violations_are_all_named(db_url):
    with client_for(db_url, max_steps=10) as client:
        r = client.post("/v1/validations", json=spec(steps=30, model={"num_layers": 300}))
        assert r.status_code == 422
        names = {p["name"] for p in r.json()["invalid-params"]}
        assert names == {"body.steps", "body.model.num_layers"}
    client.app.state.jobs.close()
