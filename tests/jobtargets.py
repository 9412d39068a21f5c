"""Job targets for testing the job machinery (store, worker, executors) without a training step,
and the database URLs the job tests run on.

A target has run_validation's signature: (ValidationRequest, progress) -> ValidationResult.
Selected with MEMPLAN_JOB_TARGET=tests.jobtargets:NAME. Behaviour knobs come from the
environment, which the spawned job process inherits: MEMPLAN_TEST_STEP_S (seconds per step) and
MEMPLAN_TEST_LOG (a file each execution appends 'start PID' / 'finish PID' lines to).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from typing import Callable, Iterator

from planner.catalog.specs import Breakdown, ValidationRequest
from planner.catalog.validation_specs import Progress, ValidationResult, relative_error

ProgressFn = Callable[[Progress], None] | None

PG_BASE_URL = os.environ.get("MEMPLAN_TEST_PG_URL",
                             "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _log(line: str) -> None:
    path = os.environ.get("MEMPLAN_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{line} {os.getpid()}\n")


def _steps(request: ValidationRequest, progress: ProgressFn) -> None:
    step_s = float(os.environ.get("MEMPLAN_TEST_STEP_S", "0.05"))
    for i in range(1, request.steps + 1):
        if progress:
            progress(Progress(phase="step", step=i, total_steps=request.steps))
        time.sleep(step_s)


def fake_result() -> ValidationResult:
    estimate = Breakdown(parameters=1000, gradients=1000, optimizer_states=2000,
                         activations=500, temporaries=100, total=4600)
    measured = Breakdown(parameters=1000, gradients=1000, optimizer_states=2000,
                         activations=520, temporaries=80, total=4600)
    return ValidationResult(device="cpu", mode="real", estimate=estimate, measured=measured,
                            relative_error=relative_error(estimate, measured))


def succeed(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    _log("start")
    _steps(request, progress)
    _log("finish")
    return fake_result()


def crash(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    """Dies without a word, as a segfaulting extension would."""
    if progress:
        progress(Progress(phase="step", step=1, total_steps=request.steps))
    os._exit(3)


def raise_error(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    raise RuntimeError("simulated failure inside the training step")


def oom_error(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    """Python-level out of memory, as torch.OutOfMemoryError is."""
    raise MemoryError("simulated: tried to allocate 1.00 TiB")


def oom_kill(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    """What the kernel's OOM killer does to a process: SIGKILL."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    raise AssertionError("unreachable")


def hang(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    if progress:
        progress(Progress(phase="step", step=1, total_steps=request.steps))
    while True:
        time.sleep(1)


def chatty(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    """Reports many progress messages at once, then returns at once: the result and the exit
    follow the messages closely, so a reader that stops at a deadline finds the process gone
    with the result still in the pipe."""
    for i in range(200):
        if progress:
            progress(Progress(phase="step", step=i % request.steps + 1,
                              total_steps=request.steps))
    return fake_result()


# The request's step count picks the behaviour, so one worker can be given a sequence of jobs that
# crash, run out of memory, hang or succeed.
SCRIPT = {2: crash, 4: raise_error, 5: oom_error, 6: oom_kill, 7: hang}


def scripted(request: ValidationRequest, progress: ProgressFn = None) -> ValidationResult:
    return SCRIPT.get(request.steps, succeed)(request, progress)


# ---- databases ---------------------------------------------------------------------------------
def pg_reachable(url: str = PG_BASE_URL) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        engine.dispose()


def require_pg() -> None:
    """Skip only outside CI when PostgreSQL is unreachable; in CI, fail."""
    import pytest

    if pg_reachable():
        return
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI and is unreachable at {PG_BASE_URL}")
    pytest.skip(f"PostgreSQL unreachable at {PG_BASE_URL} (required in CI)")


def database_url(backend: str, tmp_path) -> Iterator[str]:  # noqa: ANN001
    """A fresh, empty job database on ``backend`` ('sqlite' or 'postgresql'); a generator for
    fixtures (PostgreSQL: a schema of its own, dropped afterwards)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/jobs.db"
        return
    require_pg()
    from sqlalchemy import create_engine, text

    schema = f"memplan_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_BASE_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def poll(client, job_id: str, until: Callable[[dict], bool] | None = None,
         timeout_s: float = 30.0) -> dict:
    """GET the job until ``until(job)`` (default: it has ended); fails with the last state seen."""
    until = until or (lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout_s
    job: dict = {}
    while time.monotonic() < deadline:
        r = client.get(f"/v1/validations/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state; last: {job}")


def terminate(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """Stop a server process: SIGTERM, then SIGKILL if it has not exited within ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
