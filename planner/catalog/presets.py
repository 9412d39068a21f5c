"""Model presets and the GPU catalog, loaded once from the JSON files in ``planner/catalog/data``."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict

from planner.catalog.hf_config import count_parameters as count_hf_parameters
from planner.catalog.hf_config import dims, normalize
from planner.catalog.parameters import count_parameters
from planner.catalog.specs import ModelSpec, ResolvedModel


class GPU(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    vendor: str
    memory_bytes: int
    peak_bf16_flops: float
    memory_bandwidth_bytes_per_s: float
    interconnect: str
    interconnect_bytes_per_s: float
    network_bytes_per_s: float  # scale-out (inter-node) bandwidth per GPU, one direction
    host_bytes_per_s: float  # host link (PCIe) per direction: what CPU offload moves over

    @property
    def interconnect_one_direction_bytes_per_s(self) -> float:
        """One direction of ``interconnect_bytes_per_s``. The catalog gives the vendors'
        figures, both directions together (A100: 12 NVLink 3 links of 25 GB/s each way, 600 GB/s;
        H100: 18 links, 900 GB/s; PCIe 4.0 x16: 64 GB/s). A point-to-point send uses one
        direction of the link, and a ring sends each rank's share one way while it receives the
        other: both take this figure."""
        return self.interconnect_bytes_per_s / 2


class UnknownName(ValueError):
    """A preset or GPU name not in the catalog; carries the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")
        self.kind, self.name, self.valid = kind, name, valid


def _load(name: str) -> dict:
    return json.loads(resources.files("planner.catalog").joinpath("data", name).read_text())


@lru_cache(maxsize=1)
def model_presets() -> dict[str, ResolvedModel]:
    out = {}
    for m in _load("models.json")["models"]:
        spec = ModelSpec(**{k: v for k, v in m.items() if k != "name"})
        out[m["name"]] = resolve_model(spec).model_copy(update={"name": m["name"]})
    return out


@lru_cache(maxsize=1)
def hf_presets() -> dict[str, dict]:
    """Presets given as Hugging Face config.json contents (``data/hf_presets.json``)."""
    return _load("hf_presets.json")["models"]


@lru_cache(maxsize=1)
def hf_preset_models() -> dict[str, ResolvedModel]:
    return {name: resolve_hf(cfg).model_copy(update={"name": name})
            for name, cfg in hf_presets().items()}


def hf_config_of(spec: ModelSpec, fill: bool = True) -> dict | None:
    """The Hugging Face config of an hf_config model or hf preset, validated (``fill``: with
    the family's defaults filled in; else as given, what transformers builds from); None for
    the other model forms."""
    if spec.hf_config is not None:
        return normalize(spec.hf_config, fill)
    if spec.preset is not None and spec.preset not in model_presets():
        cfg = {k.casefold(): v for k, v in hf_presets().items()}.get(spec.preset.casefold())
        return None if cfg is None else normalize(cfg, fill)
    return None


def resolve_hf(config: dict) -> ResolvedModel:
    """A ResolvedModel for a Hugging Face config: its dimensions and exact parameter count
    (planner/catalog/hf_config.py); ``family`` is set for the two the reference step runs."""
    cfg = normalize(config)
    d = dims(cfg)
    mt = cfg["model_type"]
    ref = _reference_fields(cfg)
    return ResolvedModel(
        family=mt if ref else None, num_layers=d["layers"],
        hidden_size=d["hidden"], num_heads=d["heads"], num_kv_heads=d["kv_heads"],
        ffn_hidden_size=d["ffn"] or None, vocab_size=d["vocab"],
        max_sequence_length=d["positions"] or None,
        tie_embeddings=bool(cfg.get("tie_word_embeddings")),
        num_parameters=count_hf_parameters(cfg), model_type=mt,
        # the reference step's routes see the architecture only where the reference step builds
        # this model; elsewhere the model's states (its exact count) are what they can use
        architecture_known=ref is not None)


def reference_spec(spec: ModelSpec) -> ModelSpec | None:
    """An hf_config gpt2 / llama model as the reference step's architecture fields, or None
    where the reference step does not build that model (biases, a head_dim other than h/a,
    another activation, another model_type)."""
    cfg = hf_config_of(spec)
    if cfg is None:
        return None
    fields = _reference_fields(cfg)
    return None if fields is None else ModelSpec(**fields)


def _reference_fields(cfg: dict) -> dict | None:
    mt, d = cfg["model_type"], dims(cfg)
    if mt == "gpt2":
        ok = cfg.get("activation_function") == "gelu_new"
    elif mt == "llama":
        ok = (not cfg.get("attention_bias") and not cfg.get("mlp_bias")
              and cfg.get("hidden_act") == "silu" and d["head_dim"] * d["heads"] == d["hidden"])
    else:
        ok = False
    if not ok:
        return None
    return dict(family=mt, num_layers=d["layers"], hidden_size=d["hidden"],
                num_heads=d["heads"], num_kv_heads=d["kv_heads"], ffn_hidden_size=d["ffn"],
                vocab_size=d["vocab"], max_sequence_length=d["positions"] or None,
                tie_embeddings=bool(cfg.get("tie_word_embeddings")))


@lru_cache(maxsize=1)
def gpus() -> dict[str, GPU]:
    return {g["name"]: GPU(**g) for g in _load("gpus.json")["gpus"]}


def _lookup(table: dict, kind: str, name: str):
    """``table[name]``, the name matched without regard to case ('A100-80GB' is 'a100-80gb')."""
    if name in table:
        return table[name]
    folded = {k.casefold(): v for k, v in table.items()}
    try:
        return folded[name.casefold()]
    except KeyError:
        raise UnknownName(kind, name, sorted(table)) from None


def get_gpu(name: str) -> GPU:
    return _lookup(gpus(), "gpu", name)


def resolve_model(spec: ModelSpec) -> ResolvedModel:
    """Turn any of the three model forms into a ResolvedModel with an exact parameter count."""
    if spec.hf_config is not None:
        return resolve_hf(spec.hf_config)
    if spec.preset is not None:
        if spec.preset not in model_presets():
            hf = {k.casefold(): v for k, v in hf_preset_models().items()}.get(
                spec.preset.casefold())
            if hf is not None:
                return hf
        return _lookup({**model_presets(), **hf_preset_models()}, "preset", spec.preset)
    if spec.num_parameters is not None:
        return ResolvedModel(num_parameters=spec.num_parameters, architecture_known=False)
    family = spec.family
    fields = dict(
        family=family,
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads or spec.num_heads,
        ffn_hidden_size=spec.ffn_hidden_size or (4 * spec.hidden_size if family == "gpt2" else None),
        vocab_size=spec.vocab_size,
        max_sequence_length=spec.max_sequence_length or (1024 if family == "gpt2" else 4096),
        tie_embeddings=spec.tie_embeddings if spec.tie_embeddings is not None else family == "gpt2",
    )
    if fields["ffn_hidden_size"] is None:
        # Llama's SwiGLU width: 2/3 * 4h rounded up to a multiple of 256 (Touvron et al. 2023; the
        # reference implementation's multiple_of=256).
        f = int(2 * 4 * spec.hidden_size / 3)
        fields["ffn_hidden_size"] = 256 * ((f + 255) // 256)
    probe = ResolvedModel(num_parameters=1, architecture_known=True, **fields)
    return probe.model_copy(update={"num_parameters": count_parameters(probe).total})


# Caching-allocator headroom on CUDA, reported separately from the allocated peak: PyTorch's
# allocator rounds blocks (512 B, 2 MiB segments) and fragments; max_memory_reserved() is
# typically 2-10% above max_memory_allocated() in steady training. We assume 5%.
ALLOCATOR_RESERVE_FRACTION = 0.05


def allocator_reserve(total: int, device: str) -> int:
    """The allocator headroom reported next to an allocated peak of ``total`` bytes."""
    return 0 if device == "cpu" else int(total * ALLOCATOR_RESERVE_FRACTION)
