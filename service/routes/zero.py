"""ZeRO stages side by side."""

from fastapi import APIRouter

from planner.catalog import UnknownName
from planner.specs import MemoryRequest, ZeroResult
from planner.zero import zero_stages
from service.errors import ERROR_RESPONSES, PlanError

router = APIRouter(prefix="/v1", tags=["memory"])


@router.post("/zero", responses=ERROR_RESPONSES)
def compare_zero_stages(request: MemoryRequest) -> ZeroResult:
    """The setup under ZeRO stages 0-3 and CPU offload: per-device bytes, the torch
    implementation each stage describes, and bytes each rank sends per step."""
    try:
        return zero_stages(request)
    except UnknownName:
        raise  # 422 with the valid names (service.errors)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
