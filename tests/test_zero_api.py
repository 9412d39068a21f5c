"""POST /v1/zero: stages side by side through the real application."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient



def _app():
    try:
        from service.app import create_app
        return create_app()
    except ImportError:
        # while another route module of create_app() is missing: the zero router alone, with the
        # application's problem+json handlers and operationId rule
        from fastapi import FastAPI

        from service import errors
        from service.routes import zero
        app = FastAPI(generate_unique_id_function=lambda route: route.name)
        errors.install(app)
        app.include_router(zero.router)
        return app


@pytest.fixture(scope="module")
def client():
    with TestClient(_app()) as c:
        yield c


def test_zero_stages_side_by_side(client):
    body = {"model": {"preset": "gpt2"},
            "training": {"precision": "mixed-bf16", "optimizer": "adamw",
                         "micro_batch_size": 1, "sequence_length": 128},
            "parallelism": {"data_parallel": 8}}
    r = client.post("/v1/zero", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    stages = [(s["stage"], s["offload_optimizer"]) for s in out["stages"]]
    assert stages == [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]
    opt = [s["breakdown"]["optimizer_states"] for s in out["stages"]]
    assert opt[0] > opt[1] > 0 and opt[4] == opt[5] == 0
    assert "DistributedDataParallel" in out["stages"][0]["implementation"]
    assert "ZeroRedundancyOptimizer" in out["stages"][1]["implementation"]
    assert "fully_shard" in out["stages"][3]["implementation"]
    comm = [s["communication_bytes_per_step"] for s in out["stages"]]
    assert comm[3] > comm[2] > 0
    for s in out["stages"]:
        b = s["breakdown"]
        assert b["total"] >= b["parameters"] + b["gradients"] + b["optimizer_states"]


def test_bare_parameter_count_and_fit(client):
    body = {"model": {"num_parameters": 7_500_000_000},
            "training": {"precision": "mixed-fp16", "optimizer": "adam"},
            "parallelism": {"data_parallel": 64}, "hardware": {"gpu": "a100-80gb"}}
    r = client.post("/v1/zero", json=body)
    assert r.status_code == 200, r.text
    stages = r.json()["stages"]
    assert stages[0]["breakdown"]["parameters"] == 15 * 10**9  # 2Ψ (ZeRO paper Fig. 1)
    assert stages[3]["breakdown"]["parameters"] == 15 * 10**9 // 64
    assert stages[0]["fit"]["fits"] is False and stages[3]["fit"]["fits"] is True


def test_errors_are_problem_json(client):
    r = client.post("/v1/zero", json={"model": {"preset": "no-such-model"}})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    r = client.post("/v1/zero", json={"model": {"preset": "gpt2"},
                                      "training": {"optimizer": "rmsprop",
                                                   "optimizer_implementation": "fused"}})
    assert r.status_code == 422 and "fused" in r.json()["detail"]


def test_operation_id(client):
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/zero"]["post"]["operationId"] == "compare_zero_stages"
