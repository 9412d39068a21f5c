"""The job store on both backends: lifecycle, pagination, claims, leases, exactly-once results."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import inspect, text

from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import Progress
from service.jobs.migrations import LATEST, current_version, migrate
from service.jobs.store import (BadCursor, JobFinished, JobNotFound, JobStore, Requirements,
                                make_engine)
from service.settings import DeviceInfo
from tests.jobtargets import fake_result

REQUEST = ValidationRequest.model_validate({
    "model": {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4,
              "vocab_size": 256, "max_sequence_length": 64},
    "training": {"precision": "fp32", "sequence_length": 32},
    "device": "cpu", "steps": 3,
})
CPU = DeviceInfo(kind="cpu", count=2, memory_bytes=16 * 2**30)
H100 = DeviceInfo(kind="h100-80gb", count=8, memory_bytes=80 * 2**30)
SMALL = Requirements(ranks=1, peak_bytes=10**6)


@pytest.fixture
def store(db_url):
    s = JobStore(db_url, lease_s=30, max_attempts=2)
    yield s
    s.close()


def test_schema_is_created_by_the_app_and_migrations_are_idempotent(db_url):
    engine = make_engine(db_url)
    try:
        assert migrate(engine) == 0
        assert migrate(engine) == LATEST
        with engine.connect() as conn:
            assert current_version(conn) == LATEST
            assert inspect(conn).has_table("validation_jobs")
            rows = conn.execute(text("SELECT COUNT(*) FROM memplan_schema_version")).scalar()
        assert rows == LATEST
    finally:
        engine.dispose()


def test_concurrent_startups_migrate_once(db_url):
    errors = []

    def start():
        try:
            JobStore(db_url).close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM memplan_schema_version")).scalar() == LATEST
    engine.dispose()


def test_submit_get_and_lifecycle(store):
    job = store.submit(REQUEST, SMALL)
    assert job.status == "queued" and job.attempts == 0 and job.progress.total_steps == 3
    assert store.get(job.id) == job
    claim = store.claim("w1", CPU)
    assert claim is not None and claim.job_id == job.id and claim.attempt == 1
    assert claim.request == REQUEST
    running = store.get(job.id)
    assert running.status == "running" and running.started_at is not None
    assert store.progress(claim, Progress(phase="step", step=2, total_steps=3))
    assert store.get(job.id).progress == Progress(phase="step", step=2, total_steps=3)
    assert store.renew(claim)
    assert store.complete(claim, fake_result())
    done = store.get(job.id)
    assert done.status == "succeeded" and done.result == fake_result()
    assert done.progress.step == 3 and done.finished_at is not None and done.error is None
    assert not store.complete(claim, fake_result())  # exactly once
    assert store.history(job.id)[0]["outcome"] == "succeeded"


def test_unknown_id(store):
    with pytest.raises(JobNotFound):
        store.get("nope")
    with pytest.raises(JobNotFound):
        store.cancel("nope")


def test_fail_records_reason(store):
    job = store.submit(REQUEST, SMALL)
    claim = store.claim("w1", CPU)
    assert store.fail(claim, "the job raised: RuntimeError: boom")
    failed = store.get(job.id)
    assert failed.status == "failed" and "boom" in failed.error and failed.result is None


def test_cancel_queued_and_running(store):
    queued = store.submit(REQUEST, SMALL)
    running = store.submit(REQUEST, SMALL)
    claim = store.claim("w1", CPU)
    assert claim.job_id == queued.id  # oldest first
    store.cancel(running.id)
    assert store.get(running.id).status == "cancelled"
    assert store.claim("w2", CPU) is None  # a cancelled job is never claimed
    assert store.cancel(queued.id).status == "cancelled"
    assert not store.renew(claim)  # the worker learns of the cancellation at its heartbeat
    assert not store.progress(claim, Progress(phase="step", step=1, total_steps=3))
    assert not store.complete(claim, fake_result())
    assert store.get(queued.id).status == "cancelled"
    with pytest.raises(JobFinished):
        store.cancel(queued.id)


def test_list_pagination_and_status_filter(store):
    ids = [store.submit(REQUEST, SMALL).id for _ in range(7)]
    claim = store.claim("w", CPU)
    store.complete(claim, fake_result())
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list(cursor=cursor, limit=3)
        seen += [j.id for j in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
        assert pages < 10
    assert seen == ids[::-1] and pages == 3  # newest first, no gaps, no repeats
    assert [j.id for j in store.list(status="succeeded").items] == [ids[0]]
    assert len(store.list(status="queued").items) == 6
    assert store.list(status="failed").items == []
    with pytest.raises(BadCursor):
        store.list(cursor="garbage!")


def test_claim_respects_device(store):
    big = store.submit(REQUEST, Requirements(ranks=1, peak_bytes=40 * 2**30))
    wide = store.submit(REQUEST, Requirements(ranks=8, peak_bytes=10**6))
    cuda = store.submit(REQUEST, Requirements(needs="cuda"))
    a100 = store.submit(REQUEST, Requirements(needs="cuda", gpu_kind="a100-80gb"))
    assert store.claim("cpu-worker", CPU) is None
    got = [store.claim("gpu-worker", H100) for _ in range(4)]
    assert [c.job_id if c else None for c in got] == [big.id, wide.id, cuda.id, None]
    assert store.claim("a100", DeviceInfo(kind="a100-80gb", count=1, memory_bytes=80 * 2**30)
                       ).job_id == a100.id


def test_concurrent_claims_take_each_job_once(store, db_url):
    n_jobs = 12
    for _ in range(n_jobs):
        store.submit(REQUEST, SMALL)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        s = JobStore(db_url, migrate_schema=False)
        try:
            while True:
                c = s.claim(f"w{i}", CPU)
                if c is None:
                    return
                with lock:
                    claimed.append(c.job_id)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == n_jobs and len(set(claimed)) == n_jobs


def test_expired_lease_requeues_then_fails_with_history(db_url):
    store = JobStore(db_url, lease_s=0.2, max_attempts=2)
    try:
        job = store.submit(REQUEST, SMALL)
        first = store.claim("lost-1", CPU)
        time.sleep(0.3)
        assert store.requeue_expired() == [job.id]
        requeued = store.get(job.id)
        assert requeued.status == "queued" and requeued.attempts == 1
        assert not store.renew(first)  # the first worker's claim is gone
        second = store.claim("lost-2", CPU)
        assert second.attempt == 2
        assert not store.complete(first, fake_result())  # a stale claim cannot finish it
        time.sleep(0.3)
        assert store.requeue_expired() == [job.id]
        failed = store.get(job.id)
        assert failed.status == "failed" and failed.attempts == 2
        assert "gave up after 2 attempts" in failed.error
        assert "lost-1" in failed.error and "lost-2" in failed.error
        assert [h["worker"] for h in store.history(job.id)] == ["lost-1", "lost-2"]
        assert store.requeue_expired() == []
    finally:
        store.close()


def test_renewed_lease_is_not_requeued(db_url):
    store = JobStore(db_url, lease_s=0.5)
    try:
        store.submit(REQUEST, SMALL)
        claim = store.claim("w", CPU)
        for _ in range(4):
            time.sleep(0.2)
            assert store.renew(claim)
            assert store.requeue_expired() == []
    finally:
        store.close()


def test_release_returns_job_without_spending_an_attempt(store):
    job = store.submit(REQUEST, SMALL)
    claim = store.claim("w", CPU)
    assert store.release(claim, "released: worker shut down")
    again = store.get(job.id)
    assert again.status == "queued" and again.attempts == 0
    assert store.claim("w2", CPU).attempt == 1


# ---- cursors --------------------------------------------------------------------------------------
def _cursor(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_cursor_outside_the_key_range_is_a_bad_cursor_not_a_database_error(store):
    """A crafted cursor carrying an integer beyond the 64-bit key (an OverflowError on SQLite,
    a database error on PostgreSQL) is refused as a bad cursor, like any other garbage."""
    from service.jobs.store import MAX_SEQ, decode_cursor, encode_cursor

    ids = [store.submit(REQUEST, SMALL).id for _ in range(2)]
    huge = "czk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OQ"  # 's' + 31 nines
    for cursor in (huge, _cursor(f"s{MAX_SEQ + 1}"), _cursor("s0"), _cursor("s-5"),
                   _cursor("s1_0"), _cursor("s 7"), _cursor("s٣")):
        with pytest.raises(BadCursor):
            store.list(cursor=cursor)
    assert decode_cursor(encode_cursor(MAX_SEQ)) == MAX_SEQ
    assert [j.id for j in store.list(cursor=encode_cursor(MAX_SEQ)).items] == ids[::-1]


# ---- workers: heartbeats, waiting reasons, unrunnable jobs, reclaim -------------------------------
CUDA_JOB = Requirements(needs="cuda")


def beat(store: JobStore, name: str, device: DeviceInfo, sole: bool = False) -> None:
    store.heartbeat_worker(name, f"inst-{name}", "host-a", 1, device, sole)


def test_workers_advertise_what_they_run_and_age_out(db_url):
    store = JobStore(db_url, lease_s=0.5)
    try:
        assert store.live_workers() == []
        beat(store, "w-cpu", CPU)
        beat(store, "w-gpu", H100)
        beat(store, "w-cpu", CPU)  # a heartbeat updates the row
        live = {w.id: w for w in store.live_workers()}
        assert set(live) == {"w-cpu", "w-gpu"}
        assert live["w-gpu"].device == H100 and live["w-cpu"].memory_bytes == 16 * 2**30
        store.forget_worker("w-gpu", "another-instance")  # only its own instance removes it
        assert len(store.live_workers()) == 2
        store.forget_worker("w-gpu", "inst-w-gpu")
        assert [w.id for w in store.live_workers()] == ["w-cpu"]
        time.sleep(0.6)
        assert store.live_workers() == []  # silent for a lease: not live
        assert store.worker("w-cpu").kind == "cpu"  # the row stays until pruned
        assert store.prune_workers(0.1) == 1 and store.worker("w-cpu") is None
    finally:
        store.close()


def test_a_queued_job_says_why_no_live_worker_runs_it(store):
    cuda = store.submit(REQUEST, CUDA_JOB)
    big = store.submit(REQUEST, Requirements(ranks=1, peak_bytes=40 * 2**30))
    small = store.submit(REQUEST, SMALL)
    # No worker at all: every queued job waits for one.
    for job in (cuda, big, small):
        assert store.get(job.id).waiting_reason.startswith("no live worker (none has sent")
    beat(store, "w-cpu", CPU)
    reason = store.get(cuda.id).waiting_reason
    assert reason == ("no live worker has a cuda device; live workers: 1 worker with "
                      "2 x cpu (16.0 GiB each)")
    assert "no live worker can hold it" in store.get(big.id).waiting_reason
    assert "42,949,672,960 bytes" in store.get(big.id).waiting_reason
    assert store.get(small.id).waiting_reason is None
    listed = {j.id: j.waiting_reason for j in store.list().items}
    assert listed[cuda.id] == reason and listed[small.id] is None
    beat(store, "w-gpu", H100)
    assert store.get(cuda.id).waiting_reason is None and store.get(big.id).waiting_reason is None
    a100 = store.submit(REQUEST, Requirements(needs="cuda", gpu_kind="a100-80gb"))
    assert store.get(a100.id).waiting_reason == (
        "no live worker has a device of kind a100-80gb; live workers: 1 worker with 2 x cpu "
        "(16.0 GiB each); 1 worker with 8 x h100-80gb (80.0 GiB each)")
    store.cancel(a100.id)
    claim = store.claim("w-gpu", H100)
    assert store.get(claim.job_id).waiting_reason is None  # only queued jobs wait


def test_unrunnable_jobs_fail_after_the_timeout_with_the_reason(db_url):
    store = JobStore(db_url, lease_s=30)
    try:
        cuda = store.submit(REQUEST, CUDA_JOB)
        small = store.submit(REQUEST, SMALL)
        assert store.fail_unrunnable(0.3) == []  # no live worker: the jobs wait for one
        time.sleep(0.4)
        assert store.fail_unrunnable(0.3) == []  # ... without a limit
        beat(store, "w-cpu", CPU)
        assert store.fail_unrunnable(0.3) == []  # the clock starts now
        assert store.get(cuda.id).status == "queued"
        time.sleep(0.4)
        assert store.fail_unrunnable(0.3) == [cuda.id]
        failed = store.get(cuda.id)
        assert failed.status == "failed" and failed.finished_at is not None
        assert "no live worker could run it" in failed.error and "limit is 0.3 s" in failed.error
        assert "no live worker has a cuda device; live workers: 1 worker with 2 x cpu" in \
            failed.error
        assert store.get(small.id).status == "queued"  # a CPU worker runs it
        # A job that becomes runnable again (a worker came) has its clock reset.
        other = store.submit(REQUEST, CUDA_JOB)
        store.fail_unrunnable(0.3)
        beat(store, "w-gpu", H100)
        time.sleep(0.4)
        assert store.fail_unrunnable(0.3) == []
        assert store.get(other.id).status == "queued"
    finally:
        store.close()


def test_submission_refused_when_no_live_worker_can_hold_the_job(store):
    huge = Requirements(ranks=1, peak_bytes=40 * 2**30)
    # No live worker, or none of its device class: accepted (it waits; see waiting_reason).
    assert store.submit(REQUEST, huge, check_workers=True).status == "queued"
    beat(store, "w-gpu", H100)
    store.submit(REQUEST, Requirements(needs="cpu", peak_bytes=40 * 2**30), check_workers=True)
    store.forget_worker("w-gpu", "inst-w-gpu")
    beat(store, "w-cpu", CPU, sole=True)
    from service.jobs.store import NoWorkerCanRun

    with pytest.raises(NoWorkerCanRun) as refused:
        store.submit(REQUEST, huge, check_workers=True)
    assert refused.value.field == "body.mode"
    text = str(refused.value)
    assert "42,949,672,960 bytes" in text and "17,179,869,184 bytes" in text
    assert '"mode": "traced"' in text and "1 worker with 2 x cpu (16.0 GiB each)" in text
    # CPU ranks share the host: 4 ranks x 5 GiB do not fit 16 GiB.
    with pytest.raises(NoWorkerCanRun, match="4 ranks x 5.00 GiB"):
        store.submit(REQUEST, Requirements(ranks=4, peak_bytes=5 * 2**30), check_workers=True)
    # A sole CPU worker runs more ranks than it has cores; a GPU worker needs a device per rank.
    store.submit(REQUEST, Requirements(ranks=4, peak_bytes=10**6), check_workers=True)
    beat(store, "w-gpu", DeviceInfo(kind="h100-80gb", count=2, memory_bytes=80 * 2**30))
    with pytest.raises(NoWorkerCanRun) as refused:
        store.submit(REQUEST, Requirements(ranks=4, needs="cuda", peak_bytes=10**6),
                     check_workers=True)
    assert refused.value.field == "body.parallelism" and "it has 2" in str(refused.value)


def test_claim_filter_and_capabilities_agree(store):
    """The claim's SQL filter and capabilities.claimable decide alike (CPU ranks share memory)."""
    from service.jobs.capabilities import WorkerInfo, claimable

    cases = [Requirements(ranks=2, peak_bytes=9 * 2**30), Requirements(ranks=2, peak_bytes=2**30),
             Requirements(ranks=3, peak_bytes=10**6), CUDA_JOB,
             Requirements(needs="cuda", gpu_kind="a100-80gb")]
    for req in cases:
        job = store.submit(REQUEST, req)
        expected = claimable(req, WorkerInfo(id="w", kind="cpu", count=2,
                                             memory_bytes=16 * 2**30))
        claim = store.claim("w", CPU)
        assert (claim is not None) == expected, req
        store.cancel(job.id)


def test_reclaim_requeues_the_jobs_running_under_an_identity(db_url):
    store = JobStore(db_url, lease_s=30, max_attempts=2)
    try:
        mine = store.submit(REQUEST, SMALL)
        theirs = store.submit(REQUEST, SMALL)
        store.claim("node-a/embedded", CPU)
        other = store.claim("node-b", CPU)
        assert store.reclaim("node-a/embedded") == [mine.id]
        requeued = store.get(mine.id)
        assert requeued.status == "queued" and requeued.attempts == 1  # the attempt counts
        assert store.history(mine.id)[0]["outcome"].startswith("worker restarted")
        assert store.get(theirs.id).status == "running" and store.renew(other)
        store.claim("node-a/embedded", CPU)
        assert store.reclaim("node-a/embedded") == [mine.id]
        failed = store.get(mine.id)  # out of attempts: failed with its history
        assert failed.status == "failed" and "gave up after 2 attempts" in failed.error
        assert store.reclaim("node-a/embedded") == []
    finally:
        store.close()
