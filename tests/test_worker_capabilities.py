"""Workers advertise what they run (a heartbeat row with their device), keep an identity across
restarts, and re-queue at start what a killed predecessor left running under it."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from service.jobs.store import JobStore
from service.jobs.worker import Worker, adopt_identity, embedded_identity
from service.settings import DeviceInfo, Settings
from tests.test_worker_faults import (SMALL, _env, _free_port, request, settings,
                                      start_serve, start_worker, stop, wait_for)

CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)


@pytest.fixture
def store(db_url):
    s = JobStore(db_url, lease_s=60.0, max_attempts=3)
    yield s
    s.close()


def test_kill_9_of_serve_then_restart_requeues_its_job_at_once(store, db_url, tmp_path):
    """API + embedded worker killed mid-job: the restarted server re-queues the job its
    predecessor was running as it starts (not after the 60 s lease), and runs it again."""
    env = _env(db_url, tmp_path, MEMPLAN_LEASE_S="60", MEMPLAN_TEST_STEP_S="0.5")
    port = _free_port()
    job = store.submit(request(10), SMALL).id
    first = start_serve(env, port, tmp_path, "serve-1", worker=True, timeout_s=30)
    procs = [first]
    try:
        wait_for(lambda: store.get(job).progress.step >= 1, 30, "the embedded worker to run it")
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        assert store.get(job).status == "running"  # its lease has a minute to run
        killed_at = time.monotonic()
        procs.append(start_serve(env, port, tmp_path, "serve-2", worker=True, timeout_s=30))
        wait_for(lambda: store.history(job), 20, "the job to be re-queued")
        assert time.monotonic() - killed_at < 30  # well before the lease would have expired
        done = wait_for(lambda: (j := store.get(job)).status in ("succeeded", "failed") and j,
                        30, "the restarted worker to finish the job")
        assert done.status == "succeeded", done.error
        assert done.attempts == 2  # the lost attempt counts, as for an expired lease
        history = store.history(job)
        assert history[0]["outcome"].startswith("worker restarted")
        assert history[0]["worker"] == history[1]["worker"]  # one identity across the restart
        assert "/embedded:" in history[0]["worker"]
    finally:
        for p in procs:
            stop(p)


def test_a_worker_advertises_its_device_until_it_stops(store, db_url, tmp_path):
    env = _env(db_url, tmp_path, MEMPLAN_WORKER_DEVICE="h100-80gb:4:80GiB",
               MEMPLAN_WORKER_ID="gpu-node-1")
    w = start_worker(env, tmp_path, "w")
    try:
        live = wait_for(store.live_workers, 20, "the worker's heartbeat")
        assert [(x.id, x.device) for x in live] == [
            ("gpu-node-1", DeviceInfo(kind="h100-80gb", count=4, memory_bytes=80 * 2**30))]
        assert live[0].pid == w.pid and not live[0].sole
        w.send_signal(signal.SIGTERM)
        assert w.wait(15) == 0
        assert store.live_workers() == []  # a stopping worker withdraws at once
    finally:
        stop(w)


def test_a_busy_worker_keeps_heartbeating(db_url, monkeypatch):
    monkeypatch.setenv("MEMPLAN_TEST_STEP_S", "0.3")
    store = JobStore(db_url, lease_s=1.0)
    try:
        job = store.submit(request(10), SMALL).id
        worker = Worker(store, settings(db_url, lease_s=1.0), name="busy")
        t = threading.Thread(target=worker.run, kwargs={"max_jobs": 1}, daemon=True)
        t.start()
        wait_for(lambda: store.get(job).progress.step >= 6, 30, "the job to run past a lease")
        assert [w.id for w in store.live_workers()] == ["busy"]
        t.join(30)
        assert store.get(job).status == "succeeded"
        assert store.live_workers() == []
    finally:
        store.close()


def test_a_live_holder_keeps_its_identity(store, db_url):
    """A second process (here: worker) starting under an identity a live one holds takes a name
    of its own and re-queues nothing."""
    job = store.submit(request(3), SMALL).id
    holder = Worker(store, settings(db_url), name="node-a")
    holder.startup()
    claim = store.claim(holder.name, CPU)
    assert claim.job_id == job
    try:
        name = adopt_identity(store, "node-a", lease_s=60.0)
        assert name.startswith("node-a#") and name != "node-a"
        assert store.get(job).status == "running" and store.renew(claim)
    finally:
        holder.stop()
        holder.run()  # returns at once: withdraws its heartbeat
    assert store.worker("node-a") is None
    # Holder gone: the identity is adopted and what ran under it is re-queued.
    assert adopt_identity(store, "node-a", lease_s=60.0) == "node-a"
    assert store.get(job).status == "queued" and store.get(job).attempts == 1


def test_embedded_identity_is_stable_per_host_and_database(tmp_path):
    a = Settings(database_url=f"sqlite:///{tmp_path}/a.db")
    b = Settings(database_url=f"sqlite:///{tmp_path}/b.db")
    assert embedded_identity(a) == embedded_identity(a.model_copy(update={"port": 9000}))
    assert embedded_identity(a) != embedded_identity(b)
    assert str(tmp_path / "a.db") in embedded_identity(a)
    pg = Settings(database_url="postgresql+psycopg://u:secret@db:5432/memplan")
    assert "secret" not in embedded_identity(pg) and len(embedded_identity(pg)) <= 160
    long = Settings(database_url=f"sqlite:///{tmp_path}/{'x' * 300}.db")
    assert len(embedded_identity(long)) <= 160
    assert embedded_identity(a).startswith(f"{socket.gethostname()}/embedded:")
