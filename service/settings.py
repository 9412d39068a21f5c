"""Service settings, read from ``MEMPLAN_*`` environment variables.

Plain environment parsing (no extra dependency): every field has a default that gives the
one-command setup, ``memplan serve`` with a SQLite file under ``./var``.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_DATABASE_URL = "sqlite:///./var/memplan.db"
DEFAULT_JOB_TARGET = "service.validation.runner:run_validation"

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB' -> 85899345920; '16e9' -> 16000000000; plain integers are bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (e.g. 85899345920, 80GiB, 16GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class DeviceInfo(BaseModel):
    """What a worker can run on: the device kind, how many, and the memory of each."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(..., description="'cpu', or a GPU catalog name such as 'h100-80gb' (or the "
                      "device's own name when it is not in the catalog).")
    count: int = Field(..., ge=1, description="Devices (ranks) one job may use.")
    memory_bytes: int = Field(..., ge=1, description="Memory of each device.")

    @classmethod
    def parse(cls, text: str) -> "DeviceInfo":
        """'KIND:COUNT:MEMORY', e.g. 'h100-80gb:8:80GiB' or 'cpu:2:16GB'."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"device override {text!r}: expected KIND:COUNT:MEMORY, "
                             "e.g. h100-80gb:8:80GiB")
        return cls(kind=parts[0], count=int(parts[1]), memory_bytes=parse_bytes(parts[2]))

    def __str__(self) -> str:
        return f"{self.count} x {self.kind} ({self.memory_bytes / 2**30:.1f} GiB each)"


class Settings(BaseModel):
    """Everything the API, the job store and the workers are configured with."""

    model_config = ConfigDict(frozen=True)

    database_url: str = Field(DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the job store: "
                              "SQLite (default) or postgresql+psycopg://...")
    lease_s: float = Field(30.0, gt=0, description="A claim is lost unless renewed within this.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a worker renews its lease and "
                               "checks for cancellation.")
    max_attempts: int = Field(3, ge=1, description="Claims a job may have; after that many "
                              "lost leases it fails with its history.")
    job_timeout_cap_s: float = Field(6 * 3600.0, gt=0, description="Upper bound on any job's "
                                     "wall-clock limit (the request's timeout_s is capped to it).")
    poll_s: float = Field(0.5, gt=0, description="Idle worker's wait between claim attempts.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="On SIGTERM, how long the job in hand "
                                    "may run on before it is stopped and released to the queue.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    worker_device: DeviceInfo | None = Field(
        None, description="Override of the detected device (MEMPLAN_WORKER_DEVICE=KIND:COUNT:MEMORY).")
    worker_id: str | None = Field(
        None, min_length=1, max_length=160, description="Stable identity of a standalone worker: "
        "at start it re-queues the jobs still running under this identity (its previous "
        "process died with them) instead of leaving them to their lease. Default: a new identity "
        "per process. The embedded worker of `memplan serve` derives one from the host and the "
        "database.")
    unrunnable_timeout_s: float = Field(
        600.0, gt=0, description="How long a queued job that no live worker can run (device "
        "kind, device count or memory) waits before it fails with the reason. While no worker is "
        "live at all, jobs wait without this limit.")
    job_target: str = Field(DEFAULT_JOB_TARGET, description="'module:function' a job runs in its "
                            "child process: (ValidationRequest, progress) -> ValidationResult.")
    # ---- shared deployment: security, caps, logs (see docs/deployment.md) ----------------------
    api_tokens: tuple[str, ...] = Field(
        (), description="SHA-256 hex digests of the bearer tokens accepted on job routes (comma "
        "list, or the path of a file with one per line; `memplan hash-token TOKEN`). Empty: job "
        "routes are open.")
    protect_estimates: bool = Field(False, description="Also require a token on the estimate "
                                    "routes (memory, zero, checkpointing, pipeline).")
    max_queued_per_token: int = Field(100, ge=1, description="Queued jobs one token (or, with no "
                                      "tokens configured, all clients together) may have; more "
                                      "is a 429 with Retry-After.")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body (413 above).")
    max_concurrent_estimates: int = Field(4, ge=1, description="Estimates (memory, zero, "
                                          "checkpointing, pipeline) computed at once per process.")
    estimate_queue_s: float = Field(5.0, ge=0, description="How long an estimate waits for a "
                                    "free slot before a 503 with Retry-After.")
    estimate_deadline_s: float = Field(10.0, gt=0, description="Work limit of one estimate: past "
                                       "it the planner stops and the answer is a 503 naming it.")
    transformers_deadline_s: float = Field(
        30.0, gt=0, description="Work limit of a training.implementation 'transformers' estimate: "
        "its first answer for a setup traces the model's own code under FakeTensorMode.")
    max_real_layers: int = Field(128, ge=1, description="Cap on num_layers of a real-mode job.")
    max_real_hidden_size: int = Field(16_384, ge=1, description="Cap on hidden_size, real mode.")
    max_real_sequence_length: int = Field(32_768, ge=1, description="Cap on sequence_length, "
                                          "real mode.")
    max_traced_layers: int = Field(512, ge=1, description="Cap on num_layers of a traced job.")
    max_traced_hidden_size: int = Field(65_536, ge=1, description="Cap on hidden_size, traced.")
    max_traced_sequence_length: int = Field(262_144, ge=1, description="Cap on sequence_length, "
                                            "traced mode.")
    max_steps: int = Field(50, ge=2, description="Cap on a job's training steps.")
    max_ranks: int = Field(64, ge=1, description="Cap on a job's ranks (dp x tp x pp).")
    log_format: str = Field("json", pattern="^(json|text)$", description="'json': one JSON object "
                            "a line with request_id / job_id; 'text': plain lines.")

    @field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: object) -> object:
        from service.security import parse_token_digests

        return parse_token_digests(v) if isinstance(v, (str, list, tuple)) else v

    @field_validator("worker_device", mode="before")
    @classmethod
    def _device(cls, v: object) -> object:
        return DeviceInfo.parse(v) if isinstance(v, str) else v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        """Read MEMPLAN_<FIELD> variables (e.g. MEMPLAN_DATABASE_URL); overrides win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name in cls.model_fields:
            key = f"MEMPLAN_{name.upper()}"
            if env.get(key):
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def sqlite_path(url: str) -> str | None:
    """The file behind a sqlite URL (None for in-memory or other backends)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[1] if "///" in url else ""
    path = path.split("?", 1)[0]
    return path if path and path != ":memory:" else None


def ensure_sqlite_folder(url: str) -> None:
    path = sqlite_path(url)
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)


__all__ = ["Settings", "DeviceInfo", "parse_bytes", "ensure_sqlite_folder", "sqlite_path",
           "DEFAULT_DATABASE_URL", "DEFAULT_JOB_TARGET"]
