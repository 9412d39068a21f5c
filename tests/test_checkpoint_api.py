"""POST /v1/checkpointing."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app()) as c:
        yield c


SETUP = {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 8, "sequence_length": 1024}}


def post(client, body):
    return client.post("/v1/checkpointing", json=body)


@pytest.mark.parametrize("l,c,steps", [(10, 2, 20), (10, 3, 15), (16, 2, 45)])
def test_revolve_public_checks(client, l, c, steps):
    r = post(client, {"strategy": "revolve", "num_steps": l, "slots": c})
    assert r.status_code == 200, r.text
    assert r.json()["recompute_forward_steps"] == steps


@pytest.mark.parametrize("strategy,expected", [
    ("none", []), ("full", list(range(12))), ("every-k", [0, 4, 8]),
    ("sqrt", [0, 1, 3, 4, 6, 7, 9, 10]),  # k = round(sqrt(12)) = 3: every 3rd block kept whole
])
def test_named_strategies(client, strategy, expected):
    r = post(client, {**SETUP, "strategy": strategy, "every_k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["checkpointed_blocks"] == expected
    assert body["plan"] == {"strategy": "blocks", "every_k": None, "budget_bytes": None,
                            "blocks": expected}
    assert body["num_blocks"] == 12
    assert body["total_peak_bytes"] > body["activation_peak_bytes"] > 0
    assert body["breakdown"]["total"] == body["total_peak_bytes"]
    assert (body["recompute_time_fraction"] == 0) == (expected == [])


def test_full_recomputes_every_block_forward(client):
    body = post(client, {**SETUP, "strategy": "full"}).json()
    # backward = 2x forward: one extra forward of every block over 3x (blocks + loss head)
    blocks = 12 * body["block_forward_flops"]
    head = 2 * 8 * 1024 * 768 * 50257
    assert body["recompute_forward_flops"] == blocks
    assert body["recompute_time_fraction"] == pytest.approx(blocks / (3 * (blocks + head)))
    assert body["recompute_time_s"] / body["step_time_s"] == pytest.approx(
        body["recompute_time_fraction"])


def test_budget_between_none_and_full(client):
    none = post(client, {**SETUP, "strategy": "none"}).json()
    full = post(client, {**SETUP, "strategy": "full"}).json()
    # between what each must hold: its peak plus the (simulated) allocator reserve
    budget = sum(r["total_peak_bytes"] + r["allocator_reserve_bytes"] for r in (none, full)) // 2
    body = post(client, {**SETUP, "strategy": "budget", "budget_bytes": budget}).json()
    assert body["fits"] and body["exact"]
    assert body["total_peak_bytes"] + body["allocator_reserve_bytes"] <= budget
    assert 0 < len(body["checkpointed_blocks"]) < 12
    assert 0 < body["recompute_time_fraction"] < full["recompute_time_fraction"]
    assert body["plan"]["strategy"] == "budget" and body["plan"]["budget_bytes"] == budget
    assert body["plan"]["blocks"] == body["checkpointed_blocks"]


def test_budget_from_training_spec_and_gpu(client):
    body = post(client, {"model": {"preset": "gpt2"}, "hardware": {"gpu": "l4-24gb"},
                         "training": {"micro_batch_size": 24, "sequence_length": 1024,
                                      "activation_checkpointing": {"strategy": "budget"}}}).json()
    assert body["strategy"] == "budget" and body["budget_bytes"] == 25769803776
    assert 0 < len(body["checkpointed_blocks"]) <= 12  # without any: 25.5 GiB reserved
    assert body["fits"]
    assert body["total_peak_bytes"] + body["allocator_reserve_bytes"] <= body["budget_bytes"]


def test_budget_that_cannot_fit_says_smallest_peak(client):
    body = post(client, {**SETUP, "strategy": "budget", "budget_bytes": 10**6}).json()
    assert body["fits"] is False
    full = post(client, {**SETUP, "strategy": "full"}).json()
    assert body["min_achievable_peak_bytes"] == full["total_peak_bytes"]
    assert body["checkpointed_blocks"] == list(range(12))
    assert body["notes"]


def test_explicit_blocks(client):
    body = post(client, {**SETUP, "strategy": "blocks", "blocks": [5, 2]}).json()
    assert body["checkpointed_blocks"] == [2, 5] and body["segments"] == [[2, 2], [5, 5]]
    r = post(client, {**SETUP, "strategy": "blocks", "blocks": [12]})
    assert r.status_code == 422 and r.json()["invalid-params"][0]["name"] == "body.blocks"


def test_explicit_chain(client):
    chain = [{"forward_s": 1.0, "backward_s": 2.0, "saved_bytes": 100, "input_bytes": 10,
              "transient_bytes": 5, "forward_flops": 1000}] * 4
    body = post(client, {"chain": chain, "budget_bytes": 250}).json()
    assert body["strategy"] == "budget" and body["fits"] and body["exact"]
    assert body["total_peak_bytes"] <= 250
    assert body["recompute_forward_flops"] == 1000 * len(body["checkpointed_blocks"])
    assert body["segments"]


def test_explicit_chain_plan_applies_to_the_reference_step(client):
    chain = [{"forward_s": 1.0, "saved_bytes": 100, "input_bytes": 10}] * 3
    body = post(client, {"chain": chain, "strategy": "full"}).json()
    assert body["plan"]["strategy"] == "blocks" and body["plan"]["blocks"] == [0, 1, 2]


def test_selective_recomputes_core_attention(client):
    eager = {**SETUP, "training": {**SETUP["training"], "attention": "eager",
                                   "implementation": "megatron"}}
    sel = post(client, {**eager, "strategy": "selective"}).json()
    none = post(client, {**eager, "strategy": "none"}).json()
    assert sel["core_attention_blocks"] == list(range(12)) and sel["checkpointed_blocks"] == []
    assert sel["activation_peak_bytes"] < none["activation_peak_bytes"]
    assert sel["recompute_forward_flops"] == 12 * 4 * 8 * 1024 * 1024 * 768
    # the reference step checkpoints each block's core attention (torch.utils.checkpoint around
    # softmax(qk^T)v): same plan, its peak from the step simulator, as /v1/memory gives it
    ref = {**SETUP, "training": {**SETUP["training"], "attention": "eager"}}
    r = post(client, {**ref, "strategy": "selective"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["core_attention_blocks"] == list(range(12)) and body["checkpointed_blocks"] == []
    mem = client.post("/v1/memory", json={**ref, "training": {
        **ref["training"], "activation_checkpointing": {"strategy": "selective"}}}).json()
    assert body["total_peak_bytes"] == mem["breakdown"]["total"]
    assert body["plan"]["strategy"] == "selective"


@pytest.mark.parametrize("body,field", [
    ({"strategy": "revolve", "num_steps": 100_001, "slots": 2}, "num_steps"),
    ({"strategy": "revolve", "num_steps": 10, "slots": 10_001}, "slots"),
    ({"chain": [{"forward_s": -1, "saved_bytes": 1, "input_bytes": 1}]}, "forward_s"),
    ({"chain": [{"forward_s": 1, "saved_bytes": 2**63, "input_bytes": 1}]}, "saved_bytes"),
    ({"chain": [{"forward_s": 1, "saved_bytes": 1, "input_bytes": 1}] * 10_001}, "chain"),
])
def test_limits_are_422(client, body, field):
    r = post(client, body)
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert any(field in p["name"] for p in r.json()["invalid-params"])


@pytest.mark.parametrize("body,field", [
    ({**SETUP, "strategy": "budget"}, "body.budget_bytes"),
    ({**SETUP, "strategy": "every-k"}, "body.every_k"),
    ({**SETUP, "strategy": "blocks"}, "body.blocks"),
    ({"model": {"preset": "gpt2"}, "training": {"sequence_length": 4096}, "strategy": "full"},
     "body.training.sequence_length"),
    ({"model": {"num_parameters": 10**9}, "strategy": "full"}, "body.model"),
    ({"chain": [{"forward_s": 1, "saved_bytes": 1, "input_bytes": 1}], "strategy": "selective"},
     "body.strategy"),
])
def test_unplannable_names_the_rule(client, body, field):
    r = post(client, body)
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == field


def test_two_forms_are_refused(client):
    r = post(client, {**SETUP, "strategy": "revolve", "num_steps": 3, "slots": 2})
    assert r.status_code == 422


def test_operation_id(client):
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/checkpointing"]["post"]["operationId"] == "plan_checkpointing"
