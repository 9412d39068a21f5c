"""Every error is an RFC 9457 problem: application/problem+json with type, title, status and
detail, the offending fields for validation errors, and documented in the OpenAPI file."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from planner.catalog.specs import MemoryRequest
from service.app import create_app
from service.errors import PlanError
from service.settings import Settings

PROBLEM = "application/problem+json"
TINY = {"family": "gpt2", "num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}


class RuleRequest(MemoryRequest):
    """A setup and the message of a rule it breaks (for the test-only route)."""

    message: str


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = tmp_path_factory.mktemp("problems") / "jobs.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}"))

    @app.get("/test-only/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("a bug")

    @app.post("/test-only/rule", include_in_schema=False)
    def rule(request: RuleRequest) -> None:
        try:
            raise ValueError(request.message)
        except ValueError as exc:
            raise PlanError(str(exc)) from exc

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


# ---- every 422 names the field ----------------------------------------------------------------
# Rules the schema cannot state (checked by the planner, or by a validator over several fields):
# each body breaks one. (name, body) for the setup routes; /v1/validations adds the job fields.
SETUP_RULES = [
    ("offload_parameters without stage 3", {"parallelism": {"offload_parameters": True}}),
    ("offload_optimizer without ZeRO", {"parallelism": {"offload_optimizer": True}}),
    ("virtual stages without pipeline", {"parallelism": {"virtual_pipeline_stages": 2}}),
    ("sequence parallel without tensor", {"parallelism": {"sequence_parallel": True}}),
    ("tensor parallel not dividing heads", {"parallelism": {"tensor_parallel": 4}}),
    ("more stages than layers", {"parallelism": {"pipeline_parallel": 4}}),
    ("sequence over the position table", {"model": {**TINY, "max_sequence_length": 16},
                                          "training": {"sequence_length": 32}}),
    ("every-k without every_k", {"training": {"activation_checkpointing": {
        "strategy": "every-k"}}}),
    ("block beyond the layers", {"training": {"activation_checkpointing": {
        "strategy": "blocks", "blocks": [5]}}}),
    ("quantized gradients", {"training": {"precision": "mixed-bf16",
                                          "precision_overrides": {"gradients": "int8"}}}),
    ("bf16 gradients on fp32 parameters", {"training": {"precision_overrides": {
        "gradients": "bf16"}}}),
    ("lora base dtype against precision", {"training": {"precision": "bf16",
                                                        "lora": {"base_dtype": "fp32"}}}),
    ("budget without hardware", {"training": {"activation_checkpointing": {
        "strategy": "budget"}}}),
    ("budget on a bare parameter count", {"model": {"num_parameters": 1000}, "training": {
        "activation_checkpointing": {"strategy": "budget"}}}),
    ("no fused kernel for the optimizer", {"training": {"optimizer": "adafactor",
                                                        "optimizer_implementation": "fused"}}),
    ("megatron profile with every-k", {"training": {"implementation": "megatron",
                                                    "activation_checkpointing": {
                                                        "strategy": "every-k", "every_k": 1}}}),
    ("hidden size not divisible by heads", {"model": {**TINY, "num_heads": 3}}),
    ("two model forms", {"model": {**TINY, "preset": "gpt2"}}),
]
JOB = {"device": "cpu", "mode": "traced", "steps": 2}
OTHER_RULES = [
    ("/v1/checkpointing", "nothing to place", {}),
    ("/v1/checkpointing", "revolve without slots", {"strategy": "revolve", "num_steps": 3}),
    ("/v1/checkpointing", "a setup without a model", {"training": {}}),
    ("/v1/pipeline", "costs and a setup", {"costs": {}, "setup": {"model": TINY},
                                           "stages": 2, "microbatches": 2}),
    ("/v1/pipeline", "no stages without a setup", {}),
    ("/v1/pipeline", "odd dualpipe", {"stages": 3, "microbatches": 2, "schedule": "dualpipe"}),
    ("/v1/pipeline", "too many cost entries", {"stages": 2, "microbatches": 2,
                                               "costs": {"forward_s": [1, 2, 3]}}),
]
SWEEP = ([(route, name, {"model": TINY, **body} | (JOB if route == "/v1/validations" else {}))
          for route in ("/v1/memory", "/v1/zero", "/v1/checkpointing", "/v1/validations")
          for name, body in SETUP_RULES]
         + [("/v1/pipeline", name, {"setup": {"model": TINY, **body,
                                              "hardware": {"gpu": "h100-80gb"}},
                                    "stages": 2, "microbatches": 4})
            for name, body in SETUP_RULES if "model" in body]
         + OTHER_RULES)


@pytest.mark.parametrize("route,name,body", SWEEP, ids=[f"{r}-{n}" for r, n, _ in SWEEP])
def test_every_422_names_a_body_field(client, route, name, body):
    r = client.post(route, json=body)
    if r.status_code != 422:  # a route that plans this setup is fine; it must not be a 5xx
        assert r.status_code < 500, r.text
        return
    params = problem(r, 422).get("invalid-params")
    assert params, (route, name, r.json())
    for p in params:
        assert p["name"].startswith("body."), (route, name, p)
        assert p["reason"]


@pytest.mark.parametrize("route", ["/v1/zero", "/v1/validations"])
def test_planner_rules_name_their_field_on_every_setup_route(client, route):
    extra = JOB if route == "/v1/validations" else {}
    cases = [({"parallelism": {"tensor_parallel": 4}}, "body.parallelism.tensor_parallel"),
             ({"parallelism": {"sequence_parallel": True}}, "body.parallelism.sequence_parallel"),
             ({"training": {"activation_checkpointing": {"strategy": "every-k"}}},
              "body.training.activation_checkpointing.every_k"),
             ({"model": {**TINY, "max_sequence_length": 16}, "training": {"sequence_length": 32}},
              "body.training.sequence_length")]
    for body, field in cases:
        params = problem(client.post(route, json={"model": TINY, **body, **extra}), 422)[
            "invalid-params"]
        assert field in [p["name"] for p in params], (route, body, params)


def test_a_rule_over_top_level_fields_names_them(client):
    body = problem(client.post("/v1/pipeline", json={
        "costs": {}, "setup": {"model": TINY}, "stages": 2, "microbatches": 2}), 422)
    assert [p["name"] for p in body["invalid-params"]] == ["body.costs", "body.setup"]
    body = problem(client.post("/v1/checkpointing", json={
        "strategy": "revolve", "num_steps": 3}), 422)
    assert {"body.num_steps", "body.slots"} <= {p["name"] for p in body["invalid-params"]}


def test_a_fieldless_rule_is_named_from_its_message(client):
    # A planner ValueError with no field, as the routes wrap it (see the test-only route).
    body = problem(client.post("/test-only/rule", json={"model": TINY, "message": (
        "pipeline_parallel (4) exceeds num_layers (2)")}), 422)
    assert [p["name"] for p in body["invalid-params"]] == [
        "body.parallelism.pipeline_parallel", "body.model.num_layers"]
    body = problem(client.post("/test-only/rule", json={"model": TINY, "message": (
        "torch.optim has no fused implementation of 'adafactor'")}), 422)
    assert [p["name"] for p in body["invalid-params"]] == ["body.training.optimizer"]


# ---- 405: every method of the path -------------------------------------------------------------
def test_405_allows_every_method_of_the_path(client, app):
    for path, item in app.openapi()["paths"].items():
        methods = {m.upper() for m in item}
        url = path.replace("{job_id}", "some-job")
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - methods:
            r = client.request(method, url)
            body = problem(r, 405)
            assert set(r.headers["allow"].split(", ")) == methods, (method, path, r.headers)
            assert method in body["detail"]
    r = client.put("/v1/validations/some-job")
    assert r.headers["allow"] == "GET, DELETE"


# ---- duplicate JSON keys -------------------------------------------------------------------------
def test_duplicate_json_keys_are_refused_naming_the_key(client, app):
    raw = (b'{"model": {"preset": "gpt2", "preset": "gpt2-xl"}, '
           b'"training": {"sequence_length": 8, "sequence_length": 16}}')
    posts = [p for p, item in app.openapi()["paths"].items() if "post" in item]
    assert {"/v1/memory", "/v1/zero", "/v1/validations", "/v1/pipeline",
            "/v1/checkpointing"} <= set(posts)
    for path in posts:
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        body = problem(r, 422)
        names = [p["name"] for p in body["invalid-params"]]
        assert sorted(names) == ["body.model.preset", "body.training.sequence_length"], (path, body)
        assert "duplicate" in body["detail"]
    r = client.post("/v1/checkpointing", content=b'{"chain": [{"saved_bytes": 1, "saved_bytes": 2}]}',
                    headers={"content-type": "application/json"})
    assert [p["name"] for p in problem(r, 422)["invalid-params"]] == ["body.chain.0.saved_bytes"]


def test_loads_unique_parses_once_and_keeps_valid_documents():
    from service.errors import DuplicateKeys, loads_unique

    assert loads_unique(b'{"a": [{"b": 1}, {"b": 2}], "c": {"a": 1}}') == {
        "a": [{"b": 1}, {"b": 2}], "c": {"a": 1}}
    with pytest.raises(DuplicateKeys) as err:
        loads_unique('{"a": {"x": 1, "y": 2, "x": 3}, "b": [0, {"z": 1, "z": 1}]}')
    assert sorted(err.value.names) == ["body.a.x", "body.b.1.z"]
