"""The FastAPI application: one router per resource, problem+json errors, a committed contract."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute

from planner.catalog.specs import MemoryRequest
from service import errors, metrics, security
from service.estimates import EstimateFastLane, EstimateSlots, Lane
from service.jobs.store import StoreHolder
from service.routes import catalog, checkpointing, health, memory, pipeline, validations, zero
from service.settings import Settings


def _operation_id(route: APIRoute) -> str:
    # Stable, readable operationIds for generated clients: the handler's name.
    return route.name


async def _estimate_guard(request: Request) -> None:
    # On the event loop (a digest comparison, no I/O): a plain-function dependency would hand
    # every estimate to the thread pool and back before it starts.
    security.estimate_guard(request)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="memplan",
        version="0.1.0",
        summary="Memory and parallelism planner for training large models, checked against "
        "measured training steps.",
        generate_unique_id_function=_operation_id,
    )
    app.router.route_class = errors.ProblemRoute  # routes added to the app itself
    errors.install(app)
    # The job store opens on first use, so the app starts (and /readyz says why it is not ready)
    # while the database is down.
    app.state.settings = settings or Settings.from_env()
    app.state.jobs = StoreHolder(app.state.settings)
    app.state.estimates = EstimateSlots.from_settings(app.state.settings)
    for module in (health, catalog, validations, metrics):
        app.include_router(module.router)
    # Estimate routes: open unless MEMPLAN_PROTECT_ESTIMATES (job routes carry their own guard).
    for module in (memory, checkpointing, pipeline, zero):
        app.include_router(module.router, dependencies=[Depends(_estimate_guard)],
                           responses=security.ESTIMATE_AUTH_RESPONSES)
    # Inside the body-size limit and the request middleware: known-fast estimates answered there.
    app.add_middleware(EstimateFastLane, slots=app.state.estimates, settings=app.state.settings,
                       lanes=[Lane("/v1/memory", MemoryRequest, memory._estimate, "memory"),
                              Lane("/v1/zero", MemoryRequest, zero._compare, "zero")])
    security.install(app, app.state.settings)  # body-size limit, resource-cap 422s
    # Added last, so it runs first: every request, a 413 included, gets an id and is measured.
    app.add_middleware(metrics.ObservabilityMiddleware)
    return app
