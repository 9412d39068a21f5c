"""POST /v1/plan's search (planner/routes/plan_search.py): what it prunes never fits or is
dominated, its answer is the brute force's, and every peak it reports is /v1/memory's."""

from __future__ import annotations

import dataclasses

import pytest

from planner.catalog.plan_specs import PlanRequest
from planner.catalog.presets import allocator_reserve, get_gpu, resolve_model
from planner.catalog.specs import ActivationCheckpointing, MemoryRequest, ModelSpec, ParallelSpec, TrainingSpec
from planner.routes import plan_time
from planner.routes.memory import estimate_memory
from planner.routes.plan_search import (
    links_for,
    memory_request,
    parallel_spec,
    plan,
    state_bound,
    training_spec,
)
from planner.routes.plan_space import enumerate_layouts

@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from service.app import create_app
    with TestClient(create_app()) as c:
        yield c


SMALL = dict(
    model=dict(family="llama", num_layers=8, hidden_size=1024, num_heads=16, num_kv_heads=4,
               ffn_hidden_size=2816, vocab_size=32000),
    training=dict(global_batch_sequences=16, sequence_length=8192, max_micro_batch_size=2,
                  checkpoint_strategies=["none", "selective", "full"], train_tokens=10**9),
    cluster=dict(gpu="v100-16gb", num_gpus=8),
    constraints=dict(top_k=4, allow_offload=True, max_virtual_stages=2),
)


# the same search with the chunked-linear loss as a dimension (layouts without TP and PP)
SMALL_LOSS = {**SMALL, "training": {**SMALL["training"],
                                    "loss_kinds": ["standard", "chunked-linear"]}}


@pytest.fixture(scope="module", params=["standard", "with-loss"])
def small(request):
    req = PlanRequest.model_validate(SMALL if request.param == "standard" else SMALL_LOSS)
    return req, plan(req).clusters[0]


def test_search_equals_brute_force(small):
    """Every enumerated layout evaluated with the planner and timed exactly: the plan's ranked
    layouts are the fastest fitting ones and its Pareto front is the brute force's."""
    req, got = small
    model = resolve_model(req.model)
    gpu = get_gpu(req.cluster.gpu)
    links = links_for(req, gpu)
    rejected: dict[str, int] = {}
    everything = enumerate_layouts(req, model, 8, rejected)
    assert got.search.space_size == len(everything) + sum(rejected.values())
    rows = []
    tr0 = training_spec(req, everything[0])
    for lay in everything:
        r = estimate_memory(memory_request(req, lay, hardware=False), explain=False)
        total = r.breakdown.total
        # the exact bound is below the peak for every layout
        assert state_bound(model, tr0, parallel_spec(lay)) <= total
        t = plan_time.step_time(model, 8192, 2, 2, lay, links).step_s
        if total + allocator_reserve(total, "cuda") <= gpu.memory_bytes:
            rows.append((t, total, lay))
    assert rows and len(rows) < len(everything)  # some fit, some do not
    rows.sort(key=lambda x: x[0])
    fastest = [t for t, _, _ in rows[:req.constraints.top_k]]
    assert [pytest.approx(x.time.step_s) for x in got.layouts] == fastest
    front, best = [], None
    for t, total, _ in sorted(rows, key=lambda x: (x[1], x[0])):
        if best is None or t < best - 1e-12:
            front.append((total, t))
            best = t
    assert [(x.peak_bytes, pytest.approx(x.time.step_s)) for x in got.pareto_front] == front
    assert got.search.evaluated < len(everything)  # it did not replay every candidate


def test_reported_peaks_are_memory_routes(small, client):
    """The per-device peak of each ranked layout is the very number POST /v1/memory answers."""
    req, got = small
    for x in got.layouts + got.pareto_front[:3]:
        body = {"model": SMALL["model"],
                "training": {"precision": "mixed-bf16", "optimizer": "adamw",
                             "micro_batch_size": x.micro_batch_size, "sequence_length": 8192,
                             "gradient_accumulation_steps": x.gradient_accumulation_steps,
                             "activation_checkpointing": {"strategy": x.activation_checkpointing},
                             "loss": {"kind": x.loss, "chunks": 8}},
                "parallelism": {"data_parallel": x.data_parallel,
                                "tensor_parallel": x.tensor_parallel,
                                "pipeline_parallel": x.pipeline_parallel,
                                "virtual_pipeline_stages": x.virtual_pipeline_stages,
                                "pipeline_schedule": x.pipeline_schedule,
                                "zero_stage": x.zero_stage,
                                "offload_optimizer": x.offload_optimizer,
                                "offload_parameters": x.offload_parameters},
                "hardware": {"gpu": "v100-16gb"}}
        r = client.post("/v1/memory", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["breakdown"]["total"] == x.peak_bytes
        assert r.json()["fit"]["fits"]


def test_loss_is_a_search_dimension_where_replayed():
    req = PlanRequest.model_validate(SMALL_LOSS)
    model = resolve_model(req.model)
    everything = enumerate_layouts(req, model, 8, {})
    chunked = [lay for lay in everything if lay.loss == "chunked-linear"]
    assert chunked and all(lay.tp == lay.pp == 1 and not lay.offload_optimizer
                           for lay in chunked)
    assert len(everything) == len(enumerate_layouts(PlanRequest.model_validate(SMALL), model, 8,
                                                     {})) + len(chunked)
    # chunked-linear alone: the layouts with TP or PP have no loss kind left, and are counted
    only = PlanRequest.model_validate({**SMALL, "training": {**SMALL["training"],
                                                             "loss_kinds": ["chunked-linear"]}})
    rejected: dict[str, int] = {}
    assert len(enumerate_layouts(only, model, 8, rejected)) == len(chunked)
    assert rejected["loss_not_replayed_by_layout"] == len(everything) - 2 * len(chunked)
    # the head's forward again in backward: slower than the same layout with the standard loss
    links = links_for(req, get_gpu(req.cluster.gpu))
    lay = chunked[0]
    std = plan_time.step_time(model, 8192, 2, 2, dataclasses.replace(lay, loss="standard"), links)
    got = plan_time.step_time(model, 8192, 2, 2, lay, links)
    head = lay.ga * lay.b * 8192 * 2 * model.vocab_size * model.hidden_size / links.flops_per_s
    assert got.compute_s - std.compute_s == pytest.approx(head)
    # and it fits where the standard loss does not: the plan finds more fitting layouts
    got_loss = plan(req).clusters[0]
    assert any(x.loss == "chunked-linear" for x in got_loss.pareto_front)


def test_plan_figures_are_consistent(small):
    req, got = small
    tokens = 16 * 8192
    for x in got.layouts:
        t = x.time
        assert t.step_s == pytest.approx(t.compute_s + t.tensor_parallel_s + t.data_parallel_s
                                         + t.pipeline_p2p_s + t.offload_s + t.bubble_s)
        assert x.tokens_per_s == pytest.approx(tokens / t.step_s)
        assert x.time_to_train_s == pytest.approx(10**9 / x.tokens_per_s)
        assert x.data_parallel * x.tensor_parallel * x.pipeline_parallel == 8
        assert x.micro_batch_size * x.gradient_accumulation_steps * x.data_parallel == 16
        assert 0 < x.model_flops_utilization < 1
    s = got.search
    assert s.pruned_by_bound == s.rejected.get("model_states_exceed_memory", 0)
    assert sum(s.rejected.values()) + len(got.layouts) <= s.space_size


def test_model_states_bound_prunes_70b_on_few_gpus():
    req = PlanRequest.model_validate({
        "model": {"preset": "llama-2-70b"},
        "training": {"global_batch_sequences": 8, "sequence_length": 4096},
        "cluster": {"gpu": "a100-80gb", "num_gpus": 8}})
    got = plan(req).clusters[0]
    # 70B with Adam: 16 bytes per parameter unsharded; only sharded layouts survive the bound
    assert got.search.pruned_by_bound > 0
    assert got.search.rejected["model_states_exceed_memory"] == got.search.pruned_by_bound
    for x in got.layouts:
        assert x.zero_stage == 3 or x.tensor_parallel * x.pipeline_parallel > 1


# torchtitan docs/performance.md (Llama 2 performance numbers, FSDP2 on 64 A100 80GB, sequence
# 4096): local batch 1 runs with selective op checkpointing, local batch 2 with full
# checkpointing, and local batch 2 with selective op checkpointing runs out of memory (its
# footnote 1). Selective op maps to 5 of every 8 blocks checkpointed (tests/test_plan_time.py,
# SELECTIVE_OP_RECOMPUTE: the tensors it keeps); full is memplan's 'full'.
SELECTIVE_OP = ActivationCheckpointing(strategy="blocks", blocks=[i for i in range(80) if i % 8 < 5])


@pytest.mark.parametrize("b,ac,fits", [
    (1, SELECTIVE_OP, True),
    (2, ActivationCheckpointing(strategy="full"), True),
    (2, SELECTIVE_OP, False),
])
def test_torchtitan_llama2_70b_fit_facts(b, ac, fits):
    req = MemoryRequest(model=ModelSpec(preset="llama-2-70b"),
                        training=TrainingSpec(precision="mixed-bf16", micro_batch_size=b,
                                              sequence_length=4096, activation_checkpointing=ac),
                        parallelism=ParallelSpec(data_parallel=64, zero_stage=3),
                        hardware={"gpu": "a100-80gb"})
    assert estimate_memory(req, explain=False).fit.fits is fits


def test_plan_route_answers_and_refuses(client):
    r = client.post("/v1/plan", json=SMALL)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["clusters"][0]["layouts"] and got["assumptions"]
    names = {a["name"] for a in got["assumptions"]}
    assert {"model_flops_utilization", "collectives", "overlap"} <= names
    for body, field in [
        ({**SMALL, "cluster": {"gpu": "v100-16gb", "num_gpus": 10**6}}, "num_gpus"),
        ({**SMALL, "training": {**SMALL["training"], "max_micro_batch_size": 10**3}},
         "max_micro_batch_size"),
        ({**SMALL, "training": {"sequence_length": 8192}}, "global_batch"),
        ({**SMALL, "cluster": {"gpu": "v100-16gb"}}, "num_gpus"),
        ({**SMALL, "model": {"num_parameters": 10**9}}, "model"),
        ({**SMALL, "training": {**SMALL["training"], "loss_kinds": ["fused"]}}, "loss_kinds"),
        ({**SMALL, "training": {**SMALL["training"], "loss_kinds": ["chunked", "chunked"]}},
         "loss_kinds"),
        ({**SMALL, "training": {**SMALL["training"], "loss_chunks": 10**6}}, "loss_chunks"),
    ]:
        r = client.post("/v1/plan", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert field in r.text


def test_cluster_range_sweeps_sizes(client):
    body = {**SMALL, "cluster": {"gpu": "v100-16gb", "min_gpus": 2, "max_gpus": 8,
                                 "gpus_per_node": 2}}
    r = client.post("/v1/plan", json=body)
    assert r.status_code == 200, r.text
    assert [c["num_gpus"] for c in r.json()["clusters"]] == [2, 4, 8]


LOSS_BOUND = {"model": {"preset": "llama-3.2-1b"},
              "training": {"precision": "amp-bf16", "micro_batch_size": 8,
                           "sequence_length": 8192,
                           "activation_checkpointing": {"strategy": "full"}},
              "hardware": {"gpu": "h100-80gb"}}


LOSS_AND_CKPT = {"model": {"preset": "llama-3.2-1b"},
                 "training": {"precision": "bf16", "micro_batch_size": 1,
                              "sequence_length": 32768},
                 "hardware": {"gpu": "a100-40gb"}}


def _apply(body: dict, s: dict) -> dict:
    out = {**body, "training": {**body.get("training", {})},
           "parallelism": {**body.get("parallelism", {})}}
    for k, v in s["training"].items():
        out["training"][k] = {"strategy": v} if k == "activation_checkpointing" else v
    out["parallelism"].update(s["parallelism"])
    return out


@pytest.mark.parametrize("body", [
    # the README's first example: 125.5 GiB on an 80 GB GPU
    {"model": {"preset": "llama-2-7b"},
     "training": {"precision": "amp-bf16", "optimizer": "adamw", "micro_batch_size": 1,
                  "sequence_length": 4096, "activation_checkpointing": {"strategy": "full"}},
     "hardware": {"gpu": "h100-80gb"}},
    {"model": {"preset": "llama-2-7b"},
     "training": {"precision": "mixed-bf16", "micro_batch_size": 8, "sequence_length": 4096},
     "parallelism": {"data_parallel": 8},
     "hardware": {"gpu": "a100-80gb"}},
    # a 128k vocabulary at 8 x 8192 tokens: the logits, not the model, overflow
    LOSS_BOUND,
    # 32768 tokens: neither a checkpoint plan nor the loss alone fits, the two together do
    LOSS_AND_CKPT,
])
def test_suggestions_fit_with_the_peak_memory_gives(client, body):
    r = client.post("/v1/memory", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert not got["fit"]["fits"] and got["suggestions"]
    for s in got["suggestions"]:
        again = client.post("/v1/memory", json=_apply(body, s))
        assert again.status_code == 200, again.text
        assert again.json()["fit"]["fits"], s
        assert again.json()["breakdown"]["total"] == s["peak_bytes"], s
        assert again.json()["fit"]["headroom_bytes"] == s["headroom_bytes"]


def test_chunked_loss_suggested_where_the_layout_replays_it(client):
    got = client.post("/v1/memory", json=LOSS_BOUND).json()
    losses = [s for s in got["suggestions"] if "loss" in s["training"]]
    assert losses and losses[0]["training"]["loss"]["kind"] in ("chunked", "chunked-linear")
    both = client.post("/v1/memory", json=LOSS_AND_CKPT).json()["suggestions"]
    assert both and all(set(s["training"]) == {"activation_checkpointing", "loss"} for s in both)
    # tensor parallelism takes the standard loss only (planner/routes/loss_rules.py)
    tp = {**LOSS_BOUND, "training": {**LOSS_BOUND["training"], "micro_batch_size": 16},
          "parallelism": {"tensor_parallel": 2}}
    r = client.post("/v1/memory", json=tp)
    assert r.status_code == 200, r.text
    assert not r.json()["fit"]["fits"]
    assert r.json()["suggestions"]
    assert all("loss" not in s["training"] for s in r.json()["suggestions"])


def test_no_suggestions_when_it_fits(client):
    r = client.post("/v1/memory", json={"model": {"preset": "gpt2"},
                                        "hardware": {"gpu": "h100-80gb"}})
    assert r.json()["fit"]["fits"] and r.json()["suggestions"] == []


@pytest.mark.parametrize("par", [{}, {"data_parallel": 4, "zero_stage": 3},
                                 {"data_parallel": 2, "zero_stage": 1},
                                 {"tensor_parallel": 2, "pipeline_parallel": 2}])
def test_accumulation_counts_from_two_share_one_replay(par):
    """A step replays its first two micro-batches (micro-batch 2+ alike), so the step cache keys
    every count >= 2 as 2: each count's estimate equals its own replay from empty caches."""
    from planner.routes.memory import clear_caches
    from planner.step.simulate import replay_only

    def est(ga: int) -> int:
        req = MemoryRequest(model=ModelSpec(family="llama", num_layers=2, hidden_size=64,
                                            num_heads=4, vocab_size=128),
                            training=TrainingSpec(micro_batch_size=2, sequence_length=32,
                                                  gradient_accumulation_steps=ga),
                            parallelism=ParallelSpec(**par))
        return estimate_memory(req, device="cpu", explain=False).breakdown

    shared = [est(ga) for ga in (2, 3, 8, 1)]
    own = []
    for ga in (2, 3, 8, 1):
        clear_caches()
        with replay_only():
            own.append(est(ga))
    assert shared == own
    assert shared[0] == shared[1] == shared[2]


def test_search_stops_at_the_work_limit():
    """A search past the request's work limit stops (the service answers 503), never hangs."""
    import time

    from planner.machine.deadline import WorkLimit, WorkLimitExceeded, work_limit
    from planner.routes.memory import clear_caches
    clear_caches()
    req = PlanRequest.model_validate({**SMALL, "cluster": {"gpu": "v100-16gb", "num_gpus": 64}})
    t0 = time.perf_counter()
    # a limit already spent: the search's first check stops it, however warm this process's
    # caches are (a 50 ms limit let a warm search finish first)
    with pytest.raises(WorkLimitExceeded), work_limit(WorkLimit(0.0)):
        plan(req)
    assert time.perf_counter() - t0 < 5


# an MoE model of Mixtral's shape (8 experts, top-2) with 4 blocks: model states of 1.8 B
# parameters, so the v100-16gb holds it only with its experts spread (ep >= 2); at sequence 6144
# the search prunes 4 layouts on their floors, traces 12, of which 4 are over memory
MOE = {
    "model": {"hf_config": {"model_type": "mixtral", "hidden_size": 2048,
                            "intermediate_size": 8192, "num_hidden_layers": 4,
                            "num_attention_heads": 16, "num_key_value_heads": 4,
                            "num_local_experts": 8, "num_experts_per_tok": 2,
                            "vocab_size": 32000}},
    "training": {"global_batch_sequences": 16, "sequence_length": 6144, "precision": "bf16",
                 "max_micro_batch_size": 2, "checkpoint_strategies": ["none", "full"]},
    "cluster": {"gpu": "v100-16gb", "num_gpus": 8},
    "constraints": {"top_k": 100},
}


def test_moe_search_prunes_on_floors_and_keeps_every_layout_that_fits(client):
    """The MoE search rejects layouts on their peak floor without a trace; brute force (every
    layout's /v1/memory peak) finds no fitting layout among them, and the search's layouts are
    exactly the fitting ones, each peak the one /v1/memory answers."""
    pytest.importorskip("transformers")
    from planner.routes import plan_moe

    req = PlanRequest.model_validate(MOE)
    got = plan(req).clusters[0]
    s = got.search
    assert s.pruned_by_bound == s.rejected["peak_floor_exceeds_memory"] > 0
    assert s.space_size == s.pruned_by_bound + s.evaluated == 2 * 2 * 4
    mem = get_gpu("v100-16gb").memory_bytes
    fits = set()
    for ck in ("none", "full"):
        for b in (1, 2):
            for ep in (1, 2, 4, 8):
                r = estimate_memory(plan_moe.memory_request(req, 8, ep, b, 2 // b, ck,
                                                            hardware=False), explain=False)
                if r.breakdown.total + r.allocator_reserve_bytes <= mem:
                    fits.add((ck, b, ep, r.breakdown.total))
    assert s.rejected["peak_exceeds_memory"] == s.evaluated - len(fits) > 0
    assert {(x.activation_checkpointing, x.micro_batch_size, x.expert_parallel, x.peak_bytes)
            for x in got.layouts} == fits
    for x in got.layouts:
        body = {"model": MOE["model"],
                "training": {"implementation": "transformers", "precision": "bf16",
                             "micro_batch_size": x.micro_batch_size, "sequence_length": 6144,
                             "gradient_accumulation_steps": x.gradient_accumulation_steps,
                             "activation_checkpointing": {"strategy": x.activation_checkpointing}},
                "parallelism": {"data_parallel": 8, "expert_parallel": x.expert_parallel},
                "hardware": {"gpu": "v100-16gb"}}
        r = client.post("/v1/memory", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["breakdown"]["total"] == x.peak_bytes
        assert r.json()["fit"]["fits"]
