"""FSDP2's MixedPrecisionPolicy on ZeRO-3 ranks (``parallelism.fsdp_mixed_precision``): the recipe
torchtitan runs, fp32 sharded parameters (the master weights, stepped by a plain fp32 optimizer),
bf16 all-gathered compute parameters, fp32 gradient reduction. Real torchrun ranks (gloo on CPU)
measured by DistributedMeter against the per-rank replay (planner/layouts/data_parallel.py).
Tolerance: none, every category of every rank, first step and steady state."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from planner.catalog.presets import resolve_model
from planner.catalog.specs import ModelSpec, ValidationRequest
from planner.layouts.parameter_tensors import parameter_shapes
from planner.layouts.sharding import _numel
from service.validation.distributed import per_rank_estimates, run_multi_rank
from service.validation.support import ValidationUnsupported, check_supported
from tests.test_distributed_validation import request, tiny


def mp_request(family: str, ranks: int = 2, **training) -> ValidationRequest:
    body = request(family, 3, ranks, precision="mixed-bf16",
                   fsdp_mixed_precision=True).model_dump(mode="json")
    body["training"].update(training)
    return ValidationRequest.model_validate(body)


@pytest.mark.parametrize("family,ranks,training", [
    ("gpt2", 2, {}),
    ("llama", 2, {}),
    # LoRA: the frozen base sharded in fp32 and gathered in bf16, the adapters' gradients only
    # reduce-scattered; gradient accumulation into the fp32 sharded gradients, chunked loss
    ("gpt2", 2, {"lora": {"rank": 4, "target_modules": ["q", "v", "up"]}}),
    ("llama", 2, {"gradient_accumulation_steps": 2, "loss": {"kind": "chunked", "chunks": 2}}),
    # three ranks: the vocabulary's 256 rows in chunks of 86, 86 and 84 (uneven local shards)
    ("gpt2", 3, {}),
    # recompute under the policy: the checkpointed blocks re-run on the bf16 gathered parameters
    ("llama", 2, {"activation_checkpointing": {"strategy": "full"}, "optimizer": "sgd-momentum"}),
])
def test_mixed_precision_policy_ranks_equal_the_replay(family, ranks, training):
    res = run_multi_rank(mp_request(family, ranks, **training))
    assert [r.rank for r in res.ranks] == list(range(ranks))
    for r in res.ranks:
        assert r.estimate == r.measured, (r.rank, r.estimate, r.measured)
    assert res.first_step_estimate == res.first_step_measured
    assert res.estimate == res.measured


def _body(family: str, **par) -> dict:
    return {"model": tiny(family),
            "training": {"precision": "mixed-bf16", "sequence_length": 32, "micro_batch_size": 2,
                         "optimizer": "adamw"},
            "parallelism": {"data_parallel": 2, "zero_stage": 3, **par}}


def _memory(client: TestClient, family: str, **par):
    return client.post("/v1/memory", json=_body(family, **par))


@pytest.fixture(scope="module")
def client():
    from service.app import create_app

    with TestClient(create_app()) as c:
        yield c


def test_the_policy_keeps_fp32_shards_and_no_master_copy(client):
    """First step's peak (the optimizer step, shards only): the shards' bytes double (fp32
    instead of bf16) and the optimizer's fp32 master copy of them (dims divisible by 2: as many
    bytes as the fp32 shards) is gone, as the measured ranks above show."""
    plain = _memory(client, "gpt2").json()["first_step"]
    mp_result = _memory(client, "gpt2", fsdp_mixed_precision=True).json()
    mp = mp_result["first_step"]
    assert plain["parameters"] * 2 == mp["parameters"]
    assert plain["optimizer_states"] - mp["optimizer_states"] == mp["parameters"]
    impl = {a["name"]: a["value"] for a in mp_result["assumptions"]}["implementation"]
    assert "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)" in impl
    # the route reports the worst rank of the per-rank replay the validation compares with
    # (CUDA kernel details: the route's default device)
    est = per_rank_estimates(mp_request("gpt2"), "cuda")
    assert max((s for _, s in est), key=lambda b: b.total).model_dump() == mp_result["breakdown"]


@pytest.mark.parametrize("par,training", [
    ({"zero_stage": 2}, {}),
    ({"data_parallel": 1}, {}),
    ({}, {"precision": "bf16"}),
    ({"offload_optimizer": True}, {}),
])
def test_refused_where_it_does_not_apply(client, par, training):
    body = {"model": tiny("gpt2"),
            "training": {"precision": "mixed-bf16", **training},
            "parallelism": {"data_parallel": 2, "zero_stage": 3, "fsdp_mixed_precision": True,
                            **par}}
    r = client.post("/v1/memory", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "parallelism.fsdp_mixed_precision" in r.text
    with pytest.raises(ValidationUnsupported, match="fsdp_mixed_precision"):
        check_supported(ValidationRequest.model_validate({**body, "device": "cpu"}))


def test_zero_route_applies_the_policy_to_stage_3_only(client):
    r = client.post("/v1/zero", json=_body("gpt2", fsdp_mixed_precision=True))
    assert r.status_code == 200, r.text
    stages = r.json()["stages"]
    with_policy = [s for s in stages if "MixedPrecisionPolicy" in s["implementation"]]
    assert [(s["stage"], s["offload_optimizer"]) for s in with_policy] == [(3, False)]
    assert with_policy[0]["breakdown"] == _memory(client, "gpt2", fsdp_mixed_precision=True
                                                  ).json()["breakdown"]
    plain = [s for s in stages if s["stage"] == 2 and not s["offload_optimizer"]][0]
    assert plain["breakdown"] == _memory(client, "gpt2", zero_stage=2).json()["breakdown"]
    # bf16 all-gathers (twice: forward and backward), an fp32 reduce-scatter: the gradient part
    # of the traffic doubles against mixed-bf16's bf16 reduce-scatter (ring: psi * b * (N-1)/N)
    r = client.post("/v1/zero", json=_body("gpt2"))
    base = [s for s in r.json()["stages"] if s["stage"] == 3 and not s["offload_optimizer"]][0]
    psi = sum(_numel(s) for s in parameter_shapes(resolve_model(ModelSpec(**tiny("gpt2")))))
    assert with_policy[0]["communication_bytes_per_step"] - base["communication_bytes_per_step"] \
        == (psi * 4 - psi * 2) * (2 - 1) // 2  # fp32 minus bf16 bytes, N = 2


def test_cli_flag(capsys):
    from service.cli import main

    import json

    assert main(["estimate", "--preset", "gpt2", "--precision", "mixed-bf16", "--data-parallel",
                 "2", "--zero-stage", "3", "--fsdp-mixed-precision", "--micro-batch-size",
                 "1", "--sequence-length", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    impl = {a["name"]: a["value"] for a in out["assumptions"]}["implementation"]
    assert "MixedPrecisionPolicy" in impl
    assert main(["estimate", "--preset", "gpt2", "--precision", "bf16", "--data-parallel", "2",
                 "--zero-stage", "3", "--fsdp-mixed-precision"]) == 2
    assert "parallelism.fsdp_mixed_precision" in capsys.readouterr().err


def test_validation_job_with_the_policy(tmp_path):
    """POST /v1/validations: the job runs the ranks and reports each equal to its replay; a
    setup the option does not apply to is refused at submission, naming the field."""
    from service.app import create_app
    from service.jobs.embedded import EmbeddedWorker
    from service.settings import DeviceInfo, Settings
    from tests.jobtargets import poll

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", lease_s=30,
                        heartbeat_s=0.5, poll_s=0.1,
                        worker_device=DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30),
                        shutdown_grace_s=0)
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.jobs.get(), settings)
    worker.start()
    try:
        with TestClient(app) as c:
            body = mp_request("gpt2").model_dump(mode="json")
            bad = {**body, "parallelism": {**body["parallelism"], "zero_stage": 2}}
            r = c.post("/v1/validations", json=bad)
            assert r.status_code == 422 and "fsdp_mixed_precision" in r.text, r.text
            r = c.post("/v1/validations", json=body)
            assert r.status_code == 202, r.text
            job = poll(c, r.json()["id"], timeout_s=240)
            assert job["status"] == "succeeded", job.get("error")
            for rr in job["result"]["ranks"]:
                assert rr["estimate"] == rr["measured"], rr
    finally:
        worker.stop(15)
        app.state.jobs.close()
