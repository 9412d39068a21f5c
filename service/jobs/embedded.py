"""The worker that ``memplan serve`` runs inside the API process, on a thread.

Jobs still run in their own spawned processes; the thread only claims, watches and records.
"""

from __future__ import annotations

import threading

from service.jobs.executors import Executor
from service.jobs.store import JobStore
from service.jobs.worker import Worker
from service.settings import DeviceInfo, Settings


class EmbeddedWorker:
    def __init__(self, store: JobStore, settings: Settings, device: DeviceInfo | None = None,
                 executor: Executor | None = None) -> None:
        self._args = (store, settings, device, executor)
        self.worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        def run() -> None:
            # The API's own worker is the only one a `memplan serve` deployment has.
            self.worker = Worker(*self._args, sole=True)
            if not self._stopping:  # stop() sets the flag, then looks for the worker
                self.worker.run()

        # The device probe happens on the thread, so the API answers while it runs.
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
