"""The API holds its OpenAPI contract under generated input (Schemathesis, in process).

Every operation in the schema is called with schema-valid (positive) and schema-violating
(negative) requests, at least ``MEMPLAN_FUZZ_EXAMPLES`` (default 200) per operation, and every
answer must:

- never be a 5xx;
- use a status code the operation documents, with a documented media type;
- match the documented response schema (headers included).

Two Schemathesis checks are left out on purpose. ``positive_data_acceptance``: some rules span
several fields (exactly one model form, hidden_size divisible by num_heads, pipeline stages
dividing the layers) and are not expressible in JSON Schema; they are answered with a 422 problem
that names the rule. ``negative_data_rejection``: pydantic's lax mode accepts JSON ``0``/``1`` for
booleans and numeric strings for numbers, which is deliberate leniency, not a contract breach.

Generated model specifications are steered towards valid forms (a preset, a parameter count or
a consistent architecture) half of the time, so the planners are exercised, not only the
validator; the layer count of those is capped (``MEMPLAN_FUZZ_MAX_LAYERS``, default 8) because the
step simulator's cost grows with it. ``benchmarks/contract_fuzz.py`` runs the same test longer.

Each finding of this test has a regression test at the end of the file.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.generation import GenerationMode

from planner.catalog.presets import model_presets
from planner.catalog.specs import MAX_HEADS, MAX_HIDDEN, MAX_PARAMETERS, MAX_SEQUENCE, MAX_VOCAB
from service.app import create_app
from service.settings import Settings

EXAMPLES = int(os.environ.get("MEMPLAN_FUZZ_EXAMPLES", "200"))
MAX_FUZZ_LAYERS = int(os.environ.get("MEMPLAN_FUZZ_MAX_LAYERS", "8"))

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


# ---- steering generated bodies towards plannable setups -----------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def architectures(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.integers(1, MAX_HEADS))
    model: dict[str, Any] = {
        "family": draw(st.sampled_from(["gpt2", "llama"])),
        "num_layers": draw(st.integers(1, MAX_FUZZ_LAYERS)),
        "num_heads": heads,
        "hidden_size": heads * draw(st.integers(1, MAX_HIDDEN // heads)),
        "vocab_size": draw(st.integers(1, MAX_VOCAB)),
    }
    optional = {
        "num_kv_heads": st.sampled_from(_divisors(heads)),
        "ffn_hidden_size": st.integers(1, 4 * MAX_HIDDEN),
        "max_sequence_length": st.integers(1, MAX_SEQUENCE),
        "tie_embeddings": st.booleans(),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            model[name] = draw(strategy)
    return model


def model_forms() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.sampled_from(sorted(model_presets())).map(lambda name: {"preset": name}),
        st.integers(1, MAX_PARAMETERS).map(lambda n: {"num_parameters": n}),
        architectures(),
    )


def _cap_layers(body: Any) -> Any:
    """The generated model keeps its form but at most MAX_FUZZ_LAYERS blocks (cost per example)."""
    if isinstance(body, dict):
        model = body.get("model")
        if isinstance(model, dict) and isinstance(model.get("num_layers"), int) \
                and not isinstance(model.get("num_layers"), bool):
            body = {**body, "model": {**model, "num_layers": min(model["num_layers"],
                                                                  MAX_FUZZ_LAYERS)}}
    return body


def steer(body: Any) -> st.SearchStrategy[Any]:
    """Keep the generated body, or replace its model (or the pipeline setup's) by a valid form."""
    body = _cap_layers(body)
    if not isinstance(body, dict):
        return st.just(body)
    if isinstance(body.get("model"), dict):
        return st.one_of(st.just(body), model_forms().map(lambda m: {**body, "model": m}))
    setup = body.get("setup")
    if isinstance(setup, dict) and isinstance(setup.get("model"), dict):
        setup = _cap_layers(setup)
        return st.one_of(st.just({**body, "setup": setup}), model_forms().map(
            lambda m: {**{k: v for k, v in body.items() if k != "costs"},
                       "setup": {**setup, "model": m}}))
    return st.just(body)


# ---- the schema under test ---------------------------------------------------------------------
# The real app on a temporary SQLite job store; POST /v1/validations really queues (no worker runs,
# so the jobs stay queued). Schemathesis parametrizes at collection, so the app is built here.
_DB_DIR = tempfile.TemporaryDirectory(prefix="memplan-contract-")
APP = create_app(Settings(database_url=f"sqlite:///{_DB_DIR.name}/jobs.db"))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.hook("flatmap_body")
def _steer(context, body):
    return steer(body)


@pytest.fixture(scope="module", autouse=True)
def _close_store():
    yield
    APP.state.jobs.close()


# One test per operation, with the operation in its node id (tests/conftest.py sees to that).
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large])
def test_every_operation_holds_the_contract(case):
    case.call_and_validate(checks=CHECKS)


# ---- regression tests, one per finding ---------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with TestClient(APP, raise_server_exceptions=False) as c:
        yield c


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    return body


@pytest.mark.parametrize("path", ["/v1/memory", "/v1/zero", "/v1/checkpointing", "/v1/pipeline",
                                  "/v1/validations"])
def test_unparseable_body_is_a_documented_400(client, path):
    """Finding: a body that is not UTF-8 JSON got a 400 that no operation documented."""
    r = client.post(path, content=b"\x9eTXD", headers={"content-type": "application/json"})
    _problem(r, 400)
    assert "400" in APP.openapi()["paths"][path]["post"]["responses"]


def test_tiny_link_bandwidth_cannot_make_the_message_time_infinite(client):
    """Finding: p2p_bandwidth_bytes_per_s=5e-324 with a 1 TiB message made p2p_message_s infinite,
    sent as JSON null against a number schema. The bandwidth is now at least 1 byte/s."""
    costs = {"activation_message_bytes": 2**40, "p2p_bandwidth_bytes_per_s": 5e-324}
    r = client.post("/v1/pipeline", json={"stages": 1, "microbatches": 1, "costs": costs})
    body = _problem(r, 422)
    assert body["invalid-params"][0]["name"] == "body.costs.p2p_bandwidth_bytes_per_s"
    r = client.post("/v1/pipeline", json={"stages": 2, "microbatches": 2, "costs": {
        **costs, "p2p_bandwidth_bytes_per_s": 1, "p2p_latency_s": 10}})
    assert r.status_code == 200, r.text
    assert r.json()["p2p_message_s"] == 2**40 + 10


def test_request_validation_errors_are_documented_as_problems():
    """Finding: FastAPI documented its own HTTPValidationError for 422s and Problem bodies under
    application/json, while the handlers send application/problem+json."""
    doc = APP.openapi()
    for path, item in doc["paths"].items():
        for op in item.values():
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (path, code)
                    assert response["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]


@pytest.mark.parametrize("path", ["/v1/memory", "/v1/zero", "/v1/checkpointing", "/v1/pipeline",
                                  "/v1/validations"])
def test_oversized_body_is_a_documented_413(client, path):
    """Finding: a 1 MB generated chain got the body-size limit's 413, which only POST
    /v1/validations documented."""
    limit = APP.state.settings.max_body_bytes
    r = client.post(path, content=b"[" + b"0," * (limit // 2) + b"0]",
                    headers={"content-type": "application/json"})
    _problem(r, 413)
    assert "413" in APP.openapi()["paths"][path]["post"]["responses"]
