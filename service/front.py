"""The request layer: what every HTTP request meets first, in front of all of FastAPI's own.

One plain ASGI callable does, per request, what three stacked layers did: the request id
(``X-Request-ID`` in and out, bound for the request's log lines), the body-size limit
(:class:`service.security.BodyLimit`), the estimate fast lane (:class:`service.estimates.FastLane`),
and at the end one latency observation (``memplan_http_request_duration_seconds``) and one access
line (:func:`service.logs.log_access`). The request's headers are read in one pass for the three
it looks at, and a fast-lane answer is sent directly with its headers (the request id's
included), through no wrapper of ``send``. Every other request goes on to FastAPI (its telemetry,
server-error and exception middlewares, routing) with a ``send`` that adds the request id to the
response and notes its status; an exception that escapes a route is answered 500 by FastAPI's
server-error layer, inside this one, so that 500 carries the request id and is measured as sent.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from service.estimates import FastLane
from service.logs import bind_request, log_access, new_request_id
from service.metrics import REQUEST_LATENCY, status_text
from service.security import BodyLimit

access_log = logging.getLogger("memplan.access")
_JSON_TYPE = (b"content-type", b"application/json")


class RequestFront:
    """Request id, body-size limit, estimate fast lane, latency histogram and access line, in
    front of ``app`` (FastAPI itself): see the module docstring."""

    def __init__(self, app: Any, body_limit: BodyLimit, lane: FastLane) -> None:
        self.app, self.body_limit, self.lane = app, body_limit, lane

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_id = length = content_type = None
        several = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                several, length = length is not None, value
            elif name == b"x-request-id":
                if header_id is None:
                    header_id = value
            elif name == b"content-type" and content_type is None:
                content_type = value
        request_id = new_request_id(None if header_id is None else header_id.decode("latin-1"))
        ids = bind_request(request_id)
        id_header = (b"x-request-id", request_id.encode())
        status, route = 500, None
        start = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            limit = self.body_limit
            if not (length is not None and not several and length.isdigit()
                    and int(length) <= limit.limit):
                receive = await limit.admit(scope, length, several, receive, send_with_id)
                if receive is None:  # answered: 413 or 400
                    return
            lane = self.lane.lane_for(scope, content_type)
            if lane is not None:
                answer, receive = await self.lane.answer(lane, receive)
                if answer is not None:
                    status, route = 200, lane.path
                    await send({"type": "http.response.start", "status": 200,
                                "headers": [(b"content-length", str(len(answer)).encode()),
                                            _JSON_TYPE, id_header]})
                    await send({"type": "http.response.body", "body": answer})
                    return
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            if route is None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            REQUEST_LATENCY.observe(elapsed, method, route, status_text(status))
            log_access(access_log, ids, method, scope["path"], status, route,
                       round(elapsed * 1000, 3))
