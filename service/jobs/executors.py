"""How a claimed job is executed: a small interface with two backends.

- ``SpawnedProcessExecutor`` (the default): a fresh ``spawn`` process per job, in its own process
  group (so a kill also reaches any torchrun ranks it launched), progress and the result sent
  back over a pipe. A crash, an OOM kill or a hang ends that process only.
- ``InlineExecutor``: runs the target in a thread of the calling process. No isolation and no
  way to stop it: for debugging and for tests of the surrounding machinery only.

The job's code is a *target*, ``"module:function"`` with the signature of
``service.validation.runner.run_validation``: ``(ValidationRequest, progress) -> ValidationResult``.
Before the target runs, the child compares the job's estimated peak with the device's free
memory and refuses what cannot fit (see ``fit_check``).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import Progress, ValidationResult
from service.jobs.capabilities import bytes_needed, too_large


@dataclass(frozen=True)
class Outcome:
    """How an execution ended: a result, or a failure with its reason."""

    result: ValidationResult | None = None
    error: str | None = None


class Execution(ABC):
    """One running job."""

    @abstractmethod
    def poll(self, timeout: float) -> list[Progress]:
        """Wait up to ``timeout`` seconds; return progress reported since the last call."""

    @property
    @abstractmethod
    def outcome(self) -> Outcome | None:
        """Set once the job has ended."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the job now (idempotent)."""


class Executor(ABC):
    @abstractmethod
    def start(self, request: ValidationRequest, peak_bytes: int) -> Execution: ...


def load_target(path: str) -> Callable[..., ValidationResult]:
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"job target {path!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


# ---- fit check ---------------------------------------------------------------------------------
def cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_check(request: ValidationRequest, peak_bytes: int) -> str | None:
    """None when the job fits the free memory here, else the refusal with the numbers.

    CPU ranks share the host's memory, so a CPU job needs ranks x peak; a CUDA job needs its
    per-device peak free on each device it uses. (The API refuses at submission, in the same
    words, what no live worker's advertised memory can hold: ``capabilities.submission_refusal``.)"""
    if request.mode != "real" or peak_bytes <= 0:
        return None
    p = request.parallelism
    ranks = p.data_parallel * p.tensor_parallel * p.pipeline_parallel
    device = request.device
    if device != "cpu":
        import torch  # only in the job's own process

        if torch.cuda.is_available():
            device = "cuda"
        elif device == "cuda":
            return "the job asks for CUDA but this worker has no CUDA device"
        else:
            device = "cpu"
    if device == "cpu":
        free, where = cpu_available_bytes(), "host memory available"
    else:
        import torch

        if ranks > torch.cuda.device_count():
            return (f"refused before running: the job needs {ranks} ranks (data x tensor x "
                    f"pipeline parallel) and this worker has {torch.cuda.device_count()} CUDA "
                    "device(s)")
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(ranks))
        where = "free memory on the emptiest-needed device"
    if bytes_needed(peak_bytes, ranks, device) <= free:
        return None
    return "refused before running: " + too_large(peak_bytes, ranks, device,
                                                  f"{where} on this {device} worker", free)


# ---- spawned process ---------------------------------------------------------------------------
def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the job process ended without a result"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the kernel's out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"the job process was killed by {name}{hint}"
    return f"the job process exited with code {code} without a result"


def _error_text(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or "OutOfMemory" in name:
        prefix = "out of memory"
    else:
        prefix = "the job raised"
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
    return f"{prefix}: {name}: {exc}{where}"[:4000]


def _watch_parent(parent_pid: int) -> None:
    # A job must not outlive its worker (kill -9 of the worker): stop the whole process group.
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os.killpg(0, signal.SIGKILL)


def _child_main(conn: Any, target_path: str, request_json: str, peak_bytes: int,
                parent_pid: int) -> None:
    os.setpgrp()
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        request = ValidationRequest.model_validate_json(request_json)
        refusal = fit_check(request, peak_bytes)
        if refusal:
            conn.send(("error", refusal))
            return
        target = load_target(target_path)
        result = target(request, lambda p: conn.send(("progress", p.model_dump())))
        if not isinstance(result, ValidationResult):
            result = ValidationResult.model_validate(result)
        conn.send(("result", result.model_dump_json()))
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the worker
        try:
            conn.send(("error", _error_text(exc)))
        except Exception:  # noqa: BLE001
            os._exit(70)
    finally:
        conn.close()


class _ProcessExecution(Execution):
    def __init__(self, process: Any, conn: Any) -> None:
        self.process, self.conn = process, conn
        self._outcome: Outcome | None = None
        self._eof = False

    def _read(self, out: list[Progress], deadline: float | None) -> None:
        """Read messages until the outcome, EOF, or (with a deadline) the deadline.

        Without a deadline, reads what is already in the pipe and stops when it is empty."""
        while not self._eof and self._outcome is None:
            try:
                wait = 0.0 if deadline is None else max(0.0, deadline - time.monotonic())
                if not self.conn.poll(wait):
                    return
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                self._eof = True
                return
            if kind == "progress":
                out.append(Progress(**payload))
            elif kind == "result":
                self._outcome = Outcome(result=ValidationResult.model_validate_json(payload))
            else:
                self._outcome = Outcome(error=str(payload))
            if deadline is not None and time.monotonic() >= deadline:
                return

    def poll(self, timeout: float) -> list[Progress]:
        out: list[Progress] = []
        if self._outcome is not None:
            return out
        deadline = time.monotonic() + timeout
        self._read(out, deadline)
        if self._outcome is not None:
            self.process.join(5)
            if self.process.is_alive():
                self.kill()
        elif self._eof or not self.process.is_alive():
            self.process.join(max(0.0, min(2.0, deadline - time.monotonic())) or 0.1)
            if not self.process.is_alive():
                # What the process wrote before it exited is still in the pipe: a result sent
                # just before the exit (or behind progress messages the deadline cut short)
                # must be read before the exit counts as a failure.
                self._read(out, None)
                if self._outcome is None:
                    self._outcome = Outcome(error=_describe_exit(self.process.exitcode))
        return out

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def kill(self) -> None:
        pid = self.process.pid
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.join(5)
        self.conn.close()


class SpawnedProcessExecutor(Executor):
    """A fresh ``spawn`` process per job (no state inherited from the worker)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._ctx = multiprocessing.get_context("spawn")

    def start(self, request: ValidationRequest, peak_bytes: int) -> Execution:
        parent_conn, child_conn = self._ctx.Pipe(duplex=False)
        # Not a daemon: the job may start its own processes (torchrun ranks).
        process = self._ctx.Process(
            target=_child_main, name="memplan-job",
            args=(child_conn, self.target, request.model_dump_json(), peak_bytes, os.getpid()))
        process.start()
        child_conn.close()
        return _ProcessExecution(process, parent_conn)


# ---- inline ------------------------------------------------------------------------------------
class _InlineExecution(Execution):
    def __init__(self, fn: Callable[..., ValidationResult], request: ValidationRequest,
                 peak_bytes: int) -> None:
        self._progress: list[Progress] = []
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, request, peak_bytes),
                                        daemon=True)
        self._thread.start()

    def _report(self, p: Progress) -> None:
        with self._lock:
            self._progress.append(p)

    def _run(self, fn: Callable[..., ValidationResult], request: ValidationRequest,
             peak_bytes: int) -> None:
        try:
            refusal = fit_check(request, peak_bytes)
            outcome = Outcome(error=refusal) if refusal else Outcome(result=fn(request, self._report))
        except BaseException as exc:  # noqa: BLE001
            outcome = Outcome(error=_error_text(exc))
        self._outcome = outcome
        self._done.set()

    def poll(self, timeout: float) -> list[Progress]:
        self._done.wait(timeout)
        with self._lock:
            out, self._progress = self._progress, []
        return out

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome if self._done.is_set() else None

    def kill(self) -> None:
        # A thread cannot be stopped: the job is abandoned and its result ignored.
        self._done.set()


class InlineExecutor(Executor):
    """Runs the target in a thread of this process: no isolation, no enforced limit."""

    def __init__(self, target: str | Callable[..., ValidationResult]) -> None:
        self.fn = load_target(target) if isinstance(target, str) else target

    def start(self, request: ValidationRequest, peak_bytes: int) -> Execution:
        return _InlineExecution(self.fn, request, peak_bytes)


__all__ = ["Executor", "Execution", "Outcome", "SpawnedProcessExecutor", "InlineExecutor",
           "fit_check", "load_target", "cpu_available_bytes"]
