"""Pipeline schedules: makespan, bubble, per-rank figures and the timeline (JSON or SVG)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from planner.routes import pipeline as planner_pipeline
from planner.routes.pipeline import PipelineError, PipelineRequest, PipelineResult
from planner.routes.pipeline_svg import render_svg
from service.errors import ERROR_RESPONSES, PlanError, ProblemRoute
from service.estimates import ESTIMATE_LIMIT_RESPONSES, run_estimate

router = APIRouter(prefix="/v1", tags=["pipeline"], route_class=ProblemRoute)

SVG = "image/svg+xml"

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The simulated schedule: JSON by default, the timeline picture when the "
        "request sends `Accept: image/svg+xml`.",
        "content": {SVG: {"schema": {"type": "string"}}},
    },
    **ERROR_RESPONSES,
    **ESTIMATE_LIMIT_RESPONSES,
}


def _wants_svg(accept: str | None) -> bool:
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return SVG in types and "application/json" not in types[: types.index(SVG)]


@router.post("/pipeline", response_model=PipelineResult, responses=RESPONSES)
async def plan_pipeline(
    request: PipelineRequest, http: Request, accept: Annotated[str | None, Header()] = None,
) -> PipelineResult | Response:
    """Simulate a pipeline schedule: makespan, bubble fraction, per-rank busy/idle and in-flight
    micro-batches, and the per-rank timeline (SVG with `Accept: image/svg+xml`)."""
    return await run_estimate(http, lambda: _plan(request, accept))


def _plan(request: PipelineRequest, accept: str | None) -> PipelineResult | Response:
    svg = _wants_svg(accept)
    if svg and not request.include_timeline:
        request = request.model_copy(update={"include_timeline": True})
    if svg and planner_pipeline.min_timeline_events(request) > planner_pipeline.MAX_TIMELINE_EVENTS:
        # refused before the schedule is built and simulated: the picture could not be drawn
        raise PlanError(f"no picture: at least {planner_pipeline.min_timeline_events(request)} "
                        f"actions exceed the {planner_pipeline.MAX_TIMELINE_EVENTS}-event "
                        "timeline limit", field="body.microbatches")
    try:
        result = planner_pipeline.plan_pipeline(request)
    except PipelineError as e:
        raise PlanError(e.rule, field=f"body.{e.field}") from None
    if svg:
        if result.timeline is None:
            raise PlanError(f"no picture: {result.timeline_omitted}", field="body.microbatches")
        return Response(render_svg(result), media_type=SVG)
    return result
