"""Model presets and GPUs."""

from fastapi import APIRouter

from planner.catalog.presets import GPU, gpus, hf_preset_models, model_presets
from planner.catalog.specs import ResolvedModel
from service.errors import ProblemRoute

router = APIRouter(prefix="/v1", tags=["catalog"], route_class=ProblemRoute)


@router.get("/models")
def list_models() -> list[ResolvedModel]:
    """Model presets usable as ``{"model": {"preset": NAME}}``, with exact parameter counts.
    Those with a ``model_type`` are Hugging Face configs (training.implementation
    'transformers'; gpt2 and llama ones also through the reference step)."""
    return list(model_presets().values()) + list(hf_preset_models().values())


@router.get("/gpus")
def list_gpus() -> list[GPU]:
    """GPU catalog: memory, peak 16-bit FLOP/s, memory bandwidth, interconnect."""
    return list(gpus().values())
