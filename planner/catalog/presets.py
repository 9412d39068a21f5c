"""Model presets and the GPU catalog, loaded once from the JSON files in ``planner/catalog/data``."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from pydantic import BaseModel, ConfigDict

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
    if spec.preset is not None:
        return _lookup(model_presets(), "preset", spec.preset)
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
