"""A budget on POST /v1/plan: each layout's cost to train, and constraints.max_cost."""

from __future__ import annotations

import pytest

from planner.catalog.plan_specs import PlanRequest
from planner.routes.plan_search import plan

BASE = dict(
    model=dict(family="llama", num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4,
               ffn_hidden_size=2816, vocab_size=32000),
    training=dict(global_batch_sequences=16, sequence_length=8192, max_micro_batch_size=2,
                  checkpoint_strategies=["none", "full"], train_tokens=10**9),
    cluster=dict(gpu="v100-16gb", min_gpus=8, max_gpus=16, price_per_gpu_hour=2.5),
    constraints=dict(top_k=6),
)


@pytest.fixture(scope="module")
def free():
    return plan(PlanRequest.model_validate(BASE))


def test_cost_to_train_is_gpu_hours_times_price(free):
    layouts = [e for c in free.clusters for e in c.layouts]
    assert layouts
    for e in layouts:
        assert e.cost_to_train == pytest.approx(e.num_gpus * e.time_to_train_s / 3600 * 2.5,
                                                rel=1e-12)
    # at one cluster size the fastest layout is the cheapest
    for c in free.clusters:
        costs = [e.cost_to_train for e in c.layouts]
        assert costs == sorted(costs)


def test_max_cost_keeps_the_layouts_within_it(free):
    costs = sorted(e.cost_to_train for c in free.clusters for e in c.layouts)
    cap = (costs[0] + costs[-1]) / 2
    capped = plan(PlanRequest.model_validate(
        {**BASE, "constraints": {**BASE["constraints"], "max_cost": cap}}))
    for a, b in zip(free.clusters, capped.clusters):
        want = [e for e in a.layouts if e.cost_to_train <= cap]
        assert b.layouts == want  # the ranking's prefix: the same layouts, in the same order
        assert all(e.cost_to_train <= cap for e in b.pareto_front)
        gone = len(a.layouts) - len(want)
        assert b.search.rejected.get("over_budget", 0) >= gone
    assert any("cheapest within the budget" in n for n in capped.notes)


def test_max_cost_below_every_layout_says_so(free):
    cheapest = min(e.cost_to_train for c in free.clusters for e in c.layouts)
    capped = plan(PlanRequest.model_validate(
        {**BASE, "constraints": {**BASE["constraints"], "max_cost": cheapest / 2}}))
    assert not any(c.layouts for c in capped.clusters)
    assert any("within the budget" in n for n in capped.notes)


def test_max_cost_needs_a_price_and_tokens():
    from fastapi.testclient import TestClient

    from service.app import create_app

    body = {**BASE, "cluster": {k: v for k, v in BASE["cluster"].items()
                                if k != "price_per_gpu_hour"},
            "constraints": {"max_cost": 1000}}
    with TestClient(create_app()) as c:
        r = c.post("/v1/plan", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert [p["name"] for p in r.json()["invalid-params"]] == ["body.cluster.price_per_gpu_hour"]
