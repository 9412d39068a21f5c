"""GPU and model preset names are matched without regard to case, everywhere a name is taken."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from planner.catalog.presets import UnknownName, get_gpu, gpus, model_presets, resolve_model
from planner.catalog.specs import MemoryRequest, ModelSpec, ValidationRequest
from service.app import create_app
from service.settings import Settings


def test_catalog_names_are_lower_case():
    # The request models lower-case the names they are given; that finds every catalog entry.
    for name in [*gpus(), *model_presets()]:
        assert name == name.lower()


def test_catalog_lookup_ignores_case():
    assert get_gpu("A100-80GB") is get_gpu("a100-80gb")
    assert resolve_model(ModelSpec(preset="LLaMA-2-7B")).name == "llama-2-7b"
    with pytest.raises(UnknownName) as exc:
        get_gpu("A100-81GB")
    assert "a100-80gb" in str(exc.value)


def test_requests_carry_the_catalog_spelling():
    req = MemoryRequest.model_validate({"model": {"preset": "GPT2-XL"},
                                        "hardware": {"gpu": "H100-80GB"}})
    assert req.model.preset == "gpt2-xl" and req.hardware.gpu == "h100-80gb"


def test_a_cuda_job_asks_for_the_catalog_gpu_kind():
    from service.jobs.requirements import requirements_for

    req = ValidationRequest.model_validate({
        "model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32},
        "hardware": {"gpu": "H100-80GB"}, "device": "cuda", "mode": "traced"})
    assert requirements_for(req).gpu_kind == "h100-80gb"  # what a worker on an H100 reports


def test_the_api_takes_any_case(tmp_path):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/jobs.db"))
    body = {"model": {"preset": "GPT2"}, "training": {"micro_batch_size": 2},
            "hardware": {"gpu": "A100-80GB"}}
    with TestClient(app) as api:
        r = api.post("/v1/memory", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "gpt2" and r.json()["fit"]["gpu"] == "a100-80gb"
        r = api.post("/v1/zero", json=body)
        assert r.status_code == 200, r.text
        assert {s["fit"]["gpu"] for s in r.json()["stages"]} == {"a100-80gb"}
        r = api.post("/v1/memory", json={**body, "hardware": {"gpu": "A100-81GB"}})
        assert r.status_code == 422


def test_h200_capacity_is_what_cuda_reported_on_the_device():
    """The catalog's H200 capacity is the H200 SXM's own ``total_memory`` as torch read it in the
    committed GPU campaign (benchmarks/results/accuracy-cuda.json), not a nominal figure."""
    import json
    from pathlib import Path

    header = json.loads((Path(__file__).parents[1] / "benchmarks/results/accuracy-cuda.json")
                        .read_text())["header"]
    assert header["device"] == "NVIDIA H200"
    assert get_gpu("h200-141gb").memory_bytes == header["device_memory_bytes"] == 150109880320
