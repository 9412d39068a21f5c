"""The FastAPI application: one router per resource, problem+json errors, a committed contract.

Every HTTP request first meets one plain ASGI layer, in front of all of FastAPI's own (its
telemetry, server-error and exception middlewares, routing): ``service.front.RequestFront``
(request id, body-size limit, the estimate fast lane, latency histogram, access line). The fast
lane's answers (known-fast estimates) so skip the framework entirely; every other request goes on
through FastAPI as any request does. An exception that escapes a route is still answered 500 by
FastAPI's server-error layer, which sits inside the request layer: that 500 carries the request
id and is measured as sent.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute

from planner.catalog.specs import MemoryRequest
from service import errors, metrics, security
from service.estimates import EstimateSlots, FastLane, Lane
from service.front import RequestFront
from service.jobs.store import StoreHolder
from service.routes import (
    catalog, checkpointing, health, memory, pipeline, plan, validations, web, zero,
)
from service.settings import Settings


def _operation_id(route: APIRoute) -> str:
    # Stable, readable operationIds for generated clients: the handler's name.
    return route.name


async def _estimate_guard(request: Request) -> None:
    # On the event loop (a digest comparison, no I/O): a plain-function dependency would hand
    # every estimate to the thread pool and back before it starts.
    security.estimate_guard(request)


class MemplanAPI(FastAPI):
    """FastAPI with ``front``, the request layer every HTTP request passes first (see the module
    docstring); ``framework`` is FastAPI itself, behind it."""

    front: Any = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.front is not None:
            await self.front(scope, receive, send)
        else:
            await FastAPI.__call__(self, scope, receive, send)

    async def framework(self, scope: dict, receive: Any, send: Any) -> None:
        await FastAPI.__call__(self, scope, receive, send)


def create_app(settings: Settings | None = None) -> MemplanAPI:
    app = MemplanAPI(
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
    for module in (memory, checkpointing, pipeline, zero, plan):
        app.include_router(module.router, dependencies=[Depends(_estimate_guard)],
                           responses=security.ESTIMATE_AUTH_RESPONSES)
    security.install(app)  # resource-cap and key-reuse 422s
    web.install(app)  # the page at / (out of the OpenAPI document)
    # Every request, a 413 included, gets an id and is measured; known-fast estimates are
    # answered inside the body-size limit, before FastAPI's own layers.
    lane = FastLane(slots=app.state.estimates, settings=app.state.settings,
                    lanes=[Lane("/v1/memory", MemoryRequest, memory._estimate, "memory"),
                           Lane("/v1/zero", MemoryRequest, zero._compare, "zero")])
    app.front = RequestFront(app.framework, security.BodyLimit(app.state.settings.max_body_bytes),
                             lane)
    return app
