"""ZeRO stages on one data-parallel rank: each is replayed as its implementation runs with world
size 1 (DDP + ZeroRedundancyOptimizer owning every tensor; FSDP2's world-size-1 path, which copies
the shards into the unsharded parameters without an all-gather buffer), and the replay equals
the step measured under ``torchrun --nproc-per-node 1`` (gloo, CPU) to the byte."""

from __future__ import annotations

import pytest

from planner.routes.memory import estimate_memory
from planner.catalog.specs import MemoryRequest, ValidationRequest
from planner.routes.zero import zero_stages

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")
LLAMA7B = {"model": {"preset": "llama-2-7b"},
           "training": {"precision": "mixed-bf16", "optimizer": "adamw", "micro_batch_size": 1,
                        "sequence_length": 4096,
                        "activation_checkpointing": {"strategy": "full"}}}


def _req(body: dict, **par) -> MemoryRequest:
    return MemoryRequest.model_validate({**body, "parallelism": par})


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_one_rank_is_replayed_not_composed(zero):
    r = estimate_memory(_req(LLAMA7B, zero_stage=zero))
    profiles = [a.value for a in r.assumptions if a.name == "profile"]
    assert profiles == ["reference step per data-parallel rank, simulated op by op"]
    assert not any(a.name == "composition" for a in r.assumptions)
    # nothing is sharded over one rank: the optimizer step's peak is stage 0's (FSDP2 adds
    # each fully_shard group's device-mesh rank map, 4 bytes)
    single = estimate_memory(_req(LLAMA7B)).breakdown
    assert r.breakdown.total - single.total == (0 if zero == 1 else 4 * (32 + 1))
    assert r.peak_phase == "optimizer: optimizer_step"


def test_zero_route_at_one_rank_names_each_implementation():
    out = zero_stages(_req(LLAMA7B))
    impl = {(s.stage, s.offload_optimizer): s.implementation for s in out.stages}
    assert "single data-parallel rank" in impl[(0, False)]
    assert "ZeroRedundancyOptimizer" in impl[(1, False)]
    assert "fully_shard" in impl[(3, False)]
    totals = [s.breakdown.total for s in out.stages if not s.offload_optimizer]
    assert max(totals) - min(totals) < 1024
    assert any("world-size-1" in n for n in out.notes)


def _tiny(family: str) -> dict:
    m = {"family": family, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256,
         "max_sequence_length": 64}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


@pytest.mark.parametrize("family,zero,training", [
    ("gpt2", 1, {}),
    ("gpt2", 2, {"gradient_accumulation_steps": 2}),
    ("llama", 3, {}),
])
def test_one_rank_equals_the_measured_step(family, zero, training):
    from service.validation.distributed import run_multi_rank

    req = ValidationRequest.model_validate({
        "model": _tiny(family),
        "training": {"precision": "fp32", "sequence_length": 32, "micro_batch_size": 2,
                     "optimizer": "adamw", **training},
        "parallelism": {"data_parallel": 1, "zero_stage": zero},
        "device": "cpu", "steps": 4, "timeout_s": 300})
    res = run_multi_rank(req)
    (rank,) = res.ranks
    for c in CATS:
        assert getattr(rank.estimate, c) == getattr(rank.measured, c), c
    assert res.first_step_estimate == res.first_step_measured
    # the route's figure is this replay
    est = estimate_memory(MemoryRequest(model=req.model, training=req.training,
                                        parallelism=req.parallelism), device="cpu")
    assert est.breakdown == rank.estimate
