"""Liveness and readiness."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import PROBLEM, Problem, ProblemRoute, problem_response

router = APIRouter(tags=["health"], route_class=ProblemRoute)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""  # on the event loop: never waits for a thread behind estimates
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": Problem, "content": {PROBLEM: {}},
                                        "description": "The job store cannot be reached"}})
def readyz(request: Request) -> dict[str, str]:
    """The service can answer requests: its job store's database answers."""
    holder = getattr(request.app.state, "jobs", None)
    if holder is None:
        return {"status": "ready"}
    try:
        holder.get().ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means not ready
        response: JSONResponse = problem_response(
            503, "Not ready", f"job store unavailable: {type(exc).__name__}",
            headers={"Retry-After": "2"})
        return response  # type: ignore[return-value]
    return {"status": "ready", "database": holder.get().backend}
