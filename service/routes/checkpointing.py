"""Activation checkpoint placement."""

from fastapi import APIRouter, Request

from planner.routes import checkpointing as planner_checkpointing
from planner.catalog.presets import UnknownName
from planner.routes.checkpoint_specs import CheckpointRequest, CheckpointResult
from planner.routes.checkpointing import PlanningError
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute
from service.estimates import ESTIMATE_LIMIT_RESPONSES, run_estimate

router = APIRouter(prefix="/v1", tags=["checkpointing"], route_class=ProblemRoute)


@router.post("/checkpointing", responses={**ERROR_RESPONSES, **ESTIMATE_LIMIT_RESPONSES})
async def plan_checkpointing(request: CheckpointRequest, http: Request) -> CheckpointResult:
    """Blocks to checkpoint for a named strategy, a memory budget or Revolve; peak and recompute."""
    return await run_estimate(http, lambda: _plan(request))


def _plan(request: CheckpointRequest) -> CheckpointResult:
    try:
        return planner_checkpointing.plan_checkpointing(request)
    except UnknownName:
        raise  # 422 with the valid names (service.errors)
    except PlanningError as exc:
        raise PlanError(exc.detail, field=exc.field) from exc
    except ValueError as exc:  # a planner rule without a field: named from its message
        raise PlanError(str(exc)) from exc
