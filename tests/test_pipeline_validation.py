"""Pipelined validation jobs: a real 2-rank pipelined step (torchrun, gloo on CPU) through
``run_validation`` and through the API, compared with the pipeline simulator (action order and
in-flight micro-batches exactly) and with the planner's memory estimate. Times are reported,
not asserted: on a shared 2-core CPU they are noisy."""

from __future__ import annotations


import pytest
from fastapi.testclient import TestClient

from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import ValidationResult
from service.validation.runner import (
    ValidationUnsupported,
    check_supported,
    run_validation,
)
from tests.jobtargets import poll

pytest.importorskip("torch.distributed.pipelining")

MODEL_STATES = ("parameters", "gradients", "optimizer_states")


def tiny(family: str = "gpt2") -> dict:
    m = {"family": family, "num_layers": 4, "hidden_size": 64, "num_heads": 4, "vocab_size": 128,
         "max_sequence_length": 32, "tie_embeddings": False}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


def body(schedule: str, family: str = "gpt2", precision: str = "fp32", microbatches: int = 4,
         virtual: int = 1, **par) -> dict:
    return {"model": tiny(family),
            "training": {"precision": precision, "optimizer": "adamw", "micro_batch_size": 2,
                         "sequence_length": 32, "gradient_accumulation_steps": microbatches},
            "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": schedule,
                            "virtual_pipeline_stages": virtual, **par},
            "device": "cpu", "steps": 3, "timeout_s": 120}


def report(res: ValidationResult) -> None:
    pv = res.pipeline
    print(f"\n{pv.schedule}: makespan measured {pv.makespan_s_measured * 1e3:.2f} ms, simulated "
          f"{pv.makespan_s_simulated * 1e3:.2f} ms; busy measured/simulated "
          f"{[(round(r.busy_s_measured * 1e3, 2), round(r.busy_s_simulated * 1e3, 2)) for r in pv.ranks]}"
          f" ms; memory estimate {res.estimate.total} B, worst rank measured "
          f"{res.measured.total} B ({res.relative_error.total:+.1%})")


def check_against_simulator(res: ValidationResult, schedule: str, microbatches: int) -> None:
    pv = res.pipeline
    assert pv is not None and pv.schedule == schedule and pv.stages == 2
    assert pv.microbatches == microbatches
    assert "2 pipeline ranks (gloo)" in res.device
    assert [r.rank for r in pv.ranks] == [0, 1]
    for r in pv.ranks:
        assert r.action_order_matches, (r.rank, r.first_mismatch)
        assert r.first_mismatch is None
        assert r.in_flight_measured == r.in_flight_simulated, r.rank
        assert 0 < r.busy_s_measured <= pv.makespan_s_measured
        assert r.peak_memory.total == sum(getattr(r.peak_memory, c) for c in (
            *MODEL_STATES, "activations", "temporaries"))
    assert pv.action_order_matches and pv.in_flight_matches
    # the measured per-stage costs are what the simulator was fed
    assert len(pv.forward_s) == 2 and all(f > 0 for f in pv.forward_s)
    worst = max(pv.ranks, key=lambda r: r.peak_memory.total)
    assert res.worst_measured_rank == worst.rank and res.measured == worst.peak_memory


@pytest.mark.parametrize("schedule,in_flight,worst", [("1f1b", [2, 1], 0), ("gpipe", [4, 4], 1)])
def test_run_validation_pipelined(schedule: str, in_flight: list[int], worst: int) -> None:
    req = ValidationRequest.model_validate(body(schedule))
    seen = []
    res = run_validation(req, seen.append)
    check_against_simulator(res, schedule, 4)
    # 1F1B bounds what a rank holds by its distance to the end; GPipe holds every micro-batch
    assert [r.in_flight_measured for r in res.pipeline.ranks] == in_flight
    # Under 1F1B the first stage (most in flight) peaks highest; under GPipe the last one does
    # (every micro-batch's logits live until its backward); the planner replays every rank and
    # names the same one.
    assert res.worst_rank == worst
    assert res.estimate == res.ranks[worst].estimate
    # Stage 0's model states are measured to the byte. Its gradients are all live at the 1F1B
    # peak; under GPipe the peak comes while the first backwards run, before most of them exist.
    stage0 = res.pipeline.ranks[0].peak_memory
    est0 = res.ranks[0].estimate
    assert (est0.parameters, est0.gradients, est0.optimizer_states) == (
        stage0.parameters, stage0.gradients, stage0.optimizer_states)
    if schedule == "1f1b":
        assert stage0.gradients == stage0.parameters
    else:
        assert 0 < stage0.gradients < stage0.parameters
    assert res.relative_error.total is not None
    assert seen[0].phase == "building" and seen[-1].phase == "comparing"
    assert any(p.phase == "running" for p in seen)
    report(res)


def test_pipelined_validation_through_the_api(tmp_path) -> None:
    from service.app import create_app
    from service.jobs.embedded import EmbeddedWorker
    from service.settings import DeviceInfo, Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", lease_s=10,
                        heartbeat_s=0.3, poll_s=0.1,
                        job_target="service.validation.runner:run_validation",
                        worker_device=DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30),
                        shutdown_grace_s=0)
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.jobs.get(), settings)
    worker.start()
    try:
        with TestClient(app) as client:
            # llama: rotary tables on every stage; zb-h1: split backward (I and W)
            r = client.post("/v1/validations", json=body("zb-h1", family="llama"))
            assert r.status_code == 202, r.text
            job = poll(client, r.json()["id"], timeout_s=120)
    finally:
        worker.stop(15)
        app.state.jobs.close()
    assert job["status"] == "succeeded", job.get("error")
    res = ValidationResult.model_validate(job["result"])
    check_against_simulator(res, "zb-h1", 4)
    assert any(w > 0 for w in res.pipeline.backward_weight_s)  # W timed on its own
    report(res)

    from service.cli import comparison_table

    text = comparison_table(res)
    assert "pipeline zb-h1: 2 ranks x 1 stages, 4 micro-batches" in text
    assert "action order: matches   in-flight: matches" in text


@pytest.mark.parametrize("change,reason", [
    ({"model": {**tiny(), "tie_embeddings": True}}, "tied embeddings"),
    ({"parallelism": {"pipeline_parallel": 2, "pipeline_schedule": "dualpipe"}},
     "no torch.distributed.pipelining"),
    ({"parallelism": {"pipeline_parallel": 2, "data_parallel": 2}}, "pipeline parallelism alone"),
    ({"parallelism": {"pipeline_parallel": 2, "pipeline_schedule": "1f1b",
                      "virtual_pipeline_stages": 2}}, "one stage per rank"),
    ({"training": {"precision": "mixed-bf16", "gradient_accumulation_steps": 4}},
     "master weights"),
    ({"training": {"gradient_accumulation_steps": 1}}, "microbatches >= stages"),
    ({"mode": "traced"}, "mode 'real'"),
])
def test_refusals_name_the_reason(change: dict, reason: str) -> None:
    req = ValidationRequest.model_validate({**body("1f1b"), **change})
    with pytest.raises(ValidationUnsupported, match=reason):
        check_supported(req)
