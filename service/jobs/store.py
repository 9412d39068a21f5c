"""The job store: validation jobs in one SQL table, which is also the queue.

Backends: SQLite (default, one file) and PostgreSQL (shared by several API replicas and workers).
Claims are atomic on both: PostgreSQL takes the oldest runnable row with
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on each other; SQLite runs
every transaction as ``BEGIN IMMEDIATE``, one writer at a time.

Every claim gets a fresh token. Progress, heartbeats and the final result are written only while
the row still carries that token and is running, so a worker whose lease expired (and whose job
was re-queued and claimed by another) can no longer change the job: a job completes exactly once.

Workers also write a heartbeat row (``memplan_workers``) saying what they can run, so that a
queued job no live worker can run says why (``waiting_reason``) and, after
``unrunnable_timeout_s``, fails with that reason instead of waiting for ever.

Times are epoch seconds from the writer's clock (workers on different nodes are assumed to keep
their clocks in sync, as NTP does, to well under a lease).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (Engine, and_, case, create_engine, delete, event, func, or_, select, text,
                        update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from planner.catalog.specs import ValidationRequest
from planner.catalog.validation_specs import (JobStatus, Progress, ValidationJob, ValidationPage,
                                             ValidationResult)
from service.jobs.capabilities import (Requirements, WorkerInfo, submission_refusal,
                                       waiting_reason)
from service.jobs.migrations import jobs, migrate, workers
from service.settings import DeviceInfo, ensure_sqlite_folder

FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")
MAX_PAGE = 200
# A cursor carries a job's seq, a 64-bit signed integer on both backends (PostgreSQL BIGINT,
# SQLite INTEGER).
MAX_SEQ = 2**63 - 1
# PostgreSQL advisory lock class for per-owner submissions (the other key is the owner's hash).
_PG_SUBMIT_LOCK = 0x6D70


class JobNotFound(LookupError):
    pass


class JobFinished(RuntimeError):
    """The job has already ended; it cannot be cancelled."""

    def __init__(self, job: ValidationJob) -> None:
        super().__init__(f"job {job.id} has already {job.status}")
        self.job = job


class BadCursor(ValueError):
    pass


class IdempotencyConflict(ValueError):
    """The Idempotency-Key was used before with a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used before with a different request")
        self.key = key


class NoWorkerCanRun(ValueError):
    """No live worker of the job's device class can hold it (the reason has the numbers;
    ``field`` is the request field to change)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


class QueueFull(RuntimeError):
    """The submitter already has ``limit`` jobs queued."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs queued for this client; the limit is {limit}")
        self.queued, self.limit = queued, limit


@dataclass(frozen=True)
class Claim:
    """A job a worker holds: valid while the row carries ``token``."""

    job_id: str
    token: str
    worker: str
    attempt: int
    request: ValidationRequest
    timeout_s: float
    peak_bytes: int


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The seq a cursor carries: 1 to MAX_SEQ, the range of the job table's key (BadCursor
    otherwise, never a value the database cannot compare)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raw = ""
    m = re.fullmatch(r"s([0-9]{1,19})", raw)
    if m is None or not 1 <= int(m.group(1)) <= MAX_SEQ:
        raise BadCursor(f"invalid cursor {cursor!r}: it must be a next_cursor from a previous page "
                        f"(one that encodes a position from 1 to {MAX_SEQ})")
    return int(m.group(1))


def make_engine(url: str) -> Engine:
    """An engine for the job store; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE."""
    if url.startswith("sqlite"):
        ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA busy_timeout=30000")

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


class JobStore:
    """Submit, read, list, cancel, claim, heartbeat, progress, finish and re-queue jobs."""

    def __init__(self, url_or_engine: str | Engine, *, lease_s: float = 30.0,
                 max_attempts: int = 3, migrate_schema: bool = True) -> None:
        self.engine = (make_engine(url_or_engine) if isinstance(url_or_engine, str)
                       else url_or_engine)
        # lease_s is also how long a worker counts as live after its last heartbeat.
        self.lease_s, self.max_attempts = lease_s, max_attempts
        if migrate_schema:
            migrate(self.engine)

    @classmethod
    def from_settings(cls, settings: Any) -> "JobStore":
        return cls(settings.database_url, lease_s=settings.lease_s,
                   max_attempts=settings.max_attempts)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # ---- reading ------------------------------------------------------------------------------
    @staticmethod
    def _requirements(row: RowMapping) -> Requirements:
        return Requirements(ranks=row["ranks"], peak_bytes=row["peak_bytes"], needs=row["needs"],
                            gpu_kind=row["gpu_kind"])

    def _to_model(self, row: RowMapping, live: list[WorkerInfo] | None = None) -> ValidationJob:
        """The job resource; a queued job says why it waits when ``live`` (the live workers) is
        given and none of them can run it."""
        reason = None
        if live is not None and row["status"] == "queued":
            reason = waiting_reason(self._requirements(row), live, self.lease_s)
        return ValidationJob(
            id=row["id"],
            status=row["status"],
            progress=Progress(phase=row["phase"], step=row["step"], total_steps=row["total_steps"]),
            request=ValidationRequest.model_validate_json(row["request"]),
            result=(ValidationResult.model_validate_json(row["result"]) if row["result"]
                    else None),
            error=row["error"],
            attempts=row["attempts"],
            created_at=_iso(row["created_at"]),
            started_at=_iso(row["started_at"]),
            finished_at=_iso(row["finished_at"]),
            waiting_reason=reason,
        )

    def _row(self, conn: Connection, job_id: str, lock: bool = False) -> RowMapping | None:
        q = select(jobs).where(jobs.c.id == job_id)
        if lock:
            q = q.with_for_update()
        return conn.execute(q).mappings().first()

    def get(self, job_id: str) -> ValidationJob:
        with self.engine.begin() as conn:
            row = self._row(conn, job_id)
            live = (self._live_workers(conn, time.time())
                    if row is not None and row["status"] == "queued" else None)
        if row is None:
            raise JobNotFound(job_id)
        return self._to_model(row, live)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.begin() as conn:
            row = self._row(conn, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return json.loads(row["history"])

    def list(self, status: JobStatus | None = None, cursor: str | None = None,
             limit: int = 50) -> ValidationPage:
        """Newest first; ``next_cursor`` continues after the last item (None on the last page)."""
        limit = max(1, min(limit, MAX_PAGE))
        q = select(jobs).order_by(jobs.c.seq.desc()).limit(limit + 1)
        if status is not None:
            q = q.where(jobs.c.status == status)
        if cursor:
            q = q.where(jobs.c.seq < decode_cursor(cursor))
        with self.engine.begin() as conn:
            rows = conn.execute(q).mappings().all()
            live = (self._live_workers(conn, time.time())
                    if any(r["status"] == "queued" for r in rows) else None)
        more = len(rows) > limit
        rows = rows[:limit]
        return ValidationPage(items=[self._to_model(r, live) for r in rows],
                              next_cursor=encode_cursor(rows[-1]["seq"]) if more else None)

    # ---- client side --------------------------------------------------------------------------
    def submit(self, request: ValidationRequest, requirements: Requirements,
               timeout_s: float | None = None, *, owner: str = "",
               idempotency_key: str | None = None, request_hash: str | None = None,
               max_queued: int | None = None, check_workers: bool = False) -> ValidationJob:
        """Queue a job; see ``submit_once``."""
        return self.submit_once(request, requirements, timeout_s, owner=owner,
                                idempotency_key=idempotency_key, request_hash=request_hash,
                                max_queued=max_queued, check_workers=check_workers)[0]

    def submit_once(self, request: ValidationRequest, requirements: Requirements,
                    timeout_s: float | None = None, *, owner: str = "",
                    idempotency_key: str | None = None, request_hash: str | None = None,
                    max_queued: int | None = None,
                    check_workers: bool = False) -> tuple[ValidationJob, bool]:
        """Queue a job for ``owner``; returns (job, created).

        With an ``idempotency_key``, the owner's earlier job under that key is returned as it is
        (created False) when ``request_hash`` matches, and IdempotencyConflict is raised when it
        does not. ``max_queued`` caps the owner's queued jobs (QueueFull); the count and the
        insert are one transaction, serialized per owner, so concurrent submissions cannot pass
        the cap together. ``check_workers`` refuses (NoWorkerCanRun) a new job that no live worker
        of its device class can hold (see ``capabilities.submission_refusal``)."""
        for _ in range(2):
            try:
                return self._submit(request, requirements, timeout_s, owner, idempotency_key,
                                    request_hash, max_queued, check_workers)
            except IntegrityError:
                # Another submission with the same key committed first: the next pass finds it.
                if idempotency_key is None:
                    raise
        raise IdempotencyConflict(idempotency_key or "")  # pragma: no cover - needs 3 races

    def _submit(self, request: ValidationRequest, requirements: Requirements,
                timeout_s: float | None, owner: str, key: str | None, body_hash: str | None,
                max_queued: int | None, check_workers: bool) -> tuple[ValidationJob, bool]:
        now = time.time()
        job_id = uuid.uuid4().hex
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Serializes one owner's submissions (SQLite's BEGIN IMMEDIATE already does).
                conn.execute(text("SELECT pg_advisory_xact_lock(:a, hashtext(:o))"),
                             {"a": _PG_SUBMIT_LOCK, "o": owner})
            if key is not None:
                row = conn.execute(select(jobs).where(jobs.c.owner == owner,
                                                      jobs.c.idempotency_key == key)
                                   ).mappings().first()
                if row is not None:
                    if row["request_hash"] != body_hash:
                        raise IdempotencyConflict(key)
                    return self._to_model(row, self._live_workers(conn, now)), False
            live = self._live_workers(conn, now)
            if check_workers:
                refusal = submission_refusal(requirements, live)
                if refusal is not None:
                    raise NoWorkerCanRun(*refusal)
            if max_queued is not None:
                queued = conn.execute(select(func.count()).select_from(jobs).where(
                    jobs.c.owner == owner, jobs.c.status == "queued")).scalar_one()
                if queued >= max_queued:
                    raise QueueFull(queued, max_queued)
            conn.execute(jobs.insert().values(
                id=job_id, status="queued", request=request.model_dump_json(),
                phase="queued", step=0, total_steps=request.steps, attempts=0, history="[]",
                ranks=requirements.ranks, peak_bytes=requirements.peak_bytes,
                needs=requirements.needs, gpu_kind=requirements.gpu_kind,
                timeout_s=timeout_s if timeout_s is not None else request.timeout_s,
                owner=owner, idempotency_key=key, request_hash=body_hash,
                created_at=now, updated_at=now))
            row = self._row(conn, job_id)
        return self._to_model(row, live), True

    def queue_depth(self) -> dict[str, int]:
        """Jobs per state (every state present, 0 when none)."""
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        depth = {s: 0 for s in ("queued", "running", "succeeded", "failed", "cancelled")}
        depth.update({status: n for status, n in rows})
        return depth

    def cancel(self, job_id: str) -> ValidationJob:
        """Cancel a queued or running job (a running job's worker sees it at its next heartbeat
        and stops the process). Raises JobNotFound, or JobFinished if it has already ended."""
        now = time.time()
        with self.engine.begin() as conn:
            row = self._row(conn, job_id, lock=True)
            if row is None:
                raise JobNotFound(job_id)
            if row["status"] in FINISHED:
                raise JobFinished(self._to_model(row))
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                status="cancelled", phase="cancelled", error="cancelled by request",
                finished_at=now, updated_at=now, lease_expires_at=None))
            row = self._row(conn, job_id)
        return self._to_model(row)

    # ---- worker side --------------------------------------------------------------------------
    def claim(self, worker: str, device: DeviceInfo, *, by_capacity: bool = True) -> Claim | None:
        """Take the oldest queued job this device can run, with a fresh lease.

        ``by_capacity=False`` (a sole worker, as in ``memplan serve``) also takes jobs larger
        than the device, so that its fit check refuses them with the numbers instead of leaving
        them queued for a worker that does not exist."""
        conditions = [jobs.c.status == "queued",
                      or_(jobs.c.gpu_kind.is_(None), jobs.c.gpu_kind == device.kind)]
        if device.kind == "cpu":
            conditions.append(jobs.c.needs != "cuda")
        if by_capacity:  # capabilities.shortfall, in SQL: CPU ranks share the host's memory
            need = jobs.c.peak_bytes * jobs.c.ranks if device.kind == "cpu" else jobs.c.peak_bytes
            conditions += [jobs.c.ranks <= device.count, need <= device.memory_bytes]
        runnable = and_(*conditions)
        q = (select(jobs.c.seq).where(runnable).order_by(jobs.c.seq).limit(1)
             .with_for_update(skip_locked=True))
        now = time.time()
        token = uuid.uuid4().hex
        with self.engine.begin() as conn:
            seq = conn.execute(q).scalar_one_or_none()
            if seq is None:
                return None
            conn.execute(update(jobs).where(jobs.c.seq == seq).values(
                status="running", phase="starting", step=0, worker=worker, claim_token=token,
                unrunnable_since=None,
                lease_expires_at=now + self.lease_s, claimed_at=now,
                attempts=jobs.c.attempts + 1,
                started_at=func.coalesce(jobs.c.started_at, now), updated_at=now))
            row = conn.execute(select(jobs).where(jobs.c.seq == seq)).mappings().one()
        return Claim(job_id=row["id"], token=token, worker=worker, attempt=row["attempts"],
                     request=ValidationRequest.model_validate_json(row["request"]),
                     timeout_s=row["timeout_s"], peak_bytes=row["peak_bytes"])

    def _held(self, claim: Claim) -> Any:
        return and_(jobs.c.id == claim.job_id, jobs.c.claim_token == claim.token,
                    jobs.c.status == "running")

    def renew(self, claim: Claim) -> bool:
        """Heartbeat: extend the lease. False when the claim is gone (cancelled or lost)."""
        now = time.time()
        with self.engine.begin() as conn:
            n = conn.execute(update(jobs).where(self._held(claim)).values(
                lease_expires_at=now + self.lease_s, updated_at=now)).rowcount
        return n == 1

    def progress(self, claim: Claim, progress: Progress) -> bool:
        now = time.time()
        with self.engine.begin() as conn:
            n = conn.execute(update(jobs).where(self._held(claim)).values(
                phase=progress.phase[:64], step=progress.step, total_steps=progress.total_steps,
                lease_expires_at=now + self.lease_s, updated_at=now)).rowcount
        return n == 1

    def _finish(self, claim: Claim, outcome: str, **values: Any) -> bool:
        now = time.time()
        with self.engine.begin() as conn:
            row = self._row(conn, claim.job_id, lock=True)
            if row is None or row["claim_token"] != claim.token or row["status"] != "running":
                return False
            history = json.loads(row["history"])
            history.append({"attempt": row["attempts"], "worker": claim.worker,
                            "started_at": _iso(row["claimed_at"]),
                            "ended_at": _iso(now), "outcome": outcome})
            conn.execute(update(jobs).where(self._held(claim)).values(
                history=json.dumps(history), lease_expires_at=None, updated_at=now, **values))
        return True

    def complete(self, claim: Claim, result: ValidationResult) -> bool:
        """Record the result; False (and nothing written) if the claim is no longer held."""
        return self._finish(claim, "succeeded", status="succeeded", phase="done",
                            step=jobs.c.total_steps, result=result.model_dump_json(),
                            error=None, finished_at=time.time())

    def fail(self, claim: Claim, reason: str) -> bool:
        return self._finish(claim, f"failed: {reason}", status="failed", phase="failed",
                            error=reason, finished_at=time.time())

    def release(self, claim: Claim, note: str = "released by worker") -> bool:
        """Give the job back to the queue without counting the attempt (graceful shutdown)."""
        return self._finish(claim, note, status="queued", phase="queued", step=0, worker=None,
                            claim_token=None, attempts=jobs.c.attempts - 1)

    def requeue_expired(self) -> list[str]:
        """Re-queue running jobs whose lease ran out; fail those out of attempts, with history.

        Returns the ids touched."""
        q = (select(jobs).where(jobs.c.status == "running", jobs.c.lease_expires_at < time.time())
             .with_for_update(skip_locked=True))
        return self._requeue(q, "lease expired (worker lost)")

    def reclaim(self, worker: str) -> list[str]:
        """Re-queue the jobs still running under ``worker``'s identity, as for an expired lease
        (the attempt counts): called by a worker as it starts, when the process that held the
        identity before it is gone. Returns the ids touched."""
        q = (select(jobs).where(jobs.c.status == "running", jobs.c.worker == worker)
             .with_for_update(skip_locked=True))
        return self._requeue(q, "worker restarted (the job's process died with it)")

    def _requeue(self, q: Any, outcome: str) -> list[str]:
        now = time.time()
        touched = []
        with self.engine.begin() as conn:
            for row in conn.execute(q).mappings().all():
                history = json.loads(row["history"])
                history.append({"attempt": row["attempts"], "worker": row["worker"],
                                "started_at": _iso(row["claimed_at"]), "ended_at": _iso(now),
                                "outcome": outcome})
                values: dict[str, Any] = dict(history=json.dumps(history), worker=None,
                                              claim_token=None, lease_expires_at=None,
                                              updated_at=now)
                if row["attempts"] >= self.max_attempts:
                    lines = "; ".join(f"attempt {h['attempt']} on {h['worker']}: {h['outcome']}"
                                      for h in history)
                    values.update(status="failed", phase="failed", finished_at=now,
                                  error=f"gave up after {row['attempts']} attempts ({lines})")
                else:
                    values.update(status="queued", phase="queued", step=0)
                conn.execute(update(jobs).where(jobs.c.seq == row["seq"]).values(**values))
                touched.append(row["id"])
        return touched

    # ---- workers ------------------------------------------------------------------------------
    @staticmethod
    def _worker_info(row: RowMapping) -> WorkerInfo:
        return WorkerInfo(id=row["id"], kind=row["kind"], count=row["count"],
                          memory_bytes=row["memory_bytes"], sole=bool(row["sole"]),
                          host=row["host"], pid=row["pid"], heartbeat_at=row["heartbeat_at"])

    def _live_workers(self, conn: Connection, now: float) -> list[WorkerInfo]:
        rows = conn.execute(select(workers).where(workers.c.heartbeat_at >= now - self.lease_s)
                            .order_by(workers.c.id)).mappings().all()
        return [self._worker_info(r) for r in rows]

    def live_workers(self) -> list[WorkerInfo]:
        """Workers that sent a heartbeat within the last ``lease_s``."""
        with self.engine.begin() as conn:
            return self._live_workers(conn, time.time())

    def worker(self, worker_id: str) -> WorkerInfo | None:
        """The last heartbeat under this identity, live or not."""
        with self.engine.begin() as conn:
            row = conn.execute(select(workers).where(workers.c.id == worker_id)).mappings().first()
        return self._worker_info(row) if row is not None else None

    def heartbeat_worker(self, worker_id: str, instance: str, host: str, pid: int,
                         device: DeviceInfo, sole: bool = False) -> None:
        """Say that this worker is live and what it can run (an upsert of its row)."""
        now = time.time()
        values = dict(instance=instance, host=host, pid=pid, kind=device.kind, count=device.count,
                      memory_bytes=device.memory_bytes, sole=sole, heartbeat_at=now)
        dialect = postgresql if self.backend == "postgresql" else sqlite
        stmt = dialect.insert(workers).values(id=worker_id, started_at=now, **values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[workers.c.id],
            set_={**values, "started_at": case((workers.c.instance == instance,
                                                workers.c.started_at), else_=now)})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def forget_worker(self, worker_id: str, instance: str) -> None:
        """Remove a stopping worker's row (only while this instance still holds it)."""
        with self.engine.begin() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id,
                                               workers.c.instance == instance))

    def prune_workers(self, older_than_s: float) -> int:
        """Delete the rows of workers silent for longer than ``older_than_s``."""
        with self.engine.begin() as conn:
            return conn.execute(delete(workers).where(
                workers.c.heartbeat_at < time.time() - older_than_s)).rowcount

    def fail_unrunnable(self, timeout_s: float) -> list[str]:
        """Queued jobs no live worker can run: note since when, and fail those that have waited
        ``timeout_s`` so, with the reason. Nothing happens while no worker is live (the jobs wait
        for one). Returns the ids failed."""
        now = time.time()
        failed = []
        cols = [jobs.c.seq, jobs.c.id, jobs.c.ranks, jobs.c.peak_bytes, jobs.c.needs,
                jobs.c.gpu_kind, jobs.c.unrunnable_since]
        with self.engine.begin() as conn:
            live = self._live_workers(conn, now)
            if not live:
                return []
            rows = conn.execute(select(*cols).where(jobs.c.status == "queued")).mappings().all()
        for row in rows:
            reason = waiting_reason(self._requirements(row), live, self.lease_s)
            since = row["unrunnable_since"]
            still = and_(jobs.c.seq == row["seq"], jobs.c.status == "queued")
            with self.engine.begin() as conn:
                if reason is None:
                    if since is not None:
                        conn.execute(update(jobs).where(still).values(unrunnable_since=None))
                elif since is None:
                    conn.execute(update(jobs).where(still).values(unrunnable_since=now))
                elif now - since >= timeout_s:
                    n = conn.execute(update(jobs).where(still).values(
                        status="failed", phase="failed", finished_at=now, updated_at=now,
                        error=f"no live worker could run it for {now - since:.0f} s (the limit "
                              f"is {timeout_s:g} s): {reason}")).rowcount
                    if n:
                        failed.append(row["id"])
        return failed


class StoreHolder:
    """Opens the store on first use (so the app starts even while the database is down)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._store: JobStore | None = None
        self._lock = threading.Lock()

    def get(self) -> JobStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = JobStore.from_settings(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


__all__ = ["JobStore", "StoreHolder", "Claim", "Requirements", "WorkerInfo", "JobNotFound",
           "JobFinished", "BadCursor", "IdempotencyConflict", "QueueFull", "NoWorkerCanRun",
           "FINISHED", "MAX_SEQ", "make_engine", "encode_cursor", "decode_cursor"]
