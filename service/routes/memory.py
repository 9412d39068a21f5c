"""Per-device memory of a training setup."""

from fastapi import APIRouter, Request

from planner.catalog.presets import UnknownName
from planner.catalog.errors import PlanningError
from planner.hf.errors import ExtraMissing
from planner.routes import memory as planner_memory
from planner.catalog.specs import MemoryRequest, MemoryResult
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute
from service.estimates import ESTIMATE_LIMIT_RESPONSES, run_estimate, setup_key

router = APIRouter(prefix="/v1", tags=["memory"], route_class=ProblemRoute)


@router.post("/memory", responses={**ERROR_RESPONSES, **ESTIMATE_LIMIT_RESPONSES})
async def estimate_memory(request: MemoryRequest, http: Request) -> MemoryResult:
    """Peak bytes per device by category, where the peak falls, and the fit on a GPU."""
    return await run_estimate(http, lambda: _estimate(request), setup_key("memory", request),
                              transformers=request.training.implementation == "transformers")


def _estimate(request: MemoryRequest) -> MemoryResult:
    try:
        return planner_memory.estimate_memory(request)
    except UnknownName:
        raise
    except ExtraMissing as exc:
        raise PlanError(exc.detail, field="body.training.implementation", status=503) from exc
    except PlanningError as exc:
        raise PlanError(exc.detail, field=f"body.{exc.field}" if exc.field else None) from exc
    except ValueError as exc:  # a planner rule without a field: named from its message
        raise PlanError(str(exc)) from exc
