"""The worker that ``memplan serve`` runs inside the API process, on a thread.

Jobs still run in their own spawned processes; the thread only claims, watches and records.
Its identity is derived from the host and the database, so a ``memplan serve`` restarted after a
crash re-queues at once the jobs its previous process was running (see
``service.jobs.worker.adopt_identity``).
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from service.jobs.executors import Executor
from service.jobs.store import JobStore
from service.jobs.worker import Worker, adopt_identity, embedded_identity
from service.settings import DeviceInfo, Settings

log = logging.getLogger("memplan.worker")


class EmbeddedWorker:
    def __init__(self, store: JobStore, settings: Settings, device: DeviceInfo | None = None,
                 executor: Executor | None = None) -> None:
        self._args = (store, settings, device, executor)
        self.worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        store, settings, device, executor = self._args
        # Before the API serves: jobs a crashed predecessor left 'running' are re-queued now, and
        # with a configured device the worker is advertised before the first submission.
        name, adopted = embedded_identity(settings), False
        try:
            name, adopted = adopt_identity(store, name, settings.lease_s), True
        except SQLAlchemyError as exc:
            log.warning("job store unavailable at start (%s); the worker retries",
                        exc.__class__.__name__)
        device = device or settings.worker_device
        if device is not None:
            # The API's own worker is the only one a `memplan serve` deployment has.
            self.worker = Worker(store, settings, device, executor, name=name, sole=True,
                                 adopted=adopted)
            try:
                self.worker.startup()
            except SQLAlchemyError:
                pass  # run() retries

        def run() -> None:
            if self.worker is None:
                self.worker = Worker(store, settings, device, executor, name=name, sole=True,
                                     adopted=adopted)
            if self._stopping:  # stop() sets the flag, then looks for the worker
                self.worker.stop()
            self.worker.run()  # (stopped: returns at once, removing its heartbeat row)

        # The device probe (when needed) happens on the thread, so the API answers while it runs.
        self._thread = threading.Thread(target=run, name="memplan-embedded-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop claiming; finish or release the job in hand (see Worker.stop)."""
        if self._thread is None:
            return
        deadline = timeout_s if timeout_s is not None else self._args[1].shutdown_grace_s + 15
        self._stopping = True
        if self.worker is not None:
            self.worker.stop()
        self._thread.join(deadline)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


__all__ = ["EmbeddedWorker"]
