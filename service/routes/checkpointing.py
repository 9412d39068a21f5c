"""Activation checkpoint placement."""

from fastapi import APIRouter

from planner import checkpointing as planner_checkpointing
from planner.catalog import UnknownName
from planner.checkpointing import CheckpointRequest, CheckpointResult, PlanningError
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute

router = APIRouter(prefix="/v1", tags=["checkpointing"], route_class=ProblemRoute)


@router.post("/checkpointing", responses=ERROR_RESPONSES)
def plan_checkpointing(request: CheckpointRequest) -> CheckpointResult:
    """Blocks to checkpoint for a named strategy, a memory budget or Revolve; peak and recompute."""
    try:
        return planner_checkpointing.plan_checkpointing(request)
    except UnknownName:
        raise  # 422 with the valid names (service.errors)
    except PlanningError as exc:
        raise PlanError(exc.detail, field=exc.field) from exc
    except ValueError as exc:  # a planner rule without a field: named from its message
        raise PlanError(str(exc)) from exc
