"""The worker: claims jobs this device can run and executes each in a fresh process.

One job at a time per worker. While a job runs, the worker forwards its progress to the store,
renews the claim's lease every ``heartbeat_s`` (which is also when it notices a cancellation),
and enforces the job's wall-clock limit by killing the process. Whatever happens to the job —
crash, OOM, timeout, refusal — is recorded on that job and the loop goes on to the next one.

A worker has an identity (the ``worker`` of the jobs it claims). Every ``heartbeat_s`` it writes
its heartbeat row, with the device it runs on, so that the API can tell which queued jobs no live
worker can run; it deletes the row when it stops. An identity can be stable across restarts
(``MEMPLAN_WORKER_ID``; the embedded worker's is derived from host and database): a worker that
starts under an identity whose previous process is gone re-queues the jobs still running under it
at once, instead of leaving them to their lease.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid

from sqlalchemy.exc import SQLAlchemyError

from service.jobs.executors import Executor, SpawnedProcessExecutor
from service.jobs.capabilities import WorkerInfo
from service.jobs.store import Claim, JobStore
from service.settings import DeviceInfo, Settings, sqlite_path

log = logging.getLogger("memplan.worker")
# Identities of the Workers running in this process (a heartbeat row with this process's pid is
# live only if its identity is one of these).
_RUNNING: set[str] = set()
# Heartbeat rows of workers silent this long are deleted when a worker starts.
PRUNE_AFTER_S = 24 * 3600.0


def _probe() -> dict:
    # Runs in a spawned process: torch (and any CUDA context) stays out of the worker's process.
    import torch

    from service.jobs.executors import cpu_available_bytes

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(n)]
        memory = min(p.total_memory for p in props)
        return {"kind": catalog_kind(props[0].name, memory), "count": n, "memory_bytes": memory}
    total = cpu_available_bytes()
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024  # MemTotal
    except (OSError, ValueError, IndexError):
        pass
    return {"kind": "cpu", "count": os.cpu_count() or 1, "memory_bytes": total}


def catalog_kind(device_name: str, memory_bytes: int) -> str:
    """Map a CUDA device name to its GPU catalog name, e.g. 'NVIDIA H100 80GB HBM3' -> 'h100-80gb'."""
    from planner.catalog.presets import gpus

    name = device_name.lower().replace(" ", "")
    best = None
    for gpu in gpus().values():
        family = gpu.name.split("-")[0]
        if family in name:
            gap = abs(gpu.memory_bytes - memory_bytes) / gpu.memory_bytes
            if gap < 0.15 and (best is None or gap < best[0]):
                best = (gap, gpu.name)
    return best[1] if best else device_name.lower().replace(" ", "-")


def embedded_identity(settings: Settings) -> str:
    """The embedded worker's identity: the host and the database, stable across restarts of
    ``memplan serve`` (e.g. 'node1/embedded:/srv/var/memplan.db')."""
    path = sqlite_path(settings.database_url)
    if path:
        where = os.path.abspath(path)
    else:
        from sqlalchemy.engine import make_url

        where = make_url(settings.database_url).render_as_string(hide_password=True)
    ident = f"{socket.gethostname()}/embedded:{where}"
    if len(ident) > 160:
        ident = f"{ident[:140]}~{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    return ident


def _holder_alive(prev: WorkerInfo, lease_s: float) -> bool:
    """Whether the process that last heartbeated under an identity may still be running."""
    if prev.heartbeat_at < time.time() - lease_s:
        return False  # silent for a lease: lost, like its jobs' leases
    if prev.host != socket.gethostname():
        return True  # another node, heartbeating: cannot be checked from here
    if prev.pid == os.getpid():
        return prev.id in _RUNNING  # this process (a restarted container may reuse the pid)
    try:
        os.kill(prev.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adopt_identity(store: JobStore, name: str, lease_s: float) -> str:
    """Take ``name`` for this process: re-queue the jobs still running under it when the process
    that held it is gone (the attempt counts, as for a lost lease). When that process still
    runs, take a name of this process's own instead; returns the name to use."""
    prev = store.worker(name)
    if prev is not None and _holder_alive(prev, lease_s):
        own = f"{name}#{os.getpid()}:{uuid.uuid4().hex[:6]}"
        log.warning("worker identity %s is held by a live process (%s pid %d); this one runs as %s",
                    name, prev.host, prev.pid, own)
        return own
    for job_id in store.reclaim(name):
        log.warning("job %s: re-queued at start: it was running under this worker's identity "
                    "when the previous process stopped", job_id)
    return name


def detect_device(timeout_s: float = 120.0) -> DeviceInfo:
    """The local device, probed in a spawned process."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return DeviceInfo(**pool.apply_async(_probe).get(timeout_s))


class Worker:
    """Claim, run, record; repeat until stopped."""

    def __init__(self, store: JobStore, settings: Settings, device: DeviceInfo | None = None,
                 executor: Executor | None = None, name: str | None = None,
                 sole: bool = False, adopted: bool = False) -> None:
        self.store, self.settings = store, settings
        # A sole worker takes every job and refuses, with the numbers, what it cannot run.
        self.sole = sole
        self.device = device or settings.worker_device or detect_device()
        self.executor = executor or SpawnedProcessExecutor(settings.job_target)
        # The identity: given, configured (stable), or this process's own.
        self.name = (name or settings.worker_id
                     or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
        self.instance = uuid.uuid4().hex
        self.stop_event = threading.Event()
        self.jobs_done = 0
        self._next_sweep = 0.0
        self._adopted = adopted  # adopt_identity has run for self.name
        self._started = False

    def startup(self) -> None:
        """Adopt the identity (re-queueing what a dead predecessor left running under it) and
        send the first heartbeat. Idempotent; run() calls it until it succeeds."""
        if self._started:
            return
        if not self._adopted:
            self.name = adopt_identity(self.store, self.name, self.settings.lease_s)
            self._adopted = True
        _RUNNING.add(self.name)
        self.heartbeat()
        self.store.prune_workers(max(PRUNE_AFTER_S, 10 * self.settings.lease_s))
        self._started = True

    def heartbeat(self) -> None:
        """Say that this worker is live and what it can run."""
        self.store.heartbeat_worker(self.name, self.instance, socket.gethostname(), os.getpid(),
                                    self.device, self.sole)

    def stop(self) -> None:
        """Ask the loop to end: no new claims; the job in hand gets ``shutdown_grace_s`` to
        finish and is otherwise stopped and released to the queue."""
        self.stop_event.set()

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, max_jobs: int | None = None) -> None:
        log.info("worker %s serving %s", self.name, self.device)
        try:
            self._loop(max_jobs)
        finally:
            _RUNNING.discard(self.name)
            if self._started:
                try:
                    self.store.forget_worker(self.name, self.instance)
                except SQLAlchemyError as exc:
                    log.warning("could not remove this worker's heartbeat (%s); it ages out",
                                exc.__class__.__name__)

    def _loop(self, max_jobs: int | None) -> None:
        while not self.stop_event.is_set():
            if max_jobs is not None and self.jobs_done >= max_jobs:
                return
            try:
                self.startup()
                if not self.run_once():
                    self.stop_event.wait(self.settings.poll_s)
            except SQLAlchemyError as exc:
                log.warning("job store unavailable (%s); retrying", exc.__class__.__name__)
                self.stop_event.wait(min(5.0, self.settings.poll_s * 4))
            except Exception:  # noqa: BLE001 - the worker keeps serving whatever one job does
                log.exception("unexpected error in worker loop")
                self.stop_event.wait(self.settings.poll_s)

    def sweep(self) -> None:
        """At most once per heartbeat: this worker's heartbeat; re-queue jobs whose worker
        stopped renewing; fail queued jobs that no live worker has been able to run for
        ``unrunnable_timeout_s``."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.heartbeat_s
            self.heartbeat()
            for job_id in self.store.requeue_expired():
                log.warning("job %s: lease expired, re-queued or failed", job_id)
            for job_id in self.store.fail_unrunnable(self.settings.unrunnable_timeout_s):
                log.warning("job %s: failed: no live worker could run it for %g s", job_id,
                            self.settings.unrunnable_timeout_s)

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none to claim."""
        self.sweep()
        claim = self.store.claim(self.name, self.device, by_capacity=not self.sole)
        if claim is None:
            return False
        log.info("job %s: claimed (attempt %d)", claim.job_id, claim.attempt)
        try:
            self.execute(claim)
        finally:
            self.jobs_done += 1
        return True

    def _store_call(self, fn, *args) -> bool | None:  # noqa: ANN001
        try:
            return fn(*args)
        except SQLAlchemyError as exc:
            # A blip in the database must not kill the job: the lease covers heartbeat_s gaps.
            log.warning("job store call %s failed: %s", fn.__name__, exc.__class__.__name__)
            return None

    def execute(self, claim: Claim) -> None:
        limit_s = min(claim.timeout_s, self.settings.job_timeout_cap_s)
        start = time.monotonic()
        deadline = start + limit_s
        execution = self.executor.start(claim.request, claim.peak_bytes)
        next_beat = start + self.settings.heartbeat_s
        stop_deadline: float | None = None
        try:
            while True:
                now = time.monotonic()
                wait = max(0.0, min(next_beat, deadline, stop_deadline or deadline) - now)
                for progress in execution.poll(min(wait, 0.25)):
                    if self._store_call(self.store.progress, claim, progress) is False:
                        return self._lost(claim, execution)
                outcome = execution.outcome
                if outcome is not None:
                    if outcome.result is not None:
                        ok = self._store_call(self.store.complete, claim, outcome.result)
                    else:
                        ok = self._store_call(self.store.fail, claim, outcome.error or "failed")
                    log.info("job %s: %s%s", claim.job_id,
                             "succeeded" if outcome.result else f"failed: {outcome.error}",
                             "" if ok else " (claim no longer held; not recorded)")
                    return None
                now = time.monotonic()
                if now >= deadline:
                    execution.kill()
                    self._store_call(self.store.fail, claim,
                                     f"timed out: exceeded its wall-clock limit of {limit_s:g} s "
                                     "and was killed")
                    log.info("job %s: timed out after %g s", claim.job_id, limit_s)
                    return None
                if self.stop_event.is_set():
                    if stop_deadline is None:
                        stop_deadline = now + self.settings.shutdown_grace_s
                    if now >= stop_deadline:
                        execution.kill()
                        self._store_call(self.store.release, claim,
                                         "released: worker shut down before the job finished")
                        log.info("job %s: released to the queue on shutdown", claim.job_id)
                        return None
                if now >= next_beat:
                    next_beat = now + self.settings.heartbeat_s
                    if self._store_call(self.store.renew, claim) is False:
                        return self._lost(claim, execution)
                    self._store_call(self.sweep)  # the worker's own heartbeat, while busy
        finally:
            if execution.outcome is None:
                execution.kill()

    def _lost(self, claim: Claim, execution) -> None:  # noqa: ANN001
        execution.kill()
        log.info("job %s: cancelled or claim lost; process stopped", claim.job_id)


__all__ = ["Worker", "detect_device", "catalog_kind", "embedded_identity", "adopt_identity"]
