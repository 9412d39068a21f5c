"""Every spec in examples/ runs through the command line (and its route) as examples/README.md
says: exit status and the key figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COVERED = {"fits.json", "does-not-fit.json", "zero.json", "checkpointing.json", "pipeline.json",
           "validate-small.json", "plan.json"}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv: str) -> tuple[int, dict]:
    code, out, _ = _run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_every_example_is_covered_here():
    assert {p.name for p in EXAMPLES.glob("*.json")} == COVERED
    readme = (EXAMPLES / "README.md").read_text()
    for name in COVERED:
        assert f"`{name}`" in readme


def test_fits(capsys):
    code, out, _ = _run(capsys, "estimate", str(EXAMPLES / "fits.json"))
    assert code == 0
    assert "model: gpt2-xl" in out and "fits on a100-80gb: yes" in out
    code, result = _json(capsys, "estimate", str(EXAMPLES / "fits.json"))
    assert code == 0 and result["fit"]["fits"] and result["fit"]["max_micro_batch_size"] >= 4


def test_does_not_fit_and_says_what_to_change(capsys):
    code, out, _ = _run(capsys, "estimate", str(EXAMPLES / "does-not-fit.json"))
    assert code == 3
    assert "model: llama-2-7b" in out and "fits on h100-80gb: no" in out
    assert "note: fits instead (one change each):" in out and "zero_stage 3 (FSDP2)" in out
    assert "fits with: data_parallel 2 with zero_stage 3" in out
    code, result = _json(capsys, "estimate", str(EXAMPLES / "does-not-fit.json"))
    assert code == 3 and not result["fit"]["fits"] and result["fit"]["headroom_bytes"] < 0
    b = result["breakdown"]
    assert b["parameters"] + b["gradients"] + b["optimizer_states"] > result["fit"]["memory_bytes"]
    changes = [s["change"] for s in result["suggestions"]]
    assert "data_parallel 2 with zero_stage 3 (2x the GPUs)" in changes
    assert all(s["headroom_bytes"] >= 0 for s in result["suggestions"])


def test_zero_makes_it_fit(capsys):
    code, out, _ = _run(capsys, "estimate", str(EXAMPLES / "zero.json"))
    assert code == 0 and "fits on h100-80gb: yes" in out
    _, alone = _json(capsys, "estimate", str(EXAMPLES / "does-not-fit.json"))
    _, sharded = _json(capsys, "estimate", str(EXAMPLES / "zero.json"))
    assert sharded["breakdown"]["optimizer_states"] * 8 <= alone["breakdown"]["optimizer_states"]


def test_checkpointing_holds_the_budget(capsys):
    spec = json.loads((EXAMPLES / "checkpointing.json").read_text())
    budget = spec["training"]["activation_checkpointing"]["budget_bytes"]
    code, out, _ = _run(capsys, "estimate", str(EXAMPLES / "checkpointing.json"))
    assert code == 0 and "fits on a100-80gb: yes" in out
    assert f"budget {budget} bytes:" in out and "blocks checkpointed" in out
    _, result = _json(capsys, "estimate", str(EXAMPLES / "checkpointing.json"))
    assert result["breakdown"]["total"] <= budget
    # Without checkpointing the same micro-batch does not fit.
    code, _ = _json(capsys, "estimate", str(EXAMPLES / "checkpointing.json"),
                    "--checkpointing", "none")
    assert code == 3


def test_pipeline_summary(capsys, tmp_path):
    code, out, _ = _run(capsys, "pipeline", str(EXAMPLES / "pipeline.json"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "pipeline 1f1b: 4 ranks x 1 stage each, 8 micro-batches"
    assert "step time:" in lines[1] and "bubble fraction:" in lines[1]
    assert "in-flight micro-batches" in lines[2] and "activations" in lines[2]
    ranks = [line.split() for line in lines[4:8]]
    assert [r[0] for r in ranks] == ["0", "1", "2", "3"]
    assert [r[6] for r in ranks] == ["4", "3", "2", "1"]  # 1F1B: p - rank micro-batches in flight
    assert all("GiB" in line for line in lines[4:8])
    code, result = _json(capsys, "pipeline", str(EXAMPLES / "pipeline.json"))
    assert code == 0 and result["schedule"] == "1f1b" and 0 < result["bubble_fraction"] < 1
    assert f"{result['bubble_fraction']:.1%}" in lines[1]


def test_validate_small_runs_here(capsys):
    code, out, _ = _run(capsys, "validate", str(EXAMPLES / "validate-small.json"))
    assert code == 0
    assert out.splitlines()[0].split() == ["category", "estimate", "measured", "error%"]
    assert "device: cpu   mode: real" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[-1] in ("+0.0%", "-0.0%")  # estimate equals measurement on CPU


@pytest.mark.parametrize("name,route", [("fits.json", "/v1/memory"),
                                        ("does-not-fit.json", "/v1/memory"),
                                        ("zero.json", "/v1/zero"),
                                        ("checkpointing.json", "/v1/checkpointing"),
                                        ("pipeline.json", "/v1/pipeline")])
def test_examples_are_request_bodies_of_their_routes(name, route, tmp_path):
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/jobs.db"))
    with TestClient(app) as api:
        r = api.post(route, content=(EXAMPLES / name).read_bytes(),
                     headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_plan(capsys):
    code, out, _ = _run(capsys, "plan", str(EXAMPLES / "plan.json"))
    assert code == 0
    assert out.startswith("16 GPUs: ") and "tokens/s" in out and "pareto" in out
    code, result = _json(capsys, "plan", str(EXAMPLES / "plan.json"))
    assert code == 0
    layouts = result["clusters"][0]["layouts"]
    assert 1 <= len(layouts) <= 5 and all(x["fits"] for x in layouts)
    times = [x["time"]["step_s"] for x in layouts]
    assert times == sorted(times)  # fastest first
    assert all(x["cost_to_train"] == pytest.approx(16 * x["time_to_train_s"] / 3600 * 0.8)
               for x in layouts)


def test_plan_sweep_script(capsys):
    """examples/plan_sweep.py, as the README runs it (smaller here): one row per cluster size."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_sweep", EXAMPLES / "plan_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--preset", "llama-3.2-1b", "--gpu", "l4-24gb", "--min-gpus", "8",
                     "--max-gpus", "16", "--global-batch", "32", "--sequence-length", "4096"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["GPUs", "layout"]
    assert [line.split()[0] for line in out[3:]] == ["8", "16"]
