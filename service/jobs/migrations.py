"""Versioned schema migrations, applied by the app itself at start.

A small runner instead of Alembic: the schema is two tables (jobs, and worker heartbeats), and
each step is a function of a connection. Steps run in order inside one transaction that first
takes a lock (PostgreSQL advisory lock; SQLite's ``BEGIN IMMEDIATE``), so several processes
starting at once against the same database apply each step exactly once. Add a step by appending
to ``MIGRATIONS``; never edit one that has shipped.
"""

from __future__ import annotations

from typing import Callable

from sqlalchemy import (BigInteger, Boolean, Column, Connection, Engine, Float, Index, Integer,
                        MetaData, String, Table, Text, inspect, text)

# Arbitrary constant naming memplan's migration lock among PostgreSQL advisory locks.
_PG_LOCK_KEY = 0x6D656D706C616E

metadata = MetaData()


def _v1_columns() -> list[Column]:
    """The job table's columns as version 1 created them."""
    return [
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
               autoincrement=True),
        Column("id", String(32), nullable=False, unique=True),
        Column("status", String(16), nullable=False),
        Column("request", Text, nullable=False),
        Column("result", Text),
        Column("error", Text),
        Column("phase", String(64), nullable=False, default="queued"),
        Column("step", Integer, nullable=False, default=0),
        Column("total_steps", Integer, nullable=False, default=0),
        Column("attempts", Integer, nullable=False, default=0),
        Column("history", Text, nullable=False, default="[]"),
        # What a worker needs to run it (claim filter): ranks, per-device peak, device class,
        # GPU kind.
        Column("ranks", Integer, nullable=False),
        Column("peak_bytes", BigInteger, nullable=False),
        Column("needs", String(8), nullable=False),
        Column("gpu_kind", String(64)),
        Column("timeout_s", Float, nullable=False),
        # The current claim: who holds it, its token, and when its lease runs out (epoch seconds).
        Column("worker", String(200)),
        Column("claim_token", String(32)),
        Column("lease_expires_at", Float),
        Column("claimed_at", Float),
        Column("created_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("updated_at", Float, nullable=False),
    ]


# The job table; the queue is this table (see DESIGN.md, "Jobs"). Its columns are version 1's
# plus those each later migration adds.
jobs = Table(
    "validation_jobs", metadata,
    *_v1_columns(),
    # v2: who submitted it (SHA-256 digest of the bearer token; '' with no tokens configured),
    # and the Idempotency-Key with the hash of the request it was first used with.
    Column("owner", String(64), nullable=False, server_default=""),
    Column("idempotency_key", String(200)),
    Column("request_hash", String(64)),
    Index("ix_validation_jobs_status_seq", "status", "seq"),
    Index("ux_validation_jobs_owner_key", "owner", "idempotency_key", unique=True),
    Index("ix_validation_jobs_owner_status", "owner", "status"),
    # v3: when a worker's sweep first found that no live worker can run this queued job (None
    # while one can); it fails once that has lasted unrunnable_timeout_s.
    Column("unrunnable_since", Float),
)


def _workers_v3_columns() -> list[Column]:
    """The worker table as version 3 created it: one row per worker identity, written at each
    heartbeat with what the worker can run."""
    return [
        Column("id", String(200), primary_key=True),  # the worker's identity (jobs.worker)
        Column("instance", String(32), nullable=False),  # the process now holding the identity
        Column("host", String(200), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("kind", String(64), nullable=False),  # 'cpu' or a GPU catalog name
        Column("count", Integer, nullable=False),
        Column("memory_bytes", BigInteger, nullable=False),
        Column("sole", Boolean, nullable=False),
        Column("started_at", Float, nullable=False),
        Column("heartbeat_at", Float, nullable=False),
    ]


workers = Table("memplan_workers", metadata, *_workers_v3_columns())
_workers_v3 = Table("memplan_workers", MetaData(), *_workers_v3_columns())

# Version 1's table, frozen: a migration creates what it created when it shipped.
_jobs_v1 = Table("validation_jobs", MetaData(), *_v1_columns(),
                 Index("ix_validation_jobs_status_seq", "status", "seq"))

schema_version = Table(
    "memplan_schema_version", MetaData(),
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
)


def _v1_create_jobs(conn: Connection) -> None:
    _jobs_v1.create(conn)


def _v2_owner_and_idempotency(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE validation_jobs ADD COLUMN owner VARCHAR(64) NOT NULL "
                      "DEFAULT ''"))
    conn.execute(text("ALTER TABLE validation_jobs ADD COLUMN idempotency_key VARCHAR(200)"))
    conn.execute(text("ALTER TABLE validation_jobs ADD COLUMN request_hash VARCHAR(64)"))
    # NULL keys are distinct in a unique index on both backends: jobs without a key never clash.
    for index in jobs.indexes:
        if index.name in ("ux_validation_jobs_owner_key", "ix_validation_jobs_owner_status"):
            index.create(conn)


def _v3_workers(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE validation_jobs ADD COLUMN unrunnable_since FLOAT"))
    _workers_v3.create(conn)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "create validation_jobs", _v1_create_jobs),
    (2, "job owner, Idempotency-Key and request hash", _v2_owner_and_idempotency),
    (3, "worker heartbeats with their devices; when a queued job became unrunnable", _v3_workers),
]
LATEST = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table(schema_version.name):
        return 0
    return conn.execute(text(f"SELECT COALESCE(MAX(version), 0) FROM {schema_version.name}")
                        ).scalar_one()


def migrate(engine: Engine) -> int:
    """Bring the schema to ``LATEST``; returns the version it started from."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        # SQLite: the engine begins every transaction with BEGIN IMMEDIATE (see store.py), which
        # already excludes other writers.
        schema_version.create(conn, checkfirst=True)
        start = current_version(conn)
        for version, description, step in MIGRATIONS:
            if version > start:
                step(conn)
                conn.execute(schema_version.insert().values(version=version,
                                                            description=description))
    return start


__all__ = ["metadata", "jobs", "workers", "schema_version", "MIGRATIONS", "LATEST", "migrate",
           "current_version"]
