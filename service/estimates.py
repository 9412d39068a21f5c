"""How the estimate routes run their planner work: bounded, time-limited, cancellable.

- At most ``max_concurrent_estimates`` estimates compute at once per process, on worker threads
  of their own (an anyio capacity limiter), so the health, catalog and job routes never queue
  behind them. A request that finds every slot taken waits up to ``estimate_queue_s`` for one,
  then gets a 503 problem with ``Retry-After``.
- Each estimate runs under a work limit of ``estimate_deadline_s`` (planner.machine.deadline): past it,
  the planner stops at its next check and the answer is a 503 problem naming the limit.
- When the client goes away, the work limit is cancelled: the planner stops at its next check
  and the slot is free again.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, Request

from planner.machine.deadline import WorkLimit, WorkLimitExceeded, work_limit
from service.errors import PROBLEM, Problem

T = TypeVar("T")

ESTIMATE_LIMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "content": {PROBLEM: {}},
          "description": "Every estimate slot stayed busy (Retry-After), or the estimate ran "
          "past the per-request work limit"},
}


class EstimateSlots:
    """The per-process estimate limits (one per app, in ``app.state.estimates``)."""

    def __init__(self, max_concurrent: int, queue_s: float, deadline_s: float) -> None:
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        # the threads the estimates run on: never more than the slots held, and not the default
        # thread pool that the synchronous routes (readiness, catalogs, jobs) use
        self.threads = anyio.CapacityLimiter(max_concurrent)
        self.queue_s, self.deadline_s = queue_s, deadline_s

    @classmethod
    def from_settings(cls, settings) -> EstimateSlots:
        return cls(settings.max_concurrent_estimates, settings.estimate_queue_s,
                   settings.estimate_deadline_s)


def _run_limited(limit: WorkLimit, fn: Callable[[], T]) -> T:
    with work_limit(limit):
        return fn()


async def _watch_disconnect(request: Request, limit: WorkLimit) -> None:
    while not limit.cancelled:
        if await request.is_disconnected():
            limit.cancel()
            return
        await anyio.sleep(0.05)


async def run_estimate(request: Request, fn: Callable[[], T]) -> T:
    """Run ``fn`` (the planner call, with its own error mapping) under the process's limits."""
    slots: EstimateSlots = request.app.state.estimates
    with anyio.move_on_after(slots.queue_s) as waited:
        await slots.limiter.acquire()
    if waited.cancelled_caught:
        raise HTTPException(
            503, f"all {int(slots.limiter.total_tokens)} estimate slots of this process stayed busy "
            f"for {slots.queue_s:g} s (max_concurrent_estimates); retry",
            headers={"Retry-After": "1"})
    limit = WorkLimit(slots.deadline_s)
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, request, limit)
            try:
                ctx = contextvars.copy_context()
                result = await anyio.to_thread.run_sync(
                    ctx.run, _run_limited, limit, fn, limiter=slots.threads)
            except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                error = exc
            tg.cancel_scope.cancel()
    finally:
        slots.limiter.release()
    if isinstance(error, WorkLimitExceeded):
        raise HTTPException(
            503, f"{error.detail} (estimate_deadline_s = {slots.deadline_s:g} s): a request this "
            "large is not answered within the limit") from None
    if error is not None:
        raise error
    return result
