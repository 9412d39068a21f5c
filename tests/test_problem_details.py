"""Every error is an RFC 9457 problem: application/problem+json with type, title, status and
detail, the offending fields for validation errors, and documented in the OpenAPI file."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

PROBLEM = "application/problem+json"
TINY = {"family": "gpt2", "num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = tmp_path_factory.mktemp("problems") / "jobs.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}"))

    @app.get("/test-only/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("a bug")

    yield app
    app.state.jobs.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    for key, kind in (("type", str), ("title", str), ("status", int), ("detail", str)):
        assert isinstance(body.get(key), kind), (key, body)
    assert body["status"] == status
    assert body["detail"]
    return body


def documented(app, path: str, method: str, status: int) -> None:
    responses = app.openapi()["paths"][path][method]["responses"]
    assert str(status) in responses, (path, method, status, sorted(responses))
    assert responses[str(status)]["content"] == {
        PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def test_request_validation_names_every_offending_field(client, app):
    r = client.post("/v1/memory", json={"model": {**TINY, "num_layers": 0, "vocab_size": -1},
                                        "training": {"micro_batch_size": "many"}})
    body = problem(r, 422)
    assert body["type"] == "https://memplan.dev/problems/validation"
    names = {p["name"] for p in body["invalid-params"]}
    assert names == {"body.model.num_layers", "body.model.vocab_size",
                     "body.training.micro_batch_size"}
    for p in body["invalid-params"]:
        assert p["name"] in body["detail"] and p["reason"]
    documented(app, "/v1/memory", "post", 422)


def test_missing_body_is_a_validation_problem(client):
    body = problem(client.post("/v1/zero"), 422)
    assert [p["name"] for p in body["invalid-params"]] == ["body"]


def test_cross_field_rule_is_a_validation_problem(client):
    r = client.post("/v1/memory", json={"model": {**TINY, "num_heads": 3}})
    body = problem(r, 422)
    assert body["invalid-params"][0]["name"] == "body.model"
    assert "divisible" in body["invalid-params"][0]["reason"]


def test_unknown_preset_lists_the_valid_names(client):
    body = problem(client.post("/v1/memory", json={"model": {"preset": "no-such-model"}}), 422)
    assert body["type"] == "https://memplan.dev/problems/unknown-name"
    assert body["invalid-params"][0]["name"] == "body.model.preset"
    assert "gpt2" in body["invalid-params"][0]["reason"]


def test_unplannable_setup_names_the_rule_and_field(client):
    # 'every-k' without every_k: a rule between fields the schema cannot state
    r = client.post("/v1/memory", json={"model": TINY, "training": {
        "activation_checkpointing": {"strategy": "every-k"}}})
    body = problem(r, 422)
    assert body["type"] == "https://memplan.dev/problems/unplannable"
    assert body["invalid-params"][0]["name"] == "body.training.activation_checkpointing.every_k"


def test_unknown_job_is_a_documented_404(client, app):
    problem(client.get("/v1/validations/not-a-job"), 404)
    problem(client.delete("/v1/validations/not-a-job"), 404)
    documented(app, "/v1/validations/{job_id}", "get", 404)
    documented(app, "/v1/validations/{job_id}", "delete", 404)


def test_cancelling_a_cancelled_job_is_a_documented_409(client, app):
    spec = {"model": {**TINY, "num_layers": 1}, "training": {"sequence_length": 8},
            "device": "cpu", "steps": 2}
    r = client.post("/v1/validations", json=spec)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert client.delete(f"/v1/validations/{job}").json()["status"] == "cancelled"
    body = problem(client.delete(f"/v1/validations/{job}"), 409)
    assert "cancelled" in body["detail"]
    documented(app, "/v1/validations/{job_id}", "delete", 409)


def test_bad_cursor_is_a_documented_422(client, app):
    body = problem(client.get("/v1/validations", params={"cursor": "garbage"}), 422)
    assert body["invalid-params"][0]["name"] == "query.cursor"
    documented(app, "/v1/validations", "get", 422)


def test_unparseable_body_is_a_documented_400(client, app):
    r = client.post("/v1/checkpointing", content=b"\x9eTXD", headers={
        "content-type": "application/json"})
    problem(r, 400)
    documented(app, "/v1/checkpointing", "post", 400)


def test_unknown_route_and_method(client):
    problem(client.get("/v1/nothing-here"), 404)
    problem(client.put("/v1/memory", json={}), 405)


def test_unhandled_exception_is_a_documented_500(client, app):
    body = problem(client.get("/test-only/boom"), 500)
    assert body["detail"] == "RuntimeError"  # the type only: no message, no traceback
    for item in app.openapi()["paths"].values():
        for op in item.values():
            assert "500" in op["responses"], op["operationId"]


def test_store_down_is_a_documented_503(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/not-a-dir/jobs.db"))
    with TestClient(app, raise_server_exceptions=False) as c:
        body = problem(c.get("/readyz"), 503)
        assert "job store" in body["detail"]
        r = c.get("/v1/validations")
        problem(r, 503)
        assert r.headers["retry-after"]
    documented(app, "/readyz", "get", 503)
    documented(app, "/v1/validations", "get", 503)


def test_problem_schema_requires_the_rfc_members(app):
    schema = app.openapi()["components"]["schemas"]["Problem"]
    assert set(schema["required"]) >= {"type", "title", "status", "detail"}
    assert "invalid-params" in schema["properties"]


def test_every_error_response_in_the_contract_is_a_problem(app):
    for path, item in app.openapi()["paths"].items():
        for method, op in item.items():
            for code, response in op["responses"].items():
                if code[0] in "45":
                    documented(app, path, method, int(code))
