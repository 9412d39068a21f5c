"""Cluster layout search: which parallel layouts fit, which trains fastest."""

from fastapi import APIRouter, Request

from planner.catalog.errors import PlanningError
from planner.catalog.plan_specs import PlanRequest, PlanResult
from planner.catalog.presets import UnknownName
from planner.routes import plan_moe
from planner.routes.plan_search import plan as plan_layouts
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute
from service.estimates import ESTIMATE_LIMIT_RESPONSES, run_estimate

router = APIRouter(prefix="/v1", tags=["plan"], route_class=ProblemRoute)


@router.post("/plan", responses={**ERROR_RESPONSES, **ESTIMATE_LIMIT_RESPONSES})
async def plan_cluster(request: PlanRequest, http: Request) -> PlanResult:
    """Every data/tensor/pipeline/ZeRO/offload/checkpointing/micro-batch layout of the cluster:
    the fastest that fit (each with POST /v1/memory's per-device peak and a step time split into
    compute, exposed communication and pipeline bubble), the memory/time Pareto front, and how
    many layouts were rejected, by reason. Runs under the estimate work limit (503 past it); an
    MoE model's search traces the transformers step and has that limit instead."""
    return await run_estimate(http, lambda: _plan(request), transformers=_traces(request))


def _traces(request: PlanRequest) -> bool:
    """Whether the search traces the transformers step (MoE models: planner/routes/plan_moe.py)."""
    try:
        return plan_moe.moe_config(request) is not None
    except (UnknownName, PlanningError, ValueError):  # answered by the search itself
        return False


def _plan(request: PlanRequest) -> PlanResult:
    try:
        return plan_layouts(request)
    except UnknownName:
        raise
    except PlanningError as exc:
        raise PlanError(exc.detail, field=f"body.{exc.field}" if exc.field else None) from exc
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
