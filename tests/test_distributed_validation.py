"""Multi-rank validation: real torchrun ranks (gloo on CPU) under DDP and ZeRO 1/2/3, every rank's
measured breakdown against the planner's per-rank replay (planner/layouts/data_parallel.py)."""

from __future__ import annotations


import pytest
from fastapi.testclient import TestClient

from planner.catalog.presets import resolve_model
from planner.routes.memory import estimate_memory
from planner.layouts.parallel_ranks import simulate_rank
from planner.catalog.specs import ValidationRequest
from service.validation.distributed import run_multi_rank
from service.validation.runner import ValidationUnsupported, check_supported
from tests.jobtargets import poll

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")


def tiny(family: str) -> dict:
    m = {"family": family, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256,
         "max_sequence_length": 64}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


def request(family: str, zero: int, ranks: int = 2, precision: str = "fp32", **par) -> ValidationRequest:
    return ValidationRequest.model_validate({
        "model": tiny(family),
        "training": {"precision": precision, "sequence_length": 32, "micro_batch_size": 2,
                     "optimizer": "adamw"},
        "parallelism": {"data_parallel": ranks, "zero_stage": zero, **par},
        "device": "cpu", "steps": 4, "timeout_s": 300})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_two_ranks_match_the_replay(family, zero):
    res = run_multi_rank(request(family, zero))
    assert res.ranks is not None and [r.rank for r in res.ranks] == [0, 1]
    assert "2 ranks (gloo)" in res.device
    for r in res.ranks:
        # The goal: every rank's total within 2%. DDP and ZeroRedundancyOptimizer match to the
        # byte in every category. Under FSDP2 on gloo a collective's temporary is freed by gloo's
        # worker thread at a moment that varies from run to run, which can move the measured
        # peak to a neighbouring op (same total within the goal, another category split), so
        # stages 2 and 3 are held to the total only.
        assert abs(r.relative_error.total) <= 0.02
        if zero <= 1:
            for c in CATS:
                assert getattr(r.estimate, c) == getattr(r.measured, c), (r.rank, c)
    worst = next(r for r in res.ranks if r.rank == res.worst_rank)
    assert res.estimate == worst.estimate == max(res.ranks, key=lambda r: r.estimate.total).estimate
    worst = next(r for r in res.ranks if r.rank == res.worst_measured_rank)
    assert res.measured == worst.measured == max(res.ranks, key=lambda r: r.measured.total).measured
    if zero <= 1:
        assert res.first_step_estimate == res.first_step_measured
    if zero >= 2:  # sharded: the gradients of step 2 are gone by the peak or sharded
        assert res.measured.parameters < res.ranks[0].measured.total


@pytest.mark.parametrize("zero,ranks,family,precision", [(1, 4, "llama", "amp-bf16"),
                                                        (3, 2, "gpt2", "fp32")])
def test_lora_ranks_match_the_replay(zero, ranks, family, precision):
    """LoRA under DDP, ZeroRedundancyOptimizer and FSDP2: buckets, optimizer shards and
    reduce-scatters cover the adapters only (ZeRO-1 partitions the trainable tensors, unevenly
    over 4 ranks; FSDP2 shards and gathers the frozen base too); every rank exact (measured; for
    FSDP2 the 2% goal is what the other FSDP2 tests hold, gloo's timing can move the peak). Every
    stage with LoRA, every precision and checkpointing: benchmarks/accuracy_distributed.py
    --extras."""
    req = request(family, zero, ranks, precision)
    body = req.model_dump()
    body["training"]["lora"] = {"rank": 4}
    req = ValidationRequest.model_validate(body)
    res = run_multi_rank(req)
    assert [r.rank for r in res.ranks] == list(range(ranks))
    for r in res.ranks:
        if zero >= 2:
            assert abs(r.relative_error.total) <= 0.02, (r.rank, r.estimate, r.measured)
        else:
            assert r.estimate == r.measured, r.rank
    if zero == 1:
        assert len({r.measured.optimizer_states for r in res.ranks}) > 1  # uneven shards
        est = estimate_memory(req, device="cpu")
        assert est.breakdown.total == max(r.estimate.total for r in res.ranks)


@pytest.mark.parametrize("zero,strategy", [(0, "full"), (2, "selective"), (3, "full")])
def test_checkpointed_ranks_match_the_replay(zero, strategy):
    """Activation checkpointing under DDP, ZeroRedundancyOptimizer and FSDP2, every rank (the
    recompute's allocations are activations, as on one device). DDP and ZeRO-1: every category
    equal to the byte (a recomputed tensor dies when the backward node that unpacked it returns,
    before the engine sums the bias gradient). FSDP2: the total within the 2% goal, as for FSDP2
    without checkpointing (gloo's worker thread frees collective temporaries at a varying
    moment); measured here: equal."""
    req = request("gpt2", zero)
    req = ValidationRequest.model_validate({**req.model_dump(), "training": {
        **req.training.model_dump(), "activation_checkpointing": {"strategy": strategy}}})
    res = run_multi_rank(req)
    for r in res.ranks:
        print(f"zero {zero} {strategy} rank {r.rank}: {r.estimate.total} est, "
              f"{r.measured.total} measured")
        if zero >= 2:
            assert abs(r.relative_error.total) <= 0.02, (r.rank, r.estimate, r.measured)
            continue
        for c in CATS:
            assert getattr(r.estimate, c) == getattr(r.measured, c), (r.rank, c, r.estimate,
                                                                      r.measured)


@pytest.mark.parametrize("zero,ranks,family,precision", [
    (0, 2, "gpt2", "mixed-bf16"), (0, 2, "llama", "amp-fp16"), (1, 4, "llama", "mixed-fp16"),
    (3, 2, "gpt2", "mixed-fp16")])
def test_precisions_match_the_replay(zero, ranks, family, precision):
    """DDP with fp32 master copies (mixed-*, static loss scale for fp16) and with GradScaler
    (amp-fp16); ZeroRedundancyOptimizer and FSDP2 with the masters of each rank's shard. Every
    rank exact in every category, first step and steady state (under FSDP2 too: the static loss
    scale's product and its gradient are replayed as on one device)."""
    res = run_multi_rank(request(family, zero, ranks, precision=precision))
    for r in res.ranks:
        assert r.estimate == r.measured, (r.rank, r.estimate, r.measured)
    assert res.first_step_estimate == res.first_step_measured


def test_zero1_shards_are_uneven_and_the_top_level_is_the_worst_rank():
    res = run_multi_rank(request("llama", 1))
    states = [r.measured.optimizer_states for r in res.ranks]
    assert states[0] != states[1]  # whole tensors per rank (ZeroRedundancyOptimizer)
    # the API's estimate for the setup is the rank with the highest peak
    est = estimate_memory(request("llama", 1), device="cpu")
    assert est.breakdown.total == max(r.estimate.total for r in res.ranks)
    # ... and the top level names it: the rank with the most state bytes, measured highest too
    assert res.estimate == est.breakdown and res.worst_rank == res.worst_measured_rank == 0
    assert res.measured == max(res.ranks, key=lambda r: r.measured.total).measured


def test_fsdp2_uneven_shards_every_rank_exact():
    """FSDP2 over 4 ranks with a vocabulary of 257 rows (GPT-2's 50,257 is odd too): the padded
    shards and flat buffers are alike on every rank, but the optimizer sees each rank's unpadded
    torch.chunk piece (65, 65, 65 and 62 rows), so rank 3's fp32 masters and Adam states are
    smaller. Every rank is replayed with its own shard and equals its measurement to the byte,
    category by category, and so does the 4 x 4 B rank map of each fully_shard call's default
    DeviceMesh. The top level: the planner's worst rank (rank 0) against the highest measured
    peak (rank 0)."""
    body = request("gpt2", 3, 4, precision="mixed-bf16").model_dump()
    body["model"]["vocab_size"] = 257
    req = ValidationRequest.model_validate(body)
    res = run_multi_rank(req)
    assert [r.rank for r in res.ranks] == [0, 1, 2, 3]
    for r in res.ranks:
        assert r.estimate == r.measured, (r.rank, r.estimate, r.measured)
    states = [r.measured.optimizer_states for r in res.ranks]
    assert states[0] == states[1] == states[2] > states[3]
    assert res.worst_rank == res.worst_measured_rank == 0
    assert res.estimate == res.measured == res.ranks[0].measured
    assert res.first_step_estimate == res.first_step_measured
    assert estimate_memory(req, device="cpu").breakdown == res.estimate


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_fsdp2_local_shard_is_torch_chunk(world_size):
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_common import (
        _chunk_with_empty,
        _get_dim_chunked_size,
    )

    from planner.layouts.sharding import fsdp_local_shard_shape

    for shape in [(257, 64), (50257, 8), (5, 3), (3, 7), (1,), (64,)]:
        chunks = _chunk_with_empty(torch.empty(shape), world_size, dim=0)
        # FSDPParam.sharded_size: the chunk's size, an empty chunk keeping the other dims
        assert [tuple(_get_dim_chunked_size(c, torch.Size(shape), 0)) for c in chunks] == [
            fsdp_local_shard_shape(shape, world_size, r) for r in range(world_size)]


def test_worst_rank_is_the_highest_estimate_and_measured_the_highest_measurement(monkeypatch):
    """The top level names the rank with the highest estimated peak (worst_rank, the rank POST
    /v1/memory reports) and the rank with the highest measured peak (worst_measured_rank), not
    the rank with the largest relative error: here rank 1's error is the larger one, but rank 0
    peaks higher in both."""
    import service.validation.distributed as D
    from planner.catalog.specs import Breakdown

    def bd(total: int) -> Breakdown:
        return Breakdown(parameters=total - 100, gradients=0, optimizer_states=0, activations=100,
                         temporaries=0, total=total)

    est = {0: 1_000_000, 1: 999_000, 2: 990_000}
    meas = {0: 1_000_000, 1: 998_000, 2: 1_000_500}  # rank 2 measured highest

    def fake_launch(req, timeout_s, progress=None):
        return {"world_size": 3, "ranks": [
            {"rank": k, "device": "cpu",
             "first": {"breakdown": bd(v - 10).model_dump(), "op": "f", "phase": "forward"},
             "steady": {"breakdown": bd(v).model_dump(), "op": f"op{k}", "phase": "backward",
                        "cuda_allocated": None}} for k, v in meas.items()]}

    monkeypatch.setattr(D, "launch_ranks", fake_launch)
    monkeypatch.setattr(D, "per_rank_estimates", lambda req, device: [
        (bd(v - 10), bd(v)) for v in est.values()])
    res = D.run_multi_rank(request("gpt2", 3, 3))
    assert res.worst_rank == 0 and res.estimate == bd(1_000_000)
    assert res.first_step_estimate == bd(1_000_000 - 10)
    assert res.worst_measured_rank == 2 and res.measured == bd(1_000_500)
    assert res.first_step_measured == bd(1_000_500 - 10) and res.peak_op == "op2"
    assert res.relative_error.total == pytest.approx(-500 / 1_000_500)
    # without rank 2, rank 1 has the largest relative error but rank 0 the highest peaks
    del meas[2]
    est.pop(2)
    res = D.run_multi_rank(request("gpt2", 3, 2))
    errs = {r.rank: abs(r.relative_error.total) for r in res.ranks}
    assert errs[1] > errs[0]
    assert res.worst_rank == res.worst_measured_rank == 0 and res.relative_error.total == 0


def test_replay_of_zero3_frees_what_zero2_keeps():
    model = resolve_model(request("gpt2", 2).model)
    tr = request("gpt2", 2).training
    z2 = simulate_rank(model, tr, request("gpt2", 2).parallelism, 0, "cpu").steady
    z3 = simulate_rank(model, tr, request("gpt2", 3).parallelism, 0, "cpu").steady
    assert z3.total < z2.total
    assert z3.as_dict()["parameters"] < z2.as_dict()["parameters"]


@pytest.mark.parametrize("change,reason", [
    ({"parallelism": {"data_parallel": 2, "tensor_parallel": 2}}, "tensor_parallel"),
    ({"parallelism": {"pipeline_parallel": 2}}, "pipeline_parallel"),
    ({"parallelism": {"data_parallel": 2}, "mode": "traced"}, "mode 'real'"),
    ({"parallelism": {"data_parallel": 2, "zero_stage": 1},
      "training": {"precision": "amp-fp16"}}, "precision"),
    ({"parallelism": {"zero_stage": 3}}, "data_parallel > 1"),
    ({"parallelism": {"data_parallel": 2}, "training": {"lora": {"rank": 4, "base_dtype": "nf4"}}},
     "base_dtype"),
])
def test_refusals_name_the_reason(change, reason):
    body = {"model": tiny("gpt2"), "device": "cpu", **change}
    with pytest.raises(ValidationUnsupported, match=reason):
        check_supported(ValidationRequest.model_validate(body))


def test_zero3_two_ranks_through_the_api(tmp_path):
    from service.app import create_app
    from service.jobs.embedded import EmbeddedWorker
    from service.settings import DeviceInfo, Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'jobs.db'}", lease_s=30,
                        heartbeat_s=0.5, poll_s=0.1,
                        worker_device=DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30),
                        shutdown_grace_s=0)
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.jobs.get(), settings)
    worker.start()
    try:
        with TestClient(app) as client:
            body = request("llama", 3).model_dump(mode="json")
            r = client.post("/v1/validations", json=body)
            assert r.status_code == 202, r.text
            job = poll(client, r.json()["id"], timeout_s=240)
            assert job["status"] == "succeeded", job.get("error")
            res = job["result"]
            assert [r["rank"] for r in res["ranks"]] == [0, 1]
            assert res["worst_rank"] in (0, 1)
            for rr in res["ranks"]:
                assert abs(rr["relative_error"]["total"]) <= 0.02
    finally:
        worker.stop(15)
        app.state.jobs.close()


def test_zero_route_names_implementations_and_communication():
    from service.app import create_app

    with TestClient(create_app()) as client:
        r = client.post("/v1/zero", json={
            "model": tiny("llama"),
            "training": {"precision": "fp32"}, "parallelism": {"data_parallel": 4}})
        assert r.status_code == 200, r.text
        stages = r.json()["stages"][:4]
        impl = [s["implementation"] for s in stages]
        assert "DistributedDataParallel" in impl[0]
        assert "ZeroRedundancyOptimizer" in impl[1]
        assert "reshard_after_forward=False" in impl[2]
        assert "fully_shard" in impl[3]
        comm = [s["communication_bytes_per_step"] for s in stages]
        # ZeRO paper §7: stages 0 and 2 move 2Ψ per rank, stage 3 1.5x that (3Ψ); the torch
        # ZeroRedundancyOptimizer adds a broadcast of the updated parameters (3Ψ, stated in notes)
        assert comm[2] == comm[0]
        assert comm[3] * 2 == comm[0] * 3
        assert comm[1] * 2 == comm[0] * 3
        # bare parameter count: the paper's arithmetic, stage 3 = 1.5x stages 0-2
        r = client.post("/v1/zero", json={"model": {"num_parameters": 10**9},
                                           "parallelism": {"data_parallel": 8}})
        comm = [s["communication_bytes_per_step"] for s in r.json()["stages"][:4]]
        assert comm[0] == comm[1] == comm[2] and comm[3] * 2 == comm[0] * 3
