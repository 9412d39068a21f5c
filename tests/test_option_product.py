"""No server error from any combination of training and parallelism options.

A property test over the product of every option an estimate route takes (optimizer x kernel x
precision x checkpointing x LoRA x loss x ZeRO x tensor/pipeline/schedule x offload, with a small model
of either family, a preset or a bare parameter count): each answer on each estimate route is a
200, or a 422 problem whose ``invalid-params`` names the input at fault. Two such combinations
were 500s: a pipelined setup with ``adagrad`` (the optimizer's states, made in its constructor,
were counted before the rank's parameters were known), and ``optimizer_implementation: fused``
with an optimizer torch has no fused kernel for.
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.catalog import specs as S
from service.app import create_app
from service.settings import Settings

_DB = tempfile.TemporaryDirectory(prefix="memplan-options-")
APP = create_app(Settings(database_url=f"sqlite:///{_DB.name}/jobs.db"))


@pytest.fixture(scope="module")
def client():
    with TestClient(APP, raise_server_exceptions=False) as c:
        yield c
    APP.state.jobs.close()


def _literal(t) -> list:
    return list(t.__args__)


def _rarely() -> st.SearchStrategy[bool]:
    """True one time in four: options that many layouts refuse, so most setups get planned."""
    return st.sampled_from([False, False, False, True])


@st.composite
def models(draw: st.DrawFn) -> dict[str, Any]:
    form = draw(st.sampled_from(["arch", "arch", "arch", "preset", "count"]))
    if form == "preset":
        return {"preset": "gpt2"}
    if form == "count":
        return {"num_parameters": draw(st.integers(1, 10**9))}
    heads = draw(st.sampled_from([2, 4]))
    family = draw(st.sampled_from(_literal(S.Family)))
    m = {"family": family, "num_layers": draw(st.integers(1, 6)), "hidden_size": 16 * heads,
         "num_heads": heads, "vocab_size": draw(st.sampled_from([64, 100])),
         "max_sequence_length": 64}
    if family == "llama" and draw(st.booleans()):
        m["num_kv_heads"] = draw(st.sampled_from([1, heads]))
    return m


@st.composite
def checkpointing(draw: st.DrawFn) -> dict[str, Any]:
    strategy = draw(st.sampled_from(_literal(S.CheckpointStrategy)))
    ck: dict[str, Any] = {"strategy": strategy}
    if strategy == "every-k":
        ck["every_k"] = draw(st.integers(1, 4))
    if strategy == "budget" and draw(st.booleans()):
        ck["budget_bytes"] = draw(st.integers(2**20, 2**36))
    if strategy == "blocks":
        ck["blocks"] = draw(st.lists(st.integers(0, 5), unique=True, max_size=3))
    return ck


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    training: dict[str, Any] = {
        "precision": draw(st.sampled_from(_literal(S.Precision))),
        "optimizer": draw(st.sampled_from(_literal(S.OptimizerName))),
        "optimizer_implementation": draw(st.sampled_from(["foreach", "foreach", "fused", "for-loop"])),
        "micro_batch_size": draw(st.integers(1, 3)),
        "sequence_length": draw(st.sampled_from([8, 16, 64])),
        "gradient_accumulation_steps": draw(st.integers(1, 4)),
        "activation_checkpointing": draw(checkpointing()),
        "attention": draw(st.sampled_from(_literal(S.Attention))),
        "implementation": draw(st.sampled_from(_literal(S.Implementation))),
        "dropout": draw(st.sampled_from([0.0, 0.1])),
    }
    if training["optimizer"] == "rmsprop":
        training["rmsprop_centered"] = draw(st.booleans())
        training["rmsprop_momentum"] = draw(st.booleans())
    if draw(st.booleans()):
        training["lora"] = {"rank": draw(st.sampled_from([1, 4])),
                            "base_dtype": draw(st.sampled_from([None, *_literal(S.DType)])),
                            "target_modules": draw(st.lists(st.sampled_from(
                                ["q", "k", "v", "o", "up", "gate", "down"]), min_size=1,
                                max_size=3, unique=True))}
    if draw(_rarely()):
        training["loss"] = {"kind": draw(st.sampled_from(["chunked", "chunked-linear"])),
                            "chunks": draw(st.integers(1, 5))}
    if draw(st.integers(0, 4)) == 0:
        training["precision_overrides"] = {"gradients": draw(st.sampled_from(["fp32", "bf16"]))}
    pp = draw(st.sampled_from([1, 1, 2, 3]))
    parallelism = {
        "data_parallel": draw(st.sampled_from([1, 2, 4])),
        "tensor_parallel": draw(st.sampled_from([1, 1, 2])),
        "pipeline_parallel": pp,
        "virtual_pipeline_stages": draw(st.sampled_from([1, 2])) if pp > 1 else 1,
        "pipeline_schedule": draw(st.sampled_from(_literal(S.PipelineScheduleName))),
        "sequence_parallel": draw(_rarely()),
        "zero_stage": draw(st.sampled_from([0, 1, 2, 3])),
        "offload_optimizer": draw(_rarely()),
        "offload_parameters": draw(_rarely()),
        "fsdp_mixed_precision": draw(_rarely()),
    }
    body = {"model": draw(models()), "training": training, "parallelism": parallelism}
    if draw(st.booleans()):
        body["hardware"] = {"gpu": draw(st.sampled_from(["h100-80gb", "a100-40gb"]))}
    return body


def _check(r, route: str, body: dict) -> None:
    assert r.status_code in (200, 422), (route, r.status_code, r.text, body)
    if r.status_code == 422:
        problem = r.json()
        assert r.headers["content-type"] == "application/problem+json"
        assert problem["detail"], (route, body)
        assert problem.get("invalid-params"), (route, problem, body)
        assert all(p["name"].startswith("body") for p in problem["invalid-params"]), problem


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=setups())
def test_every_combination_is_answered_or_refused_by_rule(client, body) -> None:
    _check(client.post("/v1/memory", json=body), "/v1/memory", body)
    _check(client.post("/v1/zero", json=body), "/v1/zero", body)
    _check(client.post("/v1/checkpointing", json=body), "/v1/checkpointing", body)
    if "hardware" in body:
        _check(client.post("/v1/pipeline", json={"setup": body, "include_timeline": False}),
               "/v1/pipeline", body)


@pytest.mark.parametrize("training,parallelism,status", [
    ({"optimizer": "adagrad", "gradient_accumulation_steps": 4}, {"pipeline_parallel": 2}, 200),
    ({"optimizer": "adagrad", "precision": "amp-bf16", "gradient_accumulation_steps": 4},
     {"pipeline_parallel": 2, "pipeline_schedule": "gpipe"}, 200),
    ({"optimizer": "rmsprop", "optimizer_implementation": "fused"}, {}, 422),
    ({"optimizer": "adadelta", "optimizer_implementation": "fused"}, {"data_parallel": 2}, 422),
])
def test_the_server_errors_found(client, training, parallelism, status) -> None:
    body = {"model": {"preset": "gpt2"},
            "training": {"micro_batch_size": 1, "sequence_length": 128, **training},
            "parallelism": parallelism}
    r = client.post("/v1/memory", json=body)
    assert r.status_code == status, r.text
    if status == 422:
        assert r.json()["invalid-params"][0]["name"] == "body.training.optimizer_implementation"


@pytest.mark.parametrize("path", ["/v1/memory", "/v1/zero", "/v1/checkpointing"])
def test_lora_on_a_projection_the_family_lacks(client, path) -> None:
    """A gpt2 block has no gate projection: LoRA on it alone trained nothing, and the replay's
    backward found no graph (a 500). Refused naming the field, on every estimate route."""
    body = {"model": {"preset": "gpt2"},
            "training": {"micro_batch_size": 1, "sequence_length": 64,
                         "lora": {"target_modules": ["gate"]}}}
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.training.lora.target_modules"
