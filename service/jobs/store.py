"""The job store: validation jobs in one SQL table, which is also the queue.

Backends: SQLite (default, one file) and PostgreSQL (shared by several API replicas and workers).
Claims are atomic on both: PostgreSQL takes the oldest runnable row with
``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent workers never wait on each other; SQLite runs
every transaction as ``BEGIN IMMEDIATE``, one writer at a time.

Every claim gets a fresh token. Progress, heartbeats and the final result are written only while
the row still carries that token and is running, so a worker whose lease expired (and whose job
was re-queued and claimed by another) can no longer change the job: a job completes exactly once.

Times are epoch seconds from the writer's clock (workers on different nodes are assumed to keep
their clocks in sync, as NTP does, to well under a lease).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, and_, create_engine, event, func, or_, select, text, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from planner.specs import (JobStatus, Progress, ValidationJob, ValidationPage, ValidationRequest,
                           ValidationResult)
from service.jobs.migrations import jobs, migrate
from service.settings import DeviceInfo, ensure_sqlite_folder

FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")
MAX_PAGE = 200
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


class QueueFull(RuntimeError):
    """The submitter already has ``limit`` jobs queued."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs queued for this client; the limit is {limit}")
        self.queued, self.limit = queued, limit


@dataclass(frozen=True)
class Requirements:
    """What running a job takes; workers claim only jobs whose requirements they meet."""

    ranks: int = 1
    peak_bytes: int = 0
    needs: str = "any"  # 'any', 'cpu' or 'cuda' (the request's device)
    gpu_kind: str | None = None


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
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("s"):
            raise ValueError
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursor(f"invalid cursor {cursor!r}; pass next_cursor from a previous page") from None


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
    def _to_model(row: RowMapping) -> ValidationJob:
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
        )

    def _row(self, conn: Connection, job_id: str, lock: bool = False) -> RowMapping | None:
        q = select(jobs).where(jobs.c.id == job_id)
        if lock:
            q = q.with_for_update()
        return conn.execute(q).mappings().first()

    def get(self, job_id: str) -> ValidationJob:
        with self.engine.begin() as conn:
            row = self._row(conn, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return self._to_model(row)

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
        more = len(rows) > limit
        rows = rows[:limit]
        return ValidationPage(items=[self._to_model(r) for r in rows],
                              next_cursor=encode_cursor(rows[-1]["seq"]) if more else None)

    # ---- client side --------------------------------------------------------------------------
    def submit(self, request: ValidationRequest, requirements: Requirements,
               timeout_s: float | None = None, *, owner: str = "",
               idempotency_key: str | None = None, request_hash: str | None = None,
               max_queued: int | None = None) -> ValidationJob:
        """Queue a job; see ``submit_once``."""
        return self.submit_once(request, requirements, timeout_s, owner=owner,
                                idempotency_key=idempotency_key, request_hash=request_hash,
                                max_queued=max_queued)[0]

    def submit_once(self, request: ValidationRequest, requirements: Requirements,
                    timeout_s: float | None = None, *, owner: str = "",
                    idempotency_key: str | None = None, request_hash: str | None = None,
                    max_queued: int | None = None) -> tuple[ValidationJob, bool]:
        """Queue a job for ``owner``; returns (job, created).

        With an ``idempotency_key``, the owner's earlier job under that key is returned as it is
        (created False) when ``request_hash`` matches, and IdempotencyConflict is raised when it
        does not. ``max_queued`` caps the owner's queued jobs (QueueFull); the count and the
        insert are one transaction, serialized per owner, so concurrent submissions cannot pass
        the cap together."""
        for _ in range(2):
            try:
                return self._submit(request, requirements, timeout_s, owner, idempotency_key,
                                    request_hash, max_queued)
            except IntegrityError:
                # Another submission with the same key committed first: the next pass finds it.
                if idempotency_key is None:
                    raise
        raise IdempotencyConflict(idempotency_key or "")  # pragma: no cover - needs 3 races

    def _submit(self, request: ValidationRequest, requirements: Requirements,
                timeout_s: float | None, owner: str, key: str | None, body_hash: str | None,
                max_queued: int | None) -> tuple[ValidationJob, bool]:
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
                    return self._to_model(row), False
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
        return self._to_model(row), True

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
        if by_capacity:
            conditions += [jobs.c.ranks <= device.count, jobs.c.peak_bytes <= device.memory_bytes]
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
        now = time.time()
        touched = []
        q = (select(jobs).where(jobs.c.status == "running", jobs.c.lease_expires_at < now)
             .with_for_update(skip_locked=True))
        with self.engine.begin() as conn:
            for row in conn.execute(q).mappings().all():
                history = json.loads(row["history"])
                history.append({"attempt": row["attempts"], "worker": row["worker"],
                                "started_at": _iso(row["claimed_at"]), "ended_at": _iso(now),
                                "outcome": "lease expired (worker lost)"})
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


__all__ = ["JobStore", "StoreHolder", "Claim", "Requirements", "JobNotFound", "JobFinished",
           "BadCursor", "IdempotencyConflict", "QueueFull", "FINISHED", "make_engine",
           "encode_cursor", "decode_cursor"]
