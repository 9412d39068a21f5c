"""``GET /metrics`` in the Prometheus text format (0.0.4), and the request latency histogram.

Two sources:
- **This process**: ``memplan_http_request_duration_seconds``, a histogram per method, route
  *template* (``/v1/validations/{job_id}``, never the raw path; ``unmatched`` for 404s) and
  status, observed by the request layer (``service.front``). Each API replica reports its own
  requests.
- **The job table, at scrape time**: queue depth per state, job duration and estimate error per
  category are aggregated by SQL from the jobs themselves. Workers run in other processes (and
  nodes); reading the table means every replica reports the same figures, nothing is lost when a
  process restarts, and no worker needs a metrics endpoint. The cost is one indexed count and
  one scan of finished jobs per scrape.

Job duration is ``finished_at - started_at`` (first claim to end: retries after a lost worker are
included), by final status. Estimate error is ``|estimate - measured| / measured`` from each
succeeded job's ``relative_error``, by category and mode (categories where it is undefined,
measured 0 with a non-zero estimate, are not counted).
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left
from typing import Any, Iterable, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import Float, and_, case, cast, func, literal_column, select

from service.jobs.migrations import jobs

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
ERROR_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")

# ---- text format -------------------------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return f"{{{inner}}}" if inner else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


def histogram_lines(name: str, labels: Sequence[tuple[str, str]], bounds: Sequence[float],
                    cumulative: Sequence[int], total: float, count: int) -> list[str]:
    """One labelled histogram series: ``cumulative[i]`` observations <= ``bounds[i]``."""
    out = [f"{name}_bucket{_labels([*labels, ('le', _num(b))])} {c}"
           for b, c in zip(bounds, cumulative)]
    out.append(f"{name}_bucket{_labels([*labels, ('le', '+Inf')])} {count}")
    out.append(f"{name}_sum{_labels(labels)} {_num(total)}")
    out.append(f"{name}_count{_labels(labels)} {count}")
    return out


class Histogram:
    """A thread-safe histogram with label values, kept in this process."""

    def __init__(self, name: str, help_: str, label_names: Sequence[str],
                 bounds: Sequence[float]) -> None:
        self.name, self.help, self.label_names = name, help_, tuple(label_names)
        self.bounds = tuple(bounds)
        self._series: dict[tuple[str, ...], list[Any]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        i = bisect_left(self.bounds, value)  # first bound >= value
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [[0] * len(self.bounds), 0.0, 0]
            if i < len(self.bounds):
                series[0][i] += 1
            series[1] += value
            series[2] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, [list(v[0]), v[1], v[2]]) for k, v in self._series.items())
        for labels, (counts, total, count) in items:
            cumulative, running = [], 0
            for c in counts:
                running += c
                cumulative.append(running)
            lines += histogram_lines(self.name, list(zip(self.label_names, labels)), self.bounds,
                                     cumulative, total, count)
        return lines


REQUEST_LATENCY = Histogram("memplan_http_request_duration_seconds",
                            "Time to answer an HTTP request, by route template.",
                            ("method", "route", "status"), LATENCY_BUCKETS_S)


def status_text(status: int) -> str:
    """A status code as its label value (precomputed for the codes HTTP defines)."""
    return _STATUS_TEXT.get(status) or str(status)


_STATUS_TEXT = {code: str(code) for code in range(100, 600)}


# ---- job-table metrics -------------------------------------------------------------------------
def _bucket_sums(value: Any, bounds: Sequence[float]) -> list[Any]:
    return [func.sum(case((value <= b, 1), else_=0)) for b in bounds]


def _json_field(dialect: str, path: Sequence[str]) -> Any:
    """The JSON value at ``path`` in the result column, as text (SQL NULL where absent or null).

    Literal SQL of constant keys, so the same expression in SELECT and GROUP BY is one text
    (bound parameters would make PostgreSQL see two different expressions)."""
    if dialect == "postgresql":
        steps = "".join(f" -> '{k}'" for k in path[:-1])
        return literal_column(f"(CAST(result AS JSONB){steps} ->> '{path[-1]}')")
    return literal_column(f"json_extract(result, '$.{'.'.join(path)}')")


def job_table_lines(store: Any) -> list[str]:
    """Queue depth, job duration and estimate error, aggregated from the job table."""
    lines = ["# HELP memplan_jobs Jobs in the job table, by state (queued = the queue depth).",
             "# TYPE memplan_jobs gauge"]
    for state, n in store.queue_depth().items():
        lines.append(f"memplan_jobs{_labels([('state', state)])} {n}")

    duration = jobs.c.finished_at - jobs.c.started_at
    q = (select(jobs.c.status, func.count(), func.coalesce(func.sum(duration), 0.0),
                *_bucket_sums(duration, JOB_DURATION_BUCKETS_S))
         .where(jobs.c.status.in_(("succeeded", "failed", "cancelled")),
                jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None))
         .group_by(jobs.c.status))
    dialect = store.engine.dialect.name
    mode = _json_field(dialect, ["mode"])
    columns: list[Any] = [mode]
    for category in CATEGORIES:
        err = func.abs(cast(_json_field(dialect, ["relative_error", category]), Float))
        columns += [func.count(err), func.coalesce(func.sum(err), 0.0),
                    *_bucket_sums(err, ERROR_BUCKETS)]
    e = (select(*columns).where(and_(jobs.c.status == "succeeded", jobs.c.result.is_not(None)))
         .group_by(mode))
    with store.engine.begin() as conn:
        duration_rows = conn.execute(q).all()
        error_rows = conn.execute(e).all()

    lines += ["# HELP memplan_job_duration_seconds Wall-clock time from a job's first claim to "
              "its end, by final status.", "# TYPE memplan_job_duration_seconds histogram"]
    for status, count, total, *buckets in sorted(duration_rows):
        lines += histogram_lines("memplan_job_duration_seconds", [("status", status)],
                                 JOB_DURATION_BUCKETS_S, [int(b or 0) for b in buckets],
                                 float(total or 0), int(count))
    lines += ["# HELP memplan_estimate_relative_error |estimate - measured| / measured of "
              "succeeded validation jobs, by category and mode.",
              "# TYPE memplan_estimate_relative_error histogram"]
    width = 2 + len(ERROR_BUCKETS)
    for row in sorted(error_rows, key=lambda r: str(r[0])):
        job_mode, values = str(row[0]), row[1:]
        for i, category in enumerate(CATEGORIES):
            count, total, *buckets = values[i * width:(i + 1) * width]
            lines += histogram_lines("memplan_estimate_relative_error",
                                     [("category", category), ("mode", job_mode)], ERROR_BUCKETS,
                                     [int(b or 0) for b in buckets], float(total or 0),
                                     int(count or 0))
    return lines


router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE: {}},
                             "description": "Prometheus text exposition format 0.0.4"}})
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus metrics: request latency, queue depth, job duration, estimate error."""
    lines = REQUEST_LATENCY.render()
    up = 1
    try:
        lines += job_table_lines(request.app.state.jobs.get())
    except Exception as exc:  # noqa: BLE001 - a scrape must answer while the database is down
        up = 0
        logging.getLogger("memplan.metrics").warning("job store unavailable for metrics: %s",
                                                     type(exc).__name__)
    lines += ["# HELP memplan_job_store_up 1 when the job table could be read for this scrape.",
              "# TYPE memplan_job_store_up gauge", f"memplan_job_store_up {up}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type=CONTENT_TYPE)


__all__ = ["router", "Histogram", "REQUEST_LATENCY", "CONTENT_TYPE", "status_text",
           "job_table_lines", "histogram_lines"]
