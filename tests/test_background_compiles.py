"""Background compiles (structure templates) give way to the estimates clients wait for
(planner/machine/deadline.py: ``foreground``, ``BackgroundLimit``); the service marks its
estimates, inline and on worker threads, as foreground."""

from __future__ import annotations

import contextlib
import threading

from planner.machine import deadline
from planner.machine.deadline import BackgroundLimit, WorkLimit, foreground
from service import estimates


@contextlib.contextmanager
def _request_running():
    """A foreground estimate running on another thread for the duration of the block."""
    inside, release = threading.Event(), threading.Event()

    def request() -> None:
        with foreground():
            inside.set()
            release.wait(30)

    t = threading.Thread(target=request)
    t.start()
    inside.wait(30)
    try:
        yield release
    finally:
        release.set()
        t.join(30)


def test_no_pause_without_a_foreground_estimate() -> None:
    limit = BackgroundLimit(10.0)
    end = limit.end
    limit.check()
    assert limit.end == end


def test_a_check_waits_while_a_foreground_estimate_runs_and_that_time_is_not_counted(
        monkeypatch) -> None:
    monkeypatch.setattr(deadline, "PAUSE_MAX_S", 30.0)
    limit = BackgroundLimit(10.0)
    end = limit.end
    done = threading.Event()

    def compile_() -> None:
        limit.check()
        done.set()

    with _request_running() as release:
        c = threading.Thread(target=compile_)
        c.start()
        assert not done.wait(0.2)  # paused while the request runs
        release.set()
    assert done.wait(30)
    c.join(30)
    assert limit.end - end >= 0.2  # the pause extended its limit


def test_a_pause_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(deadline, "PAUSE_MAX_S", 0.01)
    with _request_running():
        BackgroundLimit(10.0).check()  # returns although the request still runs


def test_a_compile_inside_a_foreground_estimate_does_not_wait_for_itself(monkeypatch) -> None:
    monkeypatch.setattr(deadline, "PAUSE_MAX_S", 30.0)
    with foreground():
        limit = BackgroundLimit(10.0)
        end = limit.end
        limit.check()
        assert limit.end == end


def test_the_service_runs_estimates_in_the_foreground() -> None:
    assert deadline._FOREGROUND[0] == 0
    seen = estimates._run_limited(estimates._ThreadLimit(10.0), lambda: deadline._FOREGROUND[0])
    assert seen == 1 and deadline._FOREGROUND[0] == 0
    slots = estimates.EstimateSlots(2, 1.0, 10.0, 30.0)
    done, seen = estimates._try_inline(slots, "setup", lambda: deadline._FOREGROUND[0])
    assert done and seen == 1 and deadline._FOREGROUND[0] == 0
    assert isinstance(estimates._ThreadLimit(1.0), WorkLimit)
