"""parallelism.expert_parallel (planner/layouts/expert.py) and the MoE search of POST /v1/plan
(planner/routes/plan_moe.py).

- the closed-form routed-expert tensors equal the ``.experts.`` tensors transformers builds
  (meta device), for every MoE family and the MoE presets (exact);
- the composition's arithmetic equals hand counts of the small configs (exact, to the byte);
- expert_parallel = 1 is the existing one-device estimate, unchanged;
- bad layouts are 422s naming parallelism.expert_parallel (or the field that is wrong);
- /v1/plan searches ep for an MoE preset and each layout's peak is /v1/memory's for it; the
  all-to-all term equals the stated formula; dense models keep ep = 1.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from planner.catalog.hf_config import expert_tensor_numels, normalize, num_experts
from planner.catalog.presets import hf_presets
from planner.catalog.specs import ParallelSpec, TrainingSpec
from planner.layouts import expert
from service.app import create_app
from service.settings import Settings

pytest.importorskip("transformers")

# the small configs of tests/test_hf_models.py (each family's sparse/dense block rules exercised)
MIXTRAL = {"model_type": "mixtral", "hidden_size": 48, "intermediate_size": 80,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 101}
QWEN2_MOE = {"model_type": "qwen2_moe", "hidden_size": 48, "intermediate_size": 80,
             "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2,
             "mlp_only_layers": [3], "vocab_size": 101}
QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 48, "intermediate_size": 80,
             "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "num_experts": 6,
             "num_experts_per_tok": 2, "mlp_only_layers": [1], "vocab_size": 101}
TR = {"implementation": "transformers", "precision": "fp32", "micro_batch_size": 2,
      "sequence_length": 16}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("ep") / "jobs.db"
    # traces on a shared CPU: the work limit is a service setting, not what is tested here
    app = create_app(Settings(database_url=f"sqlite:///{db}", estimate_deadline_s=300))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.jobs.close()


def _built_expert_numels(config: dict) -> list[int]:
    import torch
    import transformers

    d = dict(config)
    conf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    return sorted(p.numel() for n, p in model.named_parameters() if ".experts." in n)


@pytest.mark.parametrize("config", [MIXTRAL, QWEN2_MOE, QWEN3_MOE, "mixtral-8x7b",
                                    "qwen1.5-moe-a2.7b", "qwen3-30b-a3b"])
def test_expert_tensors_equal_the_built_model(config):
    cfg = hf_presets()[config] if isinstance(config, str) else config
    got = expert_tensor_numels(normalize(cfg))
    assert sorted(got) == _built_expert_numels(normalize(cfg, fill=False))
    assert len(got) > 0


def test_expert_tensors_hand_count():
    # mixtral: 2 blocks x (gate_up 4*2*80*48 + down 4*48*80); qwen2_moe: blocks 1 (sparse step 2,
    # block 3 in mlp_only_layers): 6*2*24*48 + 6*48*24
    assert sum(expert_tensor_numels(normalize(MIXTRAL))) == 2 * 4 * 3 * 80 * 48 == 92160
    assert expert_tensor_numels(normalize(QWEN2_MOE)) == [6 * 2 * 24 * 48, 6 * 48 * 24]
    assert num_experts(normalize({"model_type": "llama", "hidden_size": 64,
                                  "num_attention_heads": 4, "vocab_size": 100,
                                  "num_hidden_layers": 2})) == 0


def test_composition_arithmetic_by_hand():
    cfg = normalize(MIXTRAL)
    tr = TrainingSpec(**TR)  # fp32 AdamW foreach: 4-byte parameters and gradients, 2 states
    bd = {"parameters": 1000_000, "gradients": 900_000, "optimizer_states": 2000_000,
          "activations": 5000, "temporaries": 7000}
    bd["total"] = sum(bd.values())
    x = 92160
    for ep in (2, 4):
        gone = x * (ep - 1) // ep * 4
        opt = expert.compose(cfg, tr, ep, "optimizer", bd)
        assert opt["parameters"] == bd["parameters"] - gone
        assert opt["gradients"] == bd["gradients"] - gone
        # AdamW: exp_avg and exp_avg_sq of the experts' share; the per-tensor step scalars cancel
        assert opt["optimizer_states"] == bd["optimizer_states"] - 2 * gone
        assert opt["temporaries"] == bd["temporaries"] and opt["activations"] == 5000
        fwd = expert.compose(cfg, tr, ep, "forward", bd)
        assert fwd["gradients"] == bd["gradients"]
        # one block's all-to-all receive buffer: b*s*k*h*4 = 2*16*2*48*4
        assert fwd["temporaries"] == bd["temporaries"] + 12288
        assert fwd["total"] == bd["total"] - 3 * gone + 12288
        # a DDP rank's trace: its buckets hold the experts' gradients in every phase
        for phase in ("forward", "backward"):
            ddp = expert.compose(cfg, tr, ep, phase, bd, ddp=True)
            assert ddp["gradients"] == bd["gradients"] - gone
            assert ddp["total"] == bd["total"] - 4 * gone + 12288
    assert expert.compose(cfg, tr, 1, "forward", bd) == bd


def test_ep1_is_the_one_device_estimate(client):
    from planner.hf.estimate import estimate

    body = {"model": {"hf_config": MIXTRAL}, "training": TR}
    r0 = client.post("/v1/memory", json=body)
    r1 = client.post("/v1/memory", json={**body, "parallelism": {"expert_parallel": 1}})
    assert r0.status_code == r1.status_code == 200, r0.text
    assert r0.json()["breakdown"] == r1.json()["breakdown"]
    est = estimate(normalize(MIXTRAL, fill=False), TrainingSpec(**TR))
    assert r0.json()["breakdown"] == est.steady.breakdown
    assert r0.json()["first_step"] == est.first.breakdown
    moe = r0.json()["moe"]
    assert moe["expert_parameters"] == 92160 * 4 and moe["experts_per_device"] == 4
    assert moe["expert_parameters"] + moe["dense_parameters"] == est.steady_phases[
        "optimizer"].breakdown["parameters"]


# (config, experts, routed-expert numel by hand, ep): mixtral 2 sparse blocks x 4 x 3*80*48;
# qwen2_moe only block 1 sparse (step 2, block 3 dense) 6 x 3*24*48; qwen3_moe blocks 0 and 2
@pytest.mark.parametrize("config,E,x,ep", [
    (MIXTRAL, 4, 92160, 2), (MIXTRAL, 4, 92160, 4), (QWEN2_MOE, 6, 20736, 3),
    (QWEN3_MOE, 6, 41472, 6)])
def test_memory_with_ep_composes_the_traced_phases(client, config, E, x, ep):
    from planner.hf.estimate import estimate

    # data_parallel E > 1: one DDP rank traced (its buckets hold every gradient in every phase),
    # with the attention kernels CUDA runs (the service estimates for a GPU)
    est = estimate(normalize(config, fill=False), TrainingSpec(**TR), ddp=E, device="cuda")
    r = client.post("/v1/memory", json={"model": {"hf_config": config}, "training": TR,
                                        "parallelism": {"data_parallel": E,
                                                        "expert_parallel": ep}})
    assert r.status_code == 200, r.text
    j = r.json()
    gone = x * (ep - 1) // ep * 4
    composed = {}
    for name, p in est.steady_phases.items():
        b = dict(p.breakdown)
        b["parameters"] -= gone
        b["optimizer_states"] -= 2 * gone
        b["gradients"] -= gone  # the rank's buckets hold its experts' share, every phase
        if name != "optimizer":
            b["temporaries"] += 2 * 16 * 2 * 48 * 4
        b["total"] = sum(v for k, v in b.items() if k != "total")
        composed[name] = b
    top = max(composed, key=lambda n: composed[n]["total"])
    assert j["breakdown"] == composed[top] and j["peak_phase"].startswith(top)
    assert j["first_step"] is None
    assert j["moe"]["experts_per_device"] == E // ep
    assert j["moe"]["expert_gradients"] == x // ep * 4
    names = {a["name"] for a in j["assumptions"]}
    assert {"expert_parallel_routing", "expert_parallel_dispatch", "expert_parallel_gradients",
            "data_parallel_ddp"} <= names


@pytest.mark.parametrize("model,training,par,field", [
    ({"preset": "llama-2-7b"}, {}, {"data_parallel": 2, "expert_parallel": 2},
     "parallelism.expert_parallel"),
    ({"hf_config": MIXTRAL}, TR, {"data_parallel": 3, "expert_parallel": 3},
     "parallelism.expert_parallel"),  # 3 does not divide 4 experts
    ({"hf_config": MIXTRAL}, TR, {"data_parallel": 2, "expert_parallel": 4},
     "parallelism.expert_parallel"),  # 4 does not divide data_parallel 2
    ({"hf_config": MIXTRAL}, TR, {"expert_parallel": 2},
     "parallelism.expert_parallel"),  # data_parallel 1
    ({"hf_config": MIXTRAL}, TR, {"data_parallel": 2, "expert_parallel": 2,
                                  "tensor_parallel": 2}, "parallelism"),
    ({"hf_config": MIXTRAL}, TR, {"data_parallel": 2, "expert_parallel": 2, "zero_stage": 1},
     "parallelism.zero_stage"),  # MoE models: DDP only
    ({"hf_config": MIXTRAL}, {}, {"data_parallel": 2, "expert_parallel": 2},
     "training.implementation"),  # the reference step does not build MoE models
    ({"hf_config": MIXTRAL}, TR, {"expert_parallel": 0}, "parallelism.expert_parallel"),
])
def test_bad_layouts_are_422_naming_the_field(client, model, training, par, field):
    r = client.post("/v1/memory", json={"model": model, "training": training,
                                        "parallelism": par})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    names = [p["name"] for p in r.json()["invalid-params"]]
    assert any(n.endswith(field) and not n.endswith(field + "_parallel") for n in names), names


def test_validate_unit():
    expert.validate(None, ParallelSpec())  # ep = 1: nothing to check
    with pytest.raises(Exception, match="dense"):
        expert.validate(None, ParallelSpec(data_parallel=2, expert_parallel=2))


def test_plan_searches_ep_for_an_moe_preset(client):
    req = {"model": {"preset": "qwen1.5-moe-a2.7b"},
           "training": {"global_batch_sequences": 8, "sequence_length": 64, "precision": "bf16",
                        "max_micro_batch_size": 1, "checkpoint_strategies": ["full"]},
           "cluster": {"gpu": "h200-141gb", "num_gpus": 8}}
    r = client.post("/v1/plan", json=req)
    assert r.status_code == 200, r.text
    c = r.json()["clusters"][0]
    eps = sorted({lay["expert_parallel"] for lay in c["layouts"]})
    assert eps and max(eps) > 1, eps
    # 60 experts, 8 ranks: ep in {1, 2, 4} (divisors of both); each peak is /v1/memory's
    assert set(eps) <= {1, 2, 4}
    for lay in c["layouts"]:
        m = client.post("/v1/memory", json={
            "model": req["model"], "parallelism": {"data_parallel": 8,
                                                   "expert_parallel": lay["expert_parallel"]},
            "training": {"implementation": "transformers", "precision": "bf16",
                         "micro_batch_size": 1, "sequence_length": 64,
                         "gradient_accumulation_steps": 1,
                         "activation_checkpointing": {"strategy": "full"}}})
        assert m.status_code == 200, m.text
        assert lay["peak_bytes"] == m.json()["breakdown"]["total"]
        ep = lay["expert_parallel"]
        # the all-to-all per sparse block and micro-batch: b*s*k*h*2 bytes, (ep-1)/ep crossing,
        # 4 times (dispatch and combine, forward and backward) + 2 in the recomputed forward,
        # over the intra-node link (8 GPUs in one node)
        cfg = normalize(hf_presets()["qwen1.5-moe-a2.7b"])
        sparse = len(expert_tensor_numels(cfg)) // 2
        k, h = cfg["num_experts_per_tok"], cfg["hidden_size"]
        intra = float(next(a["value"] for a in r.json()["assumptions"]
                           if a["name"] == "intra_node_bytes_per_s"))
        want = sparse * 6 * 64 * k * h * 2 * (ep - 1) / ep / intra
        assert lay["time"]["expert_parallel_s"] == pytest.approx(want, rel=1e-3)
    # its compute is the FLOPs alone, and the answer says so
    named = {a["name"]: a["value"] for a in r.json()["assumptions"]}
    assert named["memory_bound_work"] == "not priced"
    # the larger ep holds fewer experts' states: lower peak
    by_ep = {lay["expert_parallel"]: lay["peak_bytes"] for lay in c["layouts"]}
    assert by_ep[max(by_ep)] < by_ep.get(1, float("inf"))


def test_plan_keeps_dense_models_at_ep1(client):
    r = client.post("/v1/plan", json={
        "model": {"preset": "gpt2"},
        "training": {"global_batch_sequences": 8, "sequence_length": 128,
                     "max_micro_batch_size": 2, "checkpoint_strategies": ["none"]},
        "cluster": {"gpu": "h100-80gb", "num_gpus": 2}})
    assert r.status_code == 200, r.text
    lays = r.json()["clusters"][0]["layouts"]
    assert lays and all(lay["expert_parallel"] == 1 and lay["time"]["expert_parallel_s"] == 0
                        for lay in lays)


def test_plan_moe_refuses_what_the_transformers_step_does_not_run(client):
    base = {"model": {"hf_config": MIXTRAL},
            "training": {"global_batch_sequences": 4, "sequence_length": 16},
            "cluster": {"gpu": "h100-80gb", "num_gpus": 4}}
    # every precision is run (the default mixed-bf16 too: planner/hf/precision.py)
    from planner.catalog.plan_specs import PlanRequest
    from planner.routes.plan_moe import training_spec

    for prec in ("fp32", "amp-bf16", "amp-fp16", "bf16", "mixed-bf16", "mixed-fp16"):
        req = PlanRequest(**{**base, "training": {**base["training"], "precision": prec}})
        assert training_spec(req, 1, 4, "none").precision == prec
    r = client.post("/v1/plan", json={**base, "training": {
        **base["training"], "precision": "fp32", "checkpoint_strategies": ["selective"]}})
    assert r.status_code == 422, r.text
    assert any(p["name"].endswith("training.checkpoint_strategies")
               for p in r.json()["invalid-params"])


def test_cli_expert_parallel(tmp_path, capsys):
    import json

    from service.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(MIXTRAL))
    args = ["estimate", "--hf-config", str(path), "--implementation", "transformers",
            "--precision", "fp32", "--micro-batch-size", "2", "--sequence-length", "16",
            "--data-parallel", "4", "--json"]
    assert main(args + ["--expert-parallel", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["moe"]["experts_per_device"] == 2
    assert main(args + ["--expert-parallel", "3"]) != 0  # 3 does not divide 4 experts
    assert "parallelism.expert_parallel" in capsys.readouterr().err


def test_other_routes_refuse_a_dense_models_expert_parallel(client):
    setup = {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 1,
                                                        "sequence_length": 128},
             "parallelism": {"data_parallel": 2, "expert_parallel": 2,
                             "pipeline_parallel": 2},
             "hardware": {"gpu": "h100-80gb"}}
    for route, body in (("/v1/zero", setup), ("/v1/pipeline", {"setup": setup,
                                                               "microbatches": 4})):
        r = client.post(route, json=body)
        assert r.status_code == 422, (route, r.text)
        assert any(p["name"].endswith("parallelism.expert_parallel")
                   for p in r.json()["invalid-params"]), (route, r.text)


def test_plan_cli_names_the_expert_parallel_degree():
    from types import SimpleNamespace

    from service.plan_cli import layout_name

    lay = SimpleNamespace(data_parallel=8, tensor_parallel=1, pipeline_parallel=1,
                          virtual_pipeline_stages=1, expert_parallel=4, zero_stage=0,
                          offload_optimizer=False, offload_parameters=False,
                          activation_checkpointing="full", micro_batch_size=1,
                          gradient_accumulation_steps=1, loss="standard")
    assert layout_name(lay) == "dp8 tp1 pp1 ep4 z0 ckpt=full b1x1"
    assert "ep" not in layout_name(SimpleNamespace(**{**vars(lay), "expert_parallel": 1}))
