"""A work limit for one planning request, checked cooperatively by the planner's long loops.

The service runs each estimate under a ``WorkLimit`` (a deadline and a cancel flag, e.g. set when
the client goes away); the replay machine, the rank loops and the schedule simulator call
``check()`` every so often and stop with ``WorkLimitExceeded``. Outside a limit (the CLI, tests,
benchmarks) ``check()`` is a context-variable read and does nothing.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

_LIMIT: contextvars.ContextVar[WorkLimit | None] = contextvars.ContextVar(
    "memplan_work_limit", default=None)


class WorkLimitExceeded(Exception):
    """The request ran past its deadline or was cancelled. Not a ValueError: it is not a rule
    about the input, and no planner code may take it for one."""

    def __init__(self, detail: str, cancelled: bool = False, expired: bool = False) -> None:
        super().__init__(detail)
        self.detail, self.cancelled, self.expired = detail, cancelled, expired


class WorkLimit:
    """``seconds`` of wall time from now; ``cancel()`` stops the work at its next check."""

    __slots__ = ("cancelled", "end", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def extend(self, seconds: float) -> None:
        """Move the deadline ``seconds`` later (time spent on something that is not this
        request's work, e.g. a process's one-time import of a library)."""
        self.end += seconds

    def check(self) -> None:
        if self.cancelled:
            raise WorkLimitExceeded("the request was cancelled", cancelled=True)
        if time.monotonic() > self.end:
            raise WorkLimitExceeded(f"the estimate ran past its {self.seconds:g} s work limit",
                                    expired=True)


def check() -> None:
    """Raise WorkLimitExceeded if the current request's limit is spent (no-op without one)."""
    limit = _LIMIT.get()
    if limit is not None:
        limit.check()


@contextmanager
def not_counted() -> Iterator[None]:
    """Run the block without counting its wall time against the current request's limit."""
    start = time.monotonic()
    try:
        yield
    finally:
        limit = _LIMIT.get()
        if limit is not None:
            limit.extend(time.monotonic() - start)


@contextmanager
def work_limit(limit: WorkLimit) -> Iterator[WorkLimit]:
    """Run the block under ``limit`` (in this thread's context)."""
    token = _LIMIT.set(limit)
    try:
        yield limit
    finally:
        _LIMIT.reset(token)
