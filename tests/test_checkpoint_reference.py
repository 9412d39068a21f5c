"""POST /v1/checkpointing on a training setup: the step simulator's peaks, the same answer as
POST /v1/memory, and the budget search's optimality over every placement of small models."""

from __future__ import annotations

import itertools

import pytest
from fastapi.testclient import TestClient

from planner.catalog.presets import resolve_model
from planner.routes.checkpointing import named_plan
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.step.program import ReferenceProgram
from planner.catalog.specs import ActivationCheckpointing, ModelSpec, TrainingSpec
from service.app import create_app


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app()) as c:
        yield c


TINY = {
    "gpt2": {"family": "gpt2", "num_layers": 5, "hidden_size": 64, "num_heads": 4,
             "vocab_size": 512, "max_sequence_length": 128},
    "llama": {"family": "llama", "num_layers": 5, "hidden_size": 64, "num_heads": 4,
              "num_kv_heads": 2, "vocab_size": 512, "max_sequence_length": 128},
}
TRAININGS = [
    {"micro_batch_size": 2, "sequence_length": 64},
    {"precision": "fp32", "micro_batch_size": 2, "sequence_length": 128, "attention": "eager"},
    {"precision": "mixed-bf16", "micro_batch_size": 1, "sequence_length": 32,
     "gradient_accumulation_steps": 2, "dropout": 0.1},
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("training", TRAININGS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_first_k_blocks_are_the_best_k_and_the_peak_falls_with_k(family, training, device):
    """The budget search's two premises (planner/routes/checkpointing.py docstring), on the simulator:
    over all 2^L placements, the lowest peak of k checkpointed blocks is that of blocks 0..k-1,
    and that peak does not rise with k."""
    model = resolve_model(ModelSpec(**TINY[family]))
    tr = TrainingSpec(**training)
    L = model.num_layers
    peak = {c: ReferenceProgram(model, tr, device=device, checkpointed=set(c)).run().steady.total
            for k in range(L + 1) for c in itertools.combinations(range(L), k)}
    first = [peak[tuple(range(k))] for k in range(L + 1)]
    best = [min(v for c, v in peak.items() if len(c) == k) for k in range(L + 1)]
    assert first == best
    assert all(a >= b for a, b in itertools.pairwise(first))


SETUPS = [
    {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 8, "sequence_length": 1024}},
    {"model": {"family": "llama", "num_layers": 8, "hidden_size": 512, "num_heads": 8,
               "num_kv_heads": 2, "vocab_size": 32000, "max_sequence_length": 4096},
     "training": {"micro_batch_size": 2, "sequence_length": 4096, "precision": "bf16"}},
    {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 4, "sequence_length": 1024},
     "parallelism": {"tensor_parallel": 2, "data_parallel": 2, "zero_stage": 1}},
]


def _with(setup: dict, ac: dict) -> dict:
    return {**setup, "training": {**setup["training"], "activation_checkpointing": ac}}


def _memory(client, body: dict) -> dict:
    r = client.post("/v1/memory", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _blocks_assumed(memory: dict) -> set[int]:
    value = next((a["value"] for a in memory["assumptions"] if a["name"] == "checkpointed_blocks"),
                 "")
    out: set[int] = set()
    for part in filter(None, value.split(",")):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("ac", [
    {"strategy": "none"}, {"strategy": "full"}, {"strategy": "every-k", "every_k": 3},
    {"strategy": "sqrt"}, {"strategy": "blocks", "blocks": [1, 4, 6]},
])
def test_named_plans_agree_with_memory(client, setup, ac):
    plan = client.post("/v1/checkpointing", json=_with(setup, ac))
    assert plan.status_code == 200, plan.text
    plan = plan.json()
    memory = _memory(client, _with(setup, ac))
    assert plan["breakdown"] == memory["breakdown"]
    assert plan["total_peak_bytes"] == memory["breakdown"]["total"]
    assert plan["allocator_reserve_bytes"] == memory["allocator_reserve_bytes"]
    assert set(plan["checkpointed_blocks"]) == _blocks_assumed(memory)
    # the returned plan, applied as it is, is the same step
    assert _memory(client, _with(setup, plan["plan"]))["breakdown"] == memory["breakdown"]


@pytest.mark.parametrize("setup", SETUPS)
def test_budget_agrees_with_memory(client, setup):
    none = client.post("/v1/checkpointing", json={**setup, "strategy": "none"}).json()
    full = client.post("/v1/checkpointing", json={**setup, "strategy": "full"}).json()
    lo = full["total_peak_bytes"] + full["allocator_reserve_bytes"]
    hi = none["total_peak_bytes"] + none["allocator_reserve_bytes"]
    for budget in (lo - 1, lo, (lo + hi) // 2, (3 * lo + hi) // 4, hi, hi + 10**9):
        ac = {"strategy": "budget", "budget_bytes": budget}
        plan = client.post("/v1/checkpointing", json=_with(setup, ac)).json()
        memory = _memory(client, _with(setup, ac))
        assert plan["breakdown"] == memory["breakdown"], budget
        assert set(plan["checkpointed_blocks"]) == _blocks_assumed(memory)
        assert plan["fits"] == (budget >= lo)
        if plan["fits"]:
            assert plan["total_peak_bytes"] + plan["allocator_reserve_bytes"] <= budget
            k = len(plan["checkpointed_blocks"])
            assert plan["checkpointed_blocks"] == list(range(k))
            if k:  # one block fewer does not fit
                fewer = client.post("/v1/checkpointing", json=_with(
                    setup, {"strategy": "blocks", "blocks": list(range(k - 1))})).json()
                assert fewer["total_peak_bytes"] + fewer["allocator_reserve_bytes"] > budget
        resolved = _memory(client, _with(setup, plan["plan"]))
        assert resolved["breakdown"] == memory["breakdown"]


def test_budget_on_cpu_kernels(client):
    setup = {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 8,
                                                      "sequence_length": 1024}}
    cuda = client.post("/v1/checkpointing", json={**setup, "strategy": "full"}).json()
    cpu = client.post("/v1/checkpointing", json={**setup, "strategy": "full",
                                                 "device": "cpu"}).json()
    assert cpu["allocator_reserve_bytes"] == 0 and cuda["allocator_reserve_bytes"] > 0
    assert cpu["total_peak_bytes"] != cuda["total_peak_bytes"]  # layer-norm statistics dtype


def test_plan_blocks_are_checked_against_the_model(client):
    body = _with(SETUPS[0], {"strategy": "blocks", "blocks": [0, 12]})
    r = client.post("/v1/memory", json=body)
    assert r.status_code == 422
    assert r.json()["invalid-params"][0]["name"] == "body.training.activation_checkpointing.blocks"
    for ac, field in [({"strategy": "blocks", "blocks": [-1]}, "blocks"),
                      ({"strategy": "blocks", "blocks": [1024]}, "blocks"),
                      ({"strategy": "blocks", "blocks": [2, 2]}, "blocks"),
                      ({"strategy": "blocks"}, "activation_checkpointing"),
                      ({"strategy": "full", "blocks": [1]}, "activation_checkpointing")]:
        r = client.post("/v1/memory", json=_with(SETUPS[0], ac))
        assert r.status_code == 422, ac
        assert any(field in p["name"] for p in r.json()["invalid-params"]), r.json()


def test_named_plans_match_the_planner_rule():
    for n in range(1, 40):
        for strategy, k in [("none", None), ("full", None), ("sqrt", None), ("every-k", 1),
                            ("every-k", 3), ("every-k", 7)]:
            training = TrainingSpec(activation_checkpointing=ActivationCheckpointing(
                strategy=strategy, every_k=k))
            assert set(named_plan(strategy, n, k)) == checkpointed_blocks(training, n)
