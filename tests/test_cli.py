"""The memplan command line: validate (local), estimate, openapi, pipeline, and bad input."""

from __future__ import annotations

import json

import pytest

from service.cli import main

KEYS = {"parameters", "gradients", "optimizer_states", "activations", "temporaries", "total"}
SPEC = {"model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32},
        "device": "cpu", "steps": 3}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


@pytest.fixture
def test_target(monkeypatch):
    monkeypatch.setenv("MEMPLAN_JOB_TARGET", "tests.jobtargets:scripted")
    monkeypatch.setenv("MEMPLAN_TEST_STEP_S", "0.01")


def test_validate_locally_prints_the_comparison_table(spec_file, test_target, capsys):
    assert main(["validate", str(spec_file)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["category", "estimate", "measured", "error%"]
    for key in KEYS:
        assert key in out
    # The test target's figures: activations 500 estimated / 520 measured, temporaries 100 / 80.
    assert "-3.8%" in out and "+25.0%" in out
    assert "device: cpu" in out


def test_validate_json_prints_the_api_result_object(spec_file, test_target, capsys):
    assert main(["validate", str(spec_file), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("estimate", "measured", "relative_error"):
        assert set(result[key]) == KEYS


def test_validate_reports_a_failed_job(tmp_path, test_target, capsys):
    path = tmp_path / "crash.json"
    path.write_text(json.dumps({**SPEC, "steps": 2}))  # the scripted target crashes on 2 steps
    assert main(["validate", str(path)]) == 1
    assert "exited with code 3" in capsys.readouterr().err


def test_validate_bad_input_lists_the_fields(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**SPEC, "steps": 1, "device": "tpu"}))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid input (2 problems)" in err and "steps:" in err and "device:" in err
    assert main(["validate", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["validate", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_validate_unreachable_server(spec_file, capsys):
    assert main(["validate", str(spec_file), "--server", "http://127.0.0.1:9"]) == 3
    assert "cannot reach" in capsys.readouterr().err


def test_estimate_from_flags(capsys):
    code = main(["estimate", "--preset", "gpt2", "--precision", "amp-bf16", "--optimizer",
                 "adamw", "--micro-batch-size", "4", "--sequence-length", "1024",
                 "--gpu", "h100-80gb"])
    assert code == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "total" in out and "fits on h100-80gb" in out


def test_estimate_json_from_a_spec(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"model": {"preset": "gpt2"}}))
    assert main(["estimate", str(path), "--json", "--micro-batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["breakdown"]) == KEYS


def test_estimate_bad_input(capsys):
    assert main(["estimate", "--preset", "gpt2", "--precision", "fp7"]) == 2
    assert "training.precision" in capsys.readouterr().err
    assert main(["estimate", "--preset", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["estimate"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_openapi_is_sorted_json_with_validation_routes(tmp_path, capsys):
    out = tmp_path / "openapi.json"
    assert main(["openapi", "--out", str(out)]) == 0
    text = out.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    ops = {op["operationId"] for path in doc["paths"].values() for op in path.values()}
    assert {"create_validation", "get_validation", "list_validations",
            "cancel_validation"} <= ops
    assert main(["openapi"]) == 0
    assert json.loads(capsys.readouterr().out) == doc


def test_pipeline_svg(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schedule": "1f1b", "stages": 4, "microbatches": 8}))
    svg = tmp_path / "p.svg"
    assert main(["pipeline", str(path), "--svg", str(svg)]) == 0
    assert svg.read_text().lstrip().startswith(("<svg", "<?xml"))
    assert main(["pipeline", str(path), "--json"]) == 0
    assert "bubble" in capsys.readouterr().out
