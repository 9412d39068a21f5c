"""POST /v1/pipeline: JSON and SVG, 422 problem+json with the rule."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client() -> TestClient:
    from service.app import create_app
    return TestClient(create_app())


PUBLIC = {"schedule": "interleaved-1f1b", "stages": 4, "microbatches": 8, "virtual_stages": 2,
          "costs": {"forward_s": 1, "backward_input_s": 1, "backward_weight_s": 1}}


def test_json(client: TestClient) -> None:
    r = client.post("/v1/pipeline", json=PUBLIC)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["makespan_s"] == 28.5
    assert len(body["ranks"]) == 4 and body["bottleneck_rank"] == 0
    assert {e["kind"] for e in body["timeline"]} == {"F", "B"}
    assert all(e["end_s"] >= e["start_s"] for e in body["timeline"])


def test_svg(client: TestClient) -> None:
    r = client.post("/v1/pipeline", json={**PUBLIC, "schedule": "zb-h1", "virtual_stages": 1},
                    headers={"Accept": "image/svg+xml"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    svg = r.text
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "rank 3" in svg and "#54a24b" in svg  # W is coloured
    assert "idle" in svg


def test_constraint_is_422_with_rule(client: TestClient) -> None:
    r = client.post("/v1/pipeline", json={**PUBLIC, "schedule": "1f1b", "virtual_stages": 1,
                                          "microbatches": 2})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert "m >= p" in p["detail"]
    assert p["invalid-params"][0]["name"] == "body.microbatches"
    r = client.post("/v1/pipeline", json={**PUBLIC, "schedule": "zb-v", "virtual_stages": 3})
    assert r.status_code == 422 and "two stages per rank" in r.json()["detail"]


@pytest.mark.parametrize("patch", [{"stages": 1025}, {"microbatches": 70000},
                                   {"virtual_stages": 65},
                                   {"costs": {"forward_s": -1}}])
def test_limits(client: TestClient, patch: dict) -> None:
    r = client.post("/v1/pipeline", json={**PUBLIC, **patch})
    assert r.status_code == 422


def test_non_finite_cost_refused(client: TestClient) -> None:
    r = client.post("/v1/pipeline", content=b'{"stages": 2, "microbatches": 2, '
                    b'"costs": {"forward_s": Infinity}}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_setup_roofline(client: TestClient) -> None:
    r = client.post("/v1/pipeline", json={"setup": {
        "model": {"preset": "gpt2"}, "training": {"gradient_accumulation_steps": 8},
        "parallelism": {"pipeline_parallel": 4, "pipeline_schedule": "zb-h1"},
        "hardware": {"gpu": "a100-80gb"}}})
    assert r.status_code == 200, r.text
    assert r.json()["schedule"] == "zb-h1" and r.json()["makespan_s"] > 0


def test_openapi_documents_both_media_types(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/pipeline"]["post"]
    assert op["operationId"] == "plan_pipeline"
    content = op["responses"]["200"]["content"]
    assert "application/json" in content and "image/svg+xml" in content
    assert "application/problem+json" in op["responses"]["422"]["content"]
