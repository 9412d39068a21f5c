"""A work limit for one planning request, checked cooperatively by the planner's long loops.

The service runs each estimate under a ``WorkLimit`` (a deadline and a cancel flag, e.g. set when
the client goes away); the replay machine, the rank loops and the schedule simulator call
``check()`` every so often and stop with ``WorkLimitExceeded``. Outside a limit (the CLI, tests,
benchmarks) ``check()`` is a context-variable read and does nothing.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

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


# estimates running on the request path now (``foreground``); background compiles give way
_FOREGROUND = [0]
_FOREGROUND_LOCK = threading.Lock()
_IN_FOREGROUND: contextvars.ContextVar[bool] = contextvars.ContextVar("memplan_foreground",
                                                                      default=False)
PAUSE_MAX_S = 0.05  # the longest a background compile waits at one check
_STOPPING = [False]  # set once the process exits: background compiles stop at their next check


def stop_background() -> None:
    """Make every background compile (``BackgroundLimit``) stop at its next check, for good: the
    process is exiting, and a thread still inside numpy while the interpreter is torn down can
    crash or hang the exit of a process whose answer is already printed."""
    _STOPPING[0] = True


def stopping() -> bool:
    """Whether the process is exiting (``stop_background``)."""
    return _STOPPING[0]


@contextmanager
def foreground() -> Iterator[None]:
    """Mark the block as an estimate a client waits for: meanwhile, background compiles
    (``BackgroundLimit``) pause at their checks instead of taking the CPU from it."""
    with _FOREGROUND_LOCK:
        _FOREGROUND[0] += 1
    token = _IN_FOREGROUND.set(True)
    try:
        yield
    finally:
        _IN_FOREGROUND.reset(token)
        with _FOREGROUND_LOCK:
            _FOREGROUND[0] -= 1


class BackgroundLimit(WorkLimit):
    """The work limit of a compile off the request path (a structure template): at each check
    it first gives way to estimates in the ``foreground``, sleeping while one runs, up to
    ``PAUSE_MAX_S`` a check (so it slows down under traffic but is never starved), and that
    time does not count against its limit. Without it the compile's thread would hold the GIL
    half the time and double the wall time of the very request that queued it."""

    __slots__ = ()

    def check(self) -> None:
        if _STOPPING[0]:
            raise WorkLimitExceeded("the process is exiting", cancelled=True)
        # (a compile in a foreground estimate itself, "sync" mode, does not wait for itself)
        if _FOREGROUND[0] and not _IN_FOREGROUND.get():
            start = time.monotonic()
            end = start + PAUSE_MAX_S
            while _FOREGROUND[0] and time.monotonic() < end:
                time.sleep(0.001)
            self.extend(time.monotonic() - start)
        WorkLimit.check(self)


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


def run_in_foreground(limit: WorkLimit, fn: Callable[[], T]) -> T:
    """``fn()`` under ``limit`` and in the foreground: ``with work_limit(limit), foreground():``
    without the two generator context managers (an estimate answered on the service's event loop
    takes a few microseconds; this runs once for each)."""
    token = _LIMIT.set(limit)
    try:
        with _FOREGROUND_LOCK:
            _FOREGROUND[0] += 1
        in_foreground = _IN_FOREGROUND.set(True)
        try:
            return fn()
        finally:
            _IN_FOREGROUND.reset(in_foreground)
            with _FOREGROUND_LOCK:
                _FOREGROUND[0] -= 1
    finally:
        _LIMIT.reset(token)
