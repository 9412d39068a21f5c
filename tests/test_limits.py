"""Documented maxima: every numeric input has one, the API enforces it with a 422 that names the
field and the limit, and the largest allowed inputs give finite, exact answers (bytes as ints)."""

from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient

from planner.catalog import specs
from service.app import create_app
from service.settings import Settings

TINY = {"family": "gpt2", "num_layers": 2, "hidden_size": 32, "num_heads": 2, "vocab_size": 64}
LARGEST = {"family": "llama", "num_layers": specs.MAX_LAYERS, "hidden_size": specs.MAX_HIDDEN,
           "num_heads": specs.MAX_HEADS, "num_kv_heads": specs.MAX_HEADS,
           "ffn_hidden_size": 4 * specs.MAX_HIDDEN, "vocab_size": specs.MAX_VOCAB,
           "max_sequence_length": specs.MAX_SEQUENCE}
LARGEST_TRAINING = {"micro_batch_size": specs.MAX_BATCH, "sequence_length": specs.MAX_SEQUENCE,
                    "gradient_accumulation_steps": specs.MAX_MICROBATCHES, "precision": "fp32"}
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "temporaries")


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(database_url="sqlite://"))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


# ---- every numeric input is bounded, in the contract -------------------------------------------
def _numeric_fields(doc: dict) -> list[tuple[str, dict]]:
    """(where, schema) of every integer/number input: request bodies (followed through $refs)
    and parameters."""
    schemas = doc["components"]["schemas"]
    out: list[tuple[str, dict]] = []
    seen: set[str] = set()

    def walk(schema: dict, where: str) -> None:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                walk(schemas[name], name)
            return
        if schema.get("type") in ("integer", "number"):
            out.append((where, schema))
        for key in ("anyOf", "oneOf", "allOf"):
            for i, sub in enumerate(schema.get(key, [])):
                walk(sub, where)
        if "items" in schema:
            walk(schema["items"], where + "[]")
        for name, sub in schema.get("properties", {}).items():
            walk(sub, f"{where}.{name}")

    for path, item in doc["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                walk(body["schema"], f"{method} {path}")
            for param in op.get("parameters", []):
                walk(param["schema"], f"{method} {path} {param['name']}")
    return out


def test_every_numeric_input_documents_a_maximum(app):
    fields = _numeric_fields(app.openapi())
    assert len(fields) > 40
    unbounded = [where for where, s in fields if "maximum" not in s and "exclusiveMaximum" not in s
                 and not (s.get("type") == "integer" and "enum" in s)]
    assert unbounded == []


def test_documented_maxima_are_the_constants(app):
    props = app.openapi()["components"]["schemas"]
    model = props["ModelSpec"]["properties"]

    def maximum(p: dict) -> int:
        return next(s["maximum"] for s in p.get("anyOf", [p]) if "maximum" in s)

    assert maximum(model["num_layers"]) == specs.MAX_LAYERS
    assert maximum(model["hidden_size"]) == specs.MAX_HIDDEN
    assert maximum(model["num_heads"]) == specs.MAX_HEADS
    assert maximum(model["vocab_size"]) == specs.MAX_VOCAB
    assert maximum(model["max_sequence_length"]) == specs.MAX_SEQUENCE
    assert maximum(model["num_parameters"]) == specs.MAX_PARAMETERS
    training = props["TrainingSpec"]["properties"]
    assert maximum(training["micro_batch_size"]) == specs.MAX_BATCH
    assert maximum(training["sequence_length"]) == specs.MAX_SEQUENCE
    assert maximum(training["gradient_accumulation_steps"]) == specs.MAX_MICROBATCHES
    assert maximum(props["ParallelSpec"]["properties"]["data_parallel"]) == specs.MAX_RANKS


# ---- enforced with a 422 naming the field and the limit ----------------------------------------
OVER = [
    ("/v1/memory", "model.num_layers", specs.MAX_LAYERS),
    ("/v1/memory", "model.hidden_size", specs.MAX_HIDDEN),
    ("/v1/memory", "model.num_heads", specs.MAX_HEADS),
    ("/v1/memory", "model.num_kv_heads", specs.MAX_HEADS),
    ("/v1/memory", "model.vocab_size", specs.MAX_VOCAB),
    ("/v1/memory", "model.max_sequence_length", specs.MAX_SEQUENCE),
    ("/v1/memory", "training.sequence_length", specs.MAX_SEQUENCE),
    ("/v1/memory", "training.micro_batch_size", specs.MAX_BATCH),
    ("/v1/memory", "training.gradient_accumulation_steps", specs.MAX_MICROBATCHES),
    ("/v1/zero", "parallelism.data_parallel", specs.MAX_RANKS),
    ("/v1/zero", "parallelism.tensor_parallel", specs.MAX_HEADS),
    ("/v1/zero", "parallelism.pipeline_parallel", specs.MAX_LAYERS),
    ("/v1/validations", "training.micro_batch_size", specs.MAX_BATCH),
]


def _put(body: dict, dotted: str, value) -> dict:
    body = json.loads(json.dumps(body))
    node = body
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return body


@pytest.mark.parametrize("path,field,limit", OVER, ids=[f"{p} {f}" for p, f, _ in OVER])
def test_over_the_maximum_is_a_422_naming_field_and_limit(client, path, field, limit):
    r = client.post(path, json=_put({"model": TINY}, field, limit + 1))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    params = r.json()["invalid-params"]
    assert [p["name"] for p in params] == [f"body.{field}"]
    assert str(limit) in params[0]["reason"]


def test_parameter_count_over_the_maximum(client):
    r = client.post("/v1/memory", json={"model": {"num_parameters": specs.MAX_PARAMETERS + 1}})
    assert r.status_code == 422
    (param,) = r.json()["invalid-params"]
    assert param["name"] == "body.model.num_parameters"
    assert str(specs.MAX_PARAMETERS) in param["reason"]


def test_pipeline_limits(client):
    from planner.routes.pipeline import MAX_MICROBATCHES, MAX_STAGES

    for field, limit in (("stages", MAX_STAGES), ("microbatches", MAX_MICROBATCHES)):
        body = _put({"stages": 2, "microbatches": 2}, field, limit + 1)
        r = client.post("/v1/pipeline", json=body)
        assert r.status_code == 422
        assert r.json()["invalid-params"][0]["name"] == f"body.{field}"
        assert str(limit) in r.json()["invalid-params"][0]["reason"]


# ---- the largest allowed inputs: finite, exact -------------------------------------------------
def _exact(breakdown: dict) -> None:
    for key in (*CATEGORIES, "total"):
        assert type(breakdown[key]) is int and breakdown[key] >= 0, (key, breakdown[key])
    assert breakdown["total"] == sum(breakdown[k] for k in CATEGORIES)


def _finite(obj) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _finite(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite(v)


@pytest.mark.parametrize("implementation", ["reference", "megatron"])
def test_largest_architecture_is_exact(client, implementation):
    body = {"model": LARGEST, "training": {**LARGEST_TRAINING, "implementation": implementation},
            "hardware": {"memory_bytes": 2**50}}
    r = client.post("/v1/memory", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    _finite(out)
    _exact(out["breakdown"])
    assert out["breakdown"]["total"] > 2**64  # past float's exact range, still exact
    fit = out["fit"]
    assert fit["fits"] is False and fit["max_micro_batch_size"] is None
    assert fit["headroom_bytes"] == 2**50 - out["breakdown"]["total"] - \
        out["allocator_reserve_bytes"]
    # fp32: at least 4 bytes per parameter (plus buffers), counted exactly.
    assert out["breakdown"]["parameters"] >= 4 * out["model"]["num_parameters"]


def test_largest_parameter_count_is_exact(client):
    body = {"model": {"num_parameters": specs.MAX_PARAMETERS},
            "training": {"precision": "fp32", "optimizer": "adam"}}
    out = client.post("/v1/memory", json=body).json()
    _exact(out["breakdown"])
    assert out["breakdown"]["parameters"] == 4 * specs.MAX_PARAMETERS
    assert out["breakdown"]["optimizer_states"] >= 8 * specs.MAX_PARAMETERS
    zero = client.post("/v1/zero", json={**body, "parallelism": {"data_parallel": 4096}})
    assert zero.status_code == 200, zero.text
    for stage in zero.json()["stages"]:
        _exact(stage["breakdown"])
        assert type(stage["communication_bytes_per_step"]) is int


def test_largest_pipeline_is_finite(client):
    from planner.routes.pipeline import MAX_COST_S

    body = {"stages": 1024, "microbatches": 1024, "include_timeline": False,
            "costs": {"forward_s": MAX_COST_S, "backward_input_s": MAX_COST_S,
                      "backward_weight_s": MAX_COST_S, "p2p_latency_s": 10.0,
                      "p2p_bandwidth_bytes_per_s": 1, "activation_message_bytes": 2**40}}
    r = client.post("/v1/pipeline", json=body)
    assert r.status_code == 200, r.text
    _finite(r.json())
    assert r.json()["p2p_message_s"] == 2**40 + 10


def test_checkpoint_block_indices_are_bounded(client):
    """Finding: CheckpointRequest.blocks took any integer, documented without a maximum."""
    from planner.routes.checkpoint_solvers import MAX_CHAIN_BLOCKS

    r = client.post("/v1/checkpointing", json={"model": TINY, "strategy": "blocks",
                                               "blocks": [MAX_CHAIN_BLOCKS]})
    assert r.status_code == 422
    (param,) = r.json()["invalid-params"]
    assert param["name"] == "body.blocks.0" and str(MAX_CHAIN_BLOCKS) in param["reason"]
