"""ZeRO stages side by side."""

from fastapi import APIRouter, Request

from planner.catalog.presets import UnknownName
from planner.catalog.errors import PlanningError
from planner.catalog.specs import MemoryRequest
from planner.catalog.zero_specs import ZeroResult
from planner.routes.zero import zero_stages
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute
from service.estimates import ESTIMATE_LIMIT_RESPONSES, run_estimate, setup_key

router = APIRouter(prefix="/v1", tags=["memory"], route_class=ProblemRoute)


@router.post("/zero", responses={**ERROR_RESPONSES, **ESTIMATE_LIMIT_RESPONSES})
async def compare_zero_stages(request: MemoryRequest, http: Request) -> ZeroResult:
    """The setup under ZeRO stages 0-3 and CPU offload: per-device bytes, the torch
    implementation each stage describes, and bytes each rank sends per step."""
    return await run_estimate(http, lambda: _compare(request), setup_key("zero", request))


def _compare(request: MemoryRequest) -> ZeroResult:
    try:
        return zero_stages(request)
    except UnknownName:
        raise  # 422 with the valid names (service.errors)
    except PlanningError as exc:
        raise PlanError(exc.detail, field=f"body.{exc.field}" if exc.field else None) from exc
    except ValueError as exc:  # a planner rule without a field: named from its message
        raise PlanError(str(exc)) from exc
