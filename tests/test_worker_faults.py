"""Workers under faults, with real processes: crashes, OOM, hangs, cancellation, kill -9 of a
worker, SIGTERM, and a restart of the API while a client polls."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from planner.catalog.specs import ValidationRequest
from service.jobs.store import JobStore, Requirements
from service.jobs.worker import Worker
from service.settings import DeviceInfo, Settings
from tests.jobtargets import SCRIPT, crash, hang, oom_error, oom_kill, raise_error

ROOT = Path(__file__).resolve().parents[1]
CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
SMALL = Requirements(ranks=1, peak_bytes=10**6)
STEPS = {fn: steps for steps, fn in SCRIPT.items()}


def request(steps: int = 3, timeout_s: float = 60.0) -> ValidationRequest:
    return ValidationRequest.model_validate({
        "model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
                  "vocab_size": 256, "max_sequence_length": 64},
        "training": {"precision": "fp32", "sequence_length": 32},
        "device": "cpu", "steps": steps, "timeout_s": timeout_s,
    })


def settings(url: str, **kw) -> Settings:
    base = dict(database_url=url, lease_s=3.0, heartbeat_s=0.3, poll_s=0.1,
                job_target="tests.jobtargets:scripted", worker_device=CPU, shutdown_grace_s=0)
    return Settings(**{**base, **kw})


def wait_for(predicate, timeout_s: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def store(db_url):
    s = JobStore(db_url, lease_s=3.0, max_attempts=3)
    yield s
    s.close()


def run_in_thread(worker: Worker, max_jobs: int) -> threading.Thread:
    t = threading.Thread(target=worker.run, kwargs={"max_jobs": max_jobs}, daemon=True)
    t.start()
    return t


# ---- in-process worker, real job processes -----------------------------------------------------
def test_failing_jobs_fail_alone_and_the_worker_serves_the_next(store, db_url):
    """A crash, an exception, a Python OOM and an OOM kill each fail their own job with a clear
    reason; the same worker then runs a good job."""
    jobs = [store.submit(request(STEPS[fn]), SMALL).id
            for fn in (crash, raise_error, oom_error, oom_kill)]
    good = store.submit(request(3), SMALL).id
    worker = Worker(store, settings(db_url))
    t = run_in_thread(worker, max_jobs=5)
    t.join(60)
    assert not t.is_alive()
    errors = [store.get(j).error for j in jobs]
    assert all(store.get(j).status == "failed" for j in jobs)
    assert "exited with code 3" in errors[0]
    assert "RuntimeError: simulated failure" in errors[1]
    assert errors[2].startswith("out of memory: MemoryError")
    assert "killed by SIGKILL" in errors[3] and "out-of-memory" in errors[3]
    done = store.get(good)
    assert done.status == "succeeded" and done.result is not None
    assert done.progress.step == done.progress.total_steps == 3


def test_a_hanging_job_is_killed_at_its_limit(store, db_url, tmp_path, monkeypatch):
    job = store.submit(request(STEPS[hang]), SMALL, timeout_s=1.5).id
    worker = Worker(store, settings(db_url))
    start = time.monotonic()
    assert worker.run_once()
    elapsed = time.monotonic() - start
    failed = store.get(job)
    assert failed.status == "failed" and "wall-clock limit of 1.5 s" in failed.error
    assert 1.5 <= elapsed < 10


def test_cancel_stops_the_running_process(store, db_url, tmp_path, monkeypatch):
    log = tmp_path / "runs.log"
    monkeypatch.setenv("MEMPLAN_TEST_LOG", str(log))
    monkeypatch.setenv("MEMPLAN_TEST_STEP_S", "1.0")
    job = store.submit(request(20), SMALL).id
    worker = Worker(store, settings(db_url))
    t = run_in_thread(worker, max_jobs=1)
    wait_for(lambda: store.get(job).progress.step >= 1, 20, "the job to start")
    store.cancel(job)
    t.join(10)
    assert not t.is_alive()  # the worker stopped the process at its next heartbeat
    assert store.get(job).status == "cancelled"
    lines = log.read_text().split()
    pid = int(lines[1])
    assert lines[0] == "start" and "finish" not in lines
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_oversized_job_is_refused_with_the_numbers(store, db_url):
    """The fit check compares the estimate with free memory before the target runs."""
    job = store.submit(request(3), Requirements(ranks=1, peak_bytes=2**50)).id
    big = DeviceInfo(kind="cpu", count=2, memory_bytes=2**51)
    Worker(store, settings(db_url, worker_device=big)).run_once()
    failed = store.get(job)
    assert failed.status == "failed"
    assert "refused before running" in failed.error and "1,125,899,906,842,624 bytes" in failed.error
    assert "available" in failed.error and '"traced"' in failed.error


# ---- worker processes --------------------------------------------------------------------------
def _env(db_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), MEMPLAN_DATABASE_URL=db_url,
               MEMPLAN_JOB_TARGET="tests.jobtargets:scripted", MEMPLAN_WORKER_DEVICE="cpu:2:16GiB",
               MEMPLAN_LEASE_S="2", MEMPLAN_HEARTBEAT_S="0.3", MEMPLAN_POLL_S="0.1",
               MEMPLAN_SHUTDOWN_GRACE_S="0", MEMPLAN_TEST_LOG=str(tmp_path / "runs.log"),
               MEMPLAN_TEST_STEP_S="0.4")
    env.update(extra)
    return env


def start_worker(env: dict[str, str], tmp_path: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, env=env,
                            stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_kill_9_a_worker_mid_job_and_another_finishes_it_exactly_once(store, db_url, tmp_path):
    env = _env(db_url, tmp_path)
    job = store.submit(request(12), SMALL).id
    a = start_worker(env, tmp_path, "a")
    b = None
    try:
        wait_for(lambda: store.get(job).progress.step >= 2, 20, "worker A to run the job")
        a.send_signal(signal.SIGKILL)
        a.wait(5)
        b = start_worker(env, tmp_path, "b")
        done = wait_for(lambda: (j := store.get(job)).status in ("succeeded", "failed") and j,
                        25, "worker B to finish the job")
        assert done.status == "succeeded", done.error
        assert done.attempts == 2
        history = store.history(job)
        assert [h["outcome"] for h in history] == ["lease expired (worker lost)", "succeeded"]
        assert history[0]["worker"] != history[1]["worker"]
        lines = [line.split() for line in (tmp_path / "runs.log").read_text().splitlines()]
        starts = [int(pid) for word, pid in lines if word == "start"]
        finishes = [int(pid) for word, pid in lines if word == "finish"]
        assert len(starts) == 2 and finishes == [starts[1]]  # A's job process died with A
        with pytest.raises(ProcessLookupError):
            os.kill(starts[0], 0)
    finally:
        stop(a)
        if b is not None:
            stop(b)


def test_sigterm_releases_the_job_in_hand(store, db_url, tmp_path):
    env = _env(db_url, tmp_path, MEMPLAN_TEST_STEP_S="1.0")
    job = store.submit(request(30), SMALL).id
    w = start_worker(env, tmp_path, "w")
    try:
        wait_for(lambda: store.get(job).progress.step >= 1, 20, "the worker to run the job")
        w.send_signal(signal.SIGTERM)
        assert w.wait(15) == 0
        released = store.get(job)
        assert released.status == "queued" and released.attempts == 0
        assert "released" in store.history(job)[0]["outcome"]
    finally:
        stop(w)


def test_sigterm_lets_a_short_job_finish(store, db_url, tmp_path):
    env = _env(db_url, tmp_path, MEMPLAN_SHUTDOWN_GRACE_S="20", MEMPLAN_TEST_STEP_S="0.3")
    job = store.submit(request(8), SMALL).id
    w = start_worker(env, tmp_path, "w")
    try:
        wait_for(lambda: store.get(job).progress.step >= 1, 20, "the worker to run the job")
        w.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0
        assert store.get(job).status == "succeeded"
    finally:
        stop(w)


# ---- API restart -------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(env: dict[str, str], port: int, tmp_path: Path, name: str, *,
                worker: bool = False, timeout_s: float = 20) -> subprocess.Popen:
    """``memplan serve`` (the API, with its embedded worker when ``worker``), once ready."""
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", *([] if worker else ["--no-worker"]),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout_s, f"memplan serve ({name}) to be ready", interval=0.2)
    return proc


def test_restart_the_api_mid_job_and_the_client_poll_continues(store, db_url, tmp_path):
    import json

    env = _env(db_url, tmp_path, MEMPLAN_TEST_STEP_S="0.5",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    spec = tmp_path / "spec.json"
    spec.write_text(request(12).model_dump_json())
    api = start_serve(env, port, tmp_path, "api-1")
    procs = [api]
    try:
        procs.append(worker := start_worker(env, tmp_path, "worker"))
        client = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "validate", str(spec), "--json",
             "--server", f"http://127.0.0.1:{port}", "--poll-s", "0.2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(client)
        page = wait_for(lambda: store.list(status="running").items, 20, "the job to run")
        job_id = page[0].id
        wait_for(lambda: store.get(job_id).progress.step >= 2, 10, "progress")
        api.send_signal(signal.SIGKILL)
        api.wait(5)
        time.sleep(1.0)  # the client polls a dead server for a while
        procs.append(start_serve(env, port, tmp_path, "api-2"))
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, err
        result = json.loads(out)
        assert set(result["estimate"]) >= {"parameters", "total"} and "relative_error" in result
        job = store.get(job_id)
        assert job.status == "succeeded" and job.attempts == 1  # nothing lost, nothing redone
        assert worker.poll() is None  # the worker kept serving throughout
    finally:
        for p in procs:
            stop(p)
