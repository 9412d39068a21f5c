"""Activation checkpoint placement."""

from fastapi import APIRouter

from planner import checkpointing as planner_checkpointing
from planner.checkpointing import CheckpointRequest, CheckpointResult, PlanningError
from service.errors import ERROR_RESPONSES, PlanError

router = APIRouter(prefix="/v1", tags=["checkpointing"])


@router.post("/checkpointing", responses=ERROR_RESPONSES)
def plan_checkpointing(request: CheckpointRequest) -> CheckpointResult:
    """Blocks to checkpoint for a named strategy, a memory budget or Revolve; peak and recompute."""
    try:
        return planner_checkpointing.plan_checkpointing(request)
    except PlanningError as exc:
        raise PlanError(exc.detail, field=exc.field) from exc
