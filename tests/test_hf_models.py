"""Models from a Hugging Face config.json: exact parameter counts, presets, and what is refused.

Every count is checked two ways: against ``sum(p.numel())`` of the model transformers 5.x
builds from the same config (on the meta device: no memory), and, for the presets, against the
published figure of the model card / paper (sources in ``PUBLISHED``).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from planner.catalog.hf_config import HFConfigError, count_parameters, normalize, supported_types
from planner.catalog.presets import hf_presets, resolve_model
from planner.catalog.specs import ModelSpec
from service.app import create_app
from service.cli import main
from service.settings import Settings

# Published parameter counts (exact, as the model cards' safetensors metadata state them):
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,      # meta-llama/Llama-3.1-8B
    "llama-3.1-70b": 70_553_706_496,    # meta-llama/Llama-3.1-70B
    "llama-3.1-405b": 405_853_388_800,  # meta-llama/Llama-3.1-405B
    "llama-3.2-1b-hf": 1_235_814_400,   # meta-llama/Llama-3.2-1B
    "llama-3.2-3b-hf": 3_212_749_824,   # meta-llama/Llama-3.2-3B
    "mistral-7b-v0.1": 7_241_732_096,   # mistralai/Mistral-7B-v0.1
    "mixtral-8x7b": 46_702_792_704,     # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x22b": 140_620_634_112,   # mistralai/Mixtral-8x22B-v0.1
    "qwen2.5-7b": 7_615_616_512,        # Qwen/Qwen2.5-7B
    "qwen2.5-72b": 72_706_203_648,      # Qwen/Qwen2.5-72B
    "qwen3-0.6b": 596_049_920,          # Qwen/Qwen3-0.6B (0.6B incl. tied embedding)
    "qwen3-30b-a3b": 30_532_122_624,    # Qwen/Qwen3-30B-A3B
    "qwen1.5-moe-a2.7b": 14_315_784_192,  # Qwen/Qwen1.5-MoE-A2.7B
    "gemma-2-9b": 9_241_705_984,        # google/gemma-2-9b
    "gemma-2-27b": 27_227_128_320,      # google/gemma-2-27b
    "gemma-3-1b": 999_885_952,          # google/gemma-3-1b-pt
    "phi-3-mini": 3_821_079_552,        # microsoft/Phi-3-mini-4k-instruct
    "gpt2-xl-hf": 1_557_611_200,        # openai-community/gpt2-xl (Radford et al. 2019: 1.5B)
}

# One small config per family, with the fields that change the structure set to non-defaults
SMALL = {
    "gpt2": {"model_type": "gpt2", "n_embd": 48, "n_layer": 3, "n_head": 4, "n_positions": 64,
             "vocab_size": 101, "n_inner": 80},
    "llama": {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 101, "attention_bias": True, "mlp_bias": True, "head_dim": 16},
    "mistral": {"model_type": "mistral", "hidden_size": 48, "intermediate_size": 96,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                "vocab_size": 101, "tie_word_embeddings": True},
    "qwen2": {"model_type": "qwen2", "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 101},
    "qwen3": {"model_type": "qwen3", "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 32, "vocab_size": 101, "attention_bias": True},
    "gemma2": {"model_type": "gemma2", "hidden_size": 48, "intermediate_size": 96,
               "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 24, "vocab_size": 101},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 48, "intermediate_size": 96,
                    "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
                    "head_dim": 16, "vocab_size": 101},
    "phi3": {"model_type": "phi3", "hidden_size": 48, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 101, "pad_token_id": 0},
    "mixtral": {"model_type": "mixtral", "hidden_size": 48, "intermediate_size": 80,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 5, "num_experts_per_tok": 2, "vocab_size": 101},
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 48, "intermediate_size": 80,
                  "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2,
                  "mlp_only_layers": [3], "vocab_size": 101},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 48, "intermediate_size": 80,
                  "moe_intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 8, "num_experts": 6,
                  "num_experts_per_tok": 2, "mlp_only_layers": [1], "vocab_size": 101},
}


def _built_count(config: dict) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = dict(config)
    conf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())


def test_every_family_is_covered():
    assert sorted(SMALL) == supported_types()


@pytest.mark.parametrize("family", sorted(SMALL))
def test_closed_form_equals_the_built_model(family):
    cfg = SMALL[family]
    assert count_parameters(normalize(cfg)) == _built_count(cfg)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_counts_equal_built_model_and_published_figure(name):
    cfg = hf_presets()[name]
    resolved = resolve_model(ModelSpec(preset=name))
    assert resolved.num_parameters == PUBLISHED[name]
    assert resolved.num_parameters == _built_count(cfg)
    assert resolved.model_type == cfg["model_type"]


def test_every_hf_preset_has_a_published_count():
    assert sorted(hf_presets()) == sorted(PUBLISHED)


def test_reference_families_resolve_to_the_reference_architecture():
    m = resolve_model(ModelSpec(preset="llama-3.1-8b"))
    assert m.architecture_known and m.family == "llama" and m.num_kv_heads == 8
    biased = resolve_model(ModelSpec(hf_config=SMALL["llama"]))  # biases: not the reference
    assert not biased.architecture_known and biased.num_parameters == _built_count(SMALL["llama"])


@pytest.mark.parametrize("config, field, says", [
    ({"model_type": "t5"}, "model.hf_config.model_type", "gemma2"),
    ({**SMALL["llama"], "use_flux_capacitor": True}, "model.hf_config.use_flux_capacitor",
     "intermediate_size"),
    ({**SMALL["llama"], "quantization_config": {"bits": 4}}, "model.hf_config.quantization_config",
     "quantized"),
    ({**SMALL["llama"], "num_hidden_layers": 0}, "model.hf_config.num_hidden_layers", "[1, 1024]"),
    ({**SMALL["llama"], "num_key_value_heads": 3}, "model.hf_config.num_key_value_heads",
     "divide"),
    ({**SMALL["llama"], "intermediate_size": -3}, "model.hf_config.intermediate_size", "[1, "),
    ({**SMALL["llama"], "mlp_bias": 3}, "model.hf_config.mlp_bias", "true or false"),
    ({**SMALL["gpt2"], "n_embd": "wide"}, "model.hf_config.n_embd", "integer"),
    ({**SMALL["qwen3_moe"], "num_experts": 0}, "model.hf_config.num_experts", "[1, "),
])
def test_unsupported_type_or_field_is_named(config, field, says):
    with pytest.raises(HFConfigError) as exc:
        normalize(config)
    assert exc.value.field == field and says in exc.value.detail


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("hf") / "jobs.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    app.state.jobs.close()


def test_api_422_names_the_field_and_lists_the_supported(client):
    r = client.post("/v1/memory", json={"model": {"hf_config": {"model_type": "bert"}},
                                        "training": {"implementation": "transformers"}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["invalid-params"][0]["name"] == "body.model.hf_config.model_type"
    assert "qwen3_moe" in body["detail"] and "'bert'" in body["detail"]


@pytest.mark.parametrize("extra, field", [
    ({"rope_scaling": 5}, "body.model.hf_config"),      # transformers' own config validation
    ({"hidden_act": "nope"}, "body.model.hf_config"),   # transformers cannot build the model
    ({"head_dim": 7}, "body.model.hf_config"),
])
def test_api_what_transformers_refuses_is_a_422(client, extra, field):
    r = client.post("/v1/memory", json={"model": {"hf_config": {**SMALL["llama"], **extra}},
                                        "training": {"implementation": "transformers",
                                                     "sequence_length": 16}})
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == field


def test_api_transformers_refuses_a_chunked_loss(client):
    # the transformers model computes its own loss: a chunked loss would describe another step
    r = client.post("/v1/memory", json={"model": {"hf_config": SMALL["llama"]}, "training": {
        "implementation": "transformers", "sequence_length": 16,
        "loss": {"kind": "chunked-linear", "chunks": 4}}})
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.training.loss.kind"


def test_api_non_reference_family_needs_the_transformers_implementation(client):
    r = client.post("/v1/memory", json={"model": {"preset": "mixtral-8x7b"}})
    assert r.status_code == 422, r.text
    assert r.json()["invalid-params"][0]["name"] == "body.training.implementation"


def test_api_reference_step_answers_for_a_llama_config(client):
    r = client.post("/v1/memory", json={"model": {"preset": "llama-3.1-8b"}, "training": {
        "micro_batch_size": 1, "sequence_length": 512}})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["num_parameters"] == PUBLISHED["llama-3.1-8b"]


def test_models_catalog_lists_the_hf_presets(client):
    names = {m["name"]: m for m in client.get("/v1/models").json()}
    for name, count in PUBLISHED.items():
        assert names[name]["num_parameters"] == count


def test_cli_reads_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**hf_presets()["llama-3.1-8b"], "architectures": ["x"]}))
    assert main(["estimate", "--hf-config", str(path), "--json", "--sequence-length", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["num_parameters"] == PUBLISHED["llama-3.1-8b"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "bert"}))
    assert main(["estimate", "--hf-config", str(bad)]) == 2
    assert "bert" in capsys.readouterr().err


def test_without_the_hf_extra_the_service_starts_and_the_route_says_what_is_missing():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from fastapi.testclient import TestClient\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "app = create_app(Settings(database_url='sqlite://'))\n"
        "with TestClient(app, raise_server_exceptions=False) as c:\n"
        "    assert c.get('/v1/models').status_code == 200\n"
        "    r = c.post('/v1/memory', json={'model': {'preset': 'mixtral-8x7b'},\n"
        "               'training': {'implementation': 'transformers'}})\n"
        "    print(r.status_code, r.json()['detail'])\n"
        "    r = c.post('/v1/memory', json={'model': {'preset': 'llama-3.1-8b'}})\n"
        "    print(r.status_code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first.startswith("503 ") and "memplan[hf]" in first and "transformers" in first
    assert second == "200"  # the reference step needs no transformers
