"""Models given as a Hugging Face ``config.json``: which ones, their fields, their exact size.

``model: {"hf_config": {...}}`` carries the contents of a config.json (no download: the client
sends the JSON). This module needs neither torch nor transformers:

- ``normalize`` checks the ``model_type`` and every field against the families memplan supports
  (``data/hf_families.json``: each family's config-class fields and defaults as transformers
  5.x writes them, ``scripts/hf_families.py`` regenerates it) and returns the config with the
  family's defaults filled in. An unsupported type or field raises ``HFConfigError``, which the
  API answers as a 422 naming it and listing what is supported.
- ``count_parameters`` is the exact parameter count, a closed form per family
  (tests/test_hf_models.py holds it equal to ``sum(p.numel())`` of the model transformers builds,
  for every family and preset).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from planner.catalog.errors import PlanningError

# Fields every config.json may carry that change nothing in a training step's memory (or that
# transformers fills in itself): accepted for every family.
COMMON_FIELDS = frozenset({
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "initializer_range", "return_dict", "output_hidden_states", "output_attentions",
    "problem_type", "id2label", "label2id", "tokenizer_class", "task_specific_params",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "finetuning_task", "prefix", "decoder_start_token_id",
    "tie_encoder_decoder", "torchscript", "use_bfloat16", "pruned_heads",
    # legacy rope fields (transformers 5.x folds them into rope_parameters): tensor sizes unchanged
    "rope_theta", "rope_scaling", "sliding_window_pattern",
})
# Fields that change the model in ways the transformers implementation here does not run.
UNSUPPORTED_FIELDS = {
    "quantization_config": "quantized checkpoints are not modelled (use training.lora.base_dtype "
                           "on the reference step)",
    "auto_map": "remote code models are not run (no network, no arbitrary code)",
}
# The layer-count field of each family (the proxy traces vary it).
LAYER_FIELD = {"gpt2": "n_layer"}


class HFConfigError(PlanningError):
    """An unsupported model_type or config field (422 naming it and listing what is supported)."""


@lru_cache(maxsize=1)
def families() -> dict[str, dict[str, Any]]:
    """model_type -> {"defaults": the family's config fields with transformers' defaults,
    "aliases": the config class's attribute_map (e.g. gpt2's hidden_size -> n_embd)}."""
    text = resources.files("planner.catalog").joinpath("data", "hf_families.json").read_text()
    return json.loads(text)["families"]


def supported_types() -> list[str]:
    return sorted(families())


def layer_field(model_type: str) -> str:
    return LAYER_FIELD.get(model_type, "num_hidden_layers")


def normalize(config: dict[str, Any], fill: bool = True) -> dict[str, Any]:
    """The config with its family's defaults filled in (``fill=False``: as given, with the
    config class's aliases resolved: what transformers builds from); raises HFConfigError
    (field named)."""
    mt = config.get("model_type")
    fams = families()
    if mt not in fams:
        raise HFConfigError(
            f"model.hf_config.model_type {mt!r} is not supported; supported model types: "
            f"{', '.join(sorted(fams))}", "model.hf_config.model_type")
    defaults, aliases = fams[mt]["defaults"], fams[mt]["aliases"]
    original, config = config, {aliases.get(k, k): v for k, v in config.items()}
    for key in config:
        if key in UNSUPPORTED_FIELDS:
            raise HFConfigError(f"model.hf_config.{key}: {UNSUPPORTED_FIELDS[key]}",
                                f"model.hf_config.{key}")
        if key not in defaults and key not in COMMON_FIELDS:
            raise HFConfigError(
                f"model.hf_config.{key} is not a field of {mt} configs that memplan supports; "
                f"supported fields: "
                f"{', '.join(sorted(set(defaults) | set(aliases) | COMMON_FIELDS))}",
                f"model.hf_config.{key}")
    given = {aliases.get(k, k): k for k in original}  # a field's name as the client wrote it
    for key, value in config.items():
        if key in defaults:
            try:
                _check_type(key, value, defaults[key])
            except HFConfigError as exc:
                name = given.get(key, key)
                raise HFConfigError(exc.detail.replace(f".{key} ", f".{name} ", 1),
                                    f"model.hf_config.{name}") from None
    out = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    out["model_type"] = mt
    _check_sizes(out)
    return out if fill else config


def _positive(cfg: dict, key: str, limit: int) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
        raise HFConfigError(f"model.hf_config.{key} must be an integer in [1, {limit}], got {v!r}",
                            f"model.hf_config.{key}")
    return v


def dims(cfg: dict[str, Any]) -> dict[str, int]:
    """The common dimensions under one set of names (gpt2 uses its own field names)."""
    if cfg["model_type"] == "gpt2":
        h, n = cfg["n_embd"], cfg["n_head"]
        return {"layers": cfg["n_layer"], "hidden": h, "heads": n, "kv_heads": n,
                "head_dim": h // n, "ffn": cfg.get("n_inner") or 4 * h,
                "vocab": cfg["vocab_size"], "positions": cfg["n_positions"]}
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or n
    return {"layers": cfg["num_hidden_layers"], "hidden": h, "heads": n, "kv_heads": kv,
            "head_dim": cfg.get("head_dim") or h // n, "ffn": cfg.get("intermediate_size") or 0,
            "vocab": cfg["vocab_size"], "positions": cfg.get("max_position_embeddings") or 0}


# Dimension fields: a positive integer (or null where transformers derives it), at most the limit.
SIZE_FIELDS = {
    "intermediate_size": 4 * 131_072, "moe_intermediate_size": 4 * 131_072,
    "shared_expert_intermediate_size": 4 * 131_072, "n_inner": 4 * 131_072,
    "num_key_value_heads": 1024, "head_dim": 131_072, "num_local_experts": 4096,
    "num_experts": 4096, "num_experts_per_tok": 4096, "decoder_sparse_step": 1024,
    "n_positions": 1_048_576, "max_position_embeddings": 1_048_576 * 16,
}


def _check_type(key: str, value: Any, default: Any) -> None:
    """A field's value has its default's JSON type (null allowed: transformers' default)."""
    if value is None:
        return
    if key in SIZE_FIELDS:
        _positive({key: value}, key, SIZE_FIELDS[key])
        return
    want = None
    if isinstance(default, bool):
        want, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        want, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        want, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        want, ok = "a string", isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise HFConfigError(f"model.hf_config.{key} must be {want}, got {value!r}",
                            f"model.hf_config.{key}")


def _check_sizes(cfg: dict[str, Any]) -> None:
    from planner.catalog.specs import MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_VOCAB

    gpt2 = cfg["model_type"] == "gpt2"
    for key, limit in ((LAYER_FIELD.get(cfg["model_type"], "num_hidden_layers"), MAX_LAYERS),
                       ("n_embd" if gpt2 else "hidden_size", MAX_HIDDEN),
                       ("n_head" if gpt2 else "num_attention_heads", MAX_HEADS),
                       ("vocab_size", MAX_VOCAB)):
        _positive(cfg, key, limit)
    d = dims(cfg)
    if gpt2 or not cfg.get("head_dim"):
        if d["hidden"] % d["heads"]:
            raise HFConfigError(f"model.hf_config: hidden size {d['hidden']} must be divisible by "
                                f"the {d['heads']} attention heads", "model.hf_config")
    if d["heads"] % d["kv_heads"]:
        raise HFConfigError(f"model.hf_config.num_key_value_heads ({d['kv_heads']}) must divide "
                            f"num_attention_heads ({d['heads']})",
                            "model.hf_config.num_key_value_heads")


def _moe_layer(cfg: dict[str, Any], i: int) -> bool:
    """Qwen2-MoE / Qwen3-MoE: is block i sparse (their decoder layers' own rule)?"""
    if i in (cfg.get("mlp_only_layers") or []):
        return False
    return _experts(cfg) > 0 and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0


def _experts(cfg: dict[str, Any]) -> int:
    return cfg.get("num_local_experts") or cfg.get("num_experts") or 0


def count_parameters(cfg: dict[str, Any]) -> int:
    """Exact ``sum(p.numel())`` of the causal-LM model transformers builds from ``cfg``
    (normalised). The module structure of each family is transformers 5.x's ``modeling_*.py``."""
    mt = cfg["model_type"]
    d = dims(cfg)
    h, V, L, n, kv, hd, I = (d["hidden"], d["vocab"], d["layers"], d["heads"], d["kv_heads"],
                             d["head_dim"], d["ffn"])
    tied = bool(cfg.get("tie_word_embeddings", False))
    head = 0 if tied else V * h
    if mt == "gpt2":  # wte, wpe; per block ln_1, c_attn, c_proj, ln_2, c_fc, c_proj; ln_f
        block = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * I + I) + (I * h + h)
        return V * h + d["positions"] * h + L * block + 2 * h + head
    q, k = n * hd, kv * hd
    if mt == "phi3":  # fused qkv_proj and gate_up_proj, no biases
        attn = h * (q + 2 * k) + q * h
    else:
        bias = bool(cfg.get("attention_bias", False)) or mt == "qwen2" or (
            mt == "qwen2_moe" and cfg.get("qkv_bias", True))
        attn = h * (q + 2 * k) + q * h + (q + 2 * k if bias else 0)
        if cfg.get("attention_bias", False) and mt not in ("qwen2", "qwen2_moe"):
            attn += h  # o_proj bias (llama, mistral, qwen3, gemma: attention_bias on every projection)
    if mt in ("qwen3", "qwen3_moe", "gemma3_text"):
        attn += 2 * hd  # q_norm, k_norm over the head dimension
    norms = 4 * h if mt in ("gemma2", "gemma3_text") else 2 * h
    dense = 3 * h * I + ((2 * I + h) if cfg.get("mlp_bias", False) else 0)
    total = V * h + h + head
    for i in range(L):
        if mt == "mixtral":
            E, I_e = cfg["num_local_experts"], I
            mlp = h * E + E * 3 * h * I_e
        elif mt in ("qwen2_moe", "qwen3_moe") and _moe_layer(cfg, i):
            E, I_e = _experts(cfg), cfg["moe_intermediate_size"]
            mlp = h * E + E * 3 * h * I_e
            if mt == "qwen2_moe":
                S = cfg["shared_expert_intermediate_size"]
                mlp += 3 * h * S + h  # shared expert and its sigmoid gate (h -> 1)
        else:
            mlp = dense
        total += attn + mlp + norms
    return total


def num_experts(cfg: dict[str, Any]) -> int:
    """Routed experts per sparse block (0: a dense model)."""
    return _experts(cfg) if cfg["model_type"] in ("mixtral", "qwen2_moe", "qwen3_moe") else 0


def expert_tensor_numels(cfg: dict[str, Any]) -> list[int]:
    """numel of each routed-expert parameter tensor of the model transformers 5.x builds from
    ``cfg`` (normalised): per sparse block the fused ``experts.gate_up_proj`` (E, 2·I_e, h) and
    ``experts.down_proj`` (E, h, I_e). The router (h -> E) and Qwen2-MoE's shared expert are
    dense: every expert-parallel rank holds them whole. Empty for a dense model."""
    E = num_experts(cfg)
    if not E:
        return []
    d = dims(cfg)
    h = d["hidden"]
    I_e = d["ffn"] if cfg["model_type"] == "mixtral" else cfg["moe_intermediate_size"]
    sparse = [i for i in range(d["layers"])
              if cfg["model_type"] == "mixtral" or _moe_layer(cfg, i)]
    return [n for _ in sparse for n in (E * 2 * I_e * h, E * h * I_e)]
