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


# ---- estimate: exit status, checkpointing flags, names -----------------------------------------
def test_estimate_exit_status_says_whether_the_setup_fits(capsys):
    fits = ["estimate", "--preset", "gpt2-xl", "--micro-batch-size", "4", "--gpu", "a100-80gb"]
    assert main(fits) == 0
    assert "fits on a100-80gb: yes" in capsys.readouterr().out
    too_big = ["estimate", "--preset", "llama-2-7b", "--sequence-length", "4096",
               "--checkpointing", "full", "--gpu", "h100-80gb"]
    assert main(too_big) == 3
    out = capsys.readouterr().out
    assert "fits on h100-80gb: no" in out
    # what to change: the response's notes (planner/routes/memory.py), one change each
    assert "note: fits instead (one change each):" in out and "zero_stage 3 (FSDP2)" in out
    assert main([*too_big, "--json"]) == 3
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fit"]["fits"] is False
    assert "does not fit on h100-80gb" in captured.err
    # Too large a micro-batch: the output names the largest that fits.
    too_many = ["estimate", "--preset", "gpt2-xl", "--micro-batch-size", "20", "--gpu",
                "a100-80gb"]
    assert main([*too_many, "--json"]) == 3
    largest = json.loads(capsys.readouterr().out)["fit"]["max_micro_batch_size"]
    assert 1 <= largest < 20
    assert main(too_many) == 3
    out = capsys.readouterr().out
    assert f"micro_batch_size {largest} (the largest that fits" in out
    assert "activation_checkpointing 'full'" in out
    # No hardware: nothing to fit, exit 0.
    assert main(["estimate", "--preset", "llama-2-7b", "--sequence-length", "4096"]) == 0
    assert "fits on" not in capsys.readouterr().out


def test_estimate_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out
    for line in ("0  the setup fits", "2  invalid input", "3  the setup does not fit"):
        assert line in out
    for flag in ("--every-k", "--checkpoint-budget-gib", "--checkpoint-blocks"):
        assert flag in out


def _total(capsys, *flags: str) -> int:
    assert main(["estimate", "--preset", "gpt2-xl", "--micro-batch-size", "8", "--json",
                 *flags]) == 0
    return json.loads(capsys.readouterr().out)["breakdown"]["total"]


def test_estimate_checkpointing_flags_fill_every_field_of_the_spec(capsys):
    none, full = _total(capsys), _total(capsys, "--checkpointing", "full")
    every_2 = _total(capsys, "--every-k", "2")  # implies --checkpointing every-k
    assert every_2 == _total(capsys, "--checkpointing", "every-k", "--every-k", "2")
    # every-k checkpoints the blocks i with i % k == 0 (gpt2-xl: 48 blocks).
    assert every_2 == _total(capsys, "--checkpoint-blocks", ",".join(map(str, range(0, 48, 2))))
    assert full < every_2 < none
    # A budget: the plan keeps the peak within it.
    assert main(["estimate", "--preset", "gpt2-xl", "--micro-batch-size", "16", "--gpu",
                 "a100-80gb", "--checkpoint-budget-gib", "60"]) == 0
    out = capsys.readouterr().out
    assert f"budget {60 * 2**30} bytes" in out
    assert _total(capsys, "--micro-batch-size", "16", "--gpu", "a100-80gb",
                  "--checkpoint-budget-gib", "60") <= 60 * 2**30


def test_estimate_checkpointing_flags_refuse_what_they_would_ignore(capsys):
    assert main(["estimate", "--preset", "gpt2", "--checkpointing", "full", "--every-k", "2"]) == 2
    assert "--every-k applies to --checkpointing every-k" in capsys.readouterr().err
    assert main(["estimate", "--preset", "gpt2", "--checkpointing", "sqrt",
                 "--checkpoint-budget-gib", "10"]) == 2
    assert "--checkpoint-budget-gib applies to --checkpointing budget" in capsys.readouterr().err
    assert main(["estimate", "--preset", "gpt2", "--every-k", "2",
                 "--checkpoint-budget-gib", "10"]) == 2
    assert "give one strategy" in capsys.readouterr().err
    assert main(["estimate", "--preset", "gpt2", "--checkpoint-blocks", "99"]) == 2
    assert "block 99 is not below num_layers (12)" in capsys.readouterr().err
    for bad in (["--checkpoint-blocks", "1,x"], ["--checkpoint-budget-gib", "0"],
                ["--every-k", "two"]):
        with pytest.raises(SystemExit) as exc:
            main(["estimate", "--preset", "gpt2", *bad])
        assert exc.value.code == 2


def test_estimate_names_are_case_insensitive(capsys):
    assert main(["estimate", "--preset", "GPT2-XL", "--micro-batch-size", "4",
                 "--gpu", "A100-80GB"]) == 0
    out = capsys.readouterr().out
    assert "model: gpt2-xl" in out and "fits on a100-80gb: yes" in out


# ---- pipeline: a summary by default ------------------------------------------------------------
def test_pipeline_prints_a_summary_by_default(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schedule": "1f1b", "stages": 4, "microbatches": 8}))
    assert main(["pipeline", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) < 20
    assert lines[0] == "pipeline 1f1b: 4 ranks x 1 stage each, 8 micro-batches"
    assert "step time: 33.000 s" in out and "bubble fraction: 27.3%" in out
    assert "in-flight micro-batches" in lines[2] and "activations" in lines[2]
    # rank 0 holds 4 micro-batches in flight under 1F1B with 4 stages, rank 3 one.
    assert lines[4].split()[:2] == ["0", "0"] and lines[4].split()[6] == "4"
    assert lines[7].split()[6] == "1"
    assert "64 actions" in out
    assert main(["pipeline", str(path), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert len(full["timeline"]) == 64 and full["bubble_fraction"] > 0.27


def test_pipeline_summary_with_a_setup_gives_activation_bytes_per_rank(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "schedule": "1f1b", "stages": 2, "microbatches": 4,
        "setup": {"model": {"family": "gpt2", "num_layers": 4, "hidden_size": 64,
                            "num_heads": 4, "vocab_size": 256, "max_sequence_length": 64},
                  "training": {"precision": "fp32", "sequence_length": 32},
                  "hardware": {"gpu": "H100-80GB"}}}))
    svg = tmp_path / "p.svg"
    assert main(["pipeline", str(path), "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert svg.exists() and f"timeline written to {svg}" in out
    assert "activations" in out and "peak memory" in out and "KiB" in out
    assert "assumption: gpu = h100-80gb" in out
