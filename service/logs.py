"""Structured logs: one JSON object a line, carrying the request id and the job id.

The request id comes from the client's ``X-Request-ID`` (when it is a sane token) or is generated,
and is echoed in the response's ``X-Request-ID``; every line logged while a request is handled
carries it. A route that touches a job binds its id (``bind_job``). The worker's lines name their
job as ``"job %s: ..."`` with the id as the first argument; the formatter lifts that id into
``job_id`` too, so a job can be followed from submission through the worker by one field.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from typing import Any

# The ids of the request being handled, as one mutable dict: a sync route runs in a worker thread
# with a copy of the context, and what it binds must still reach the middleware's access line.
_ids: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("memplan_ids",
                                                                            default=None)

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime",
                                                                           "taskName"}


def new_request_id(header: str | None) -> str:
    """The client's id when it is a plain token of up to 128 characters, else a fresh one (a
    header is never copied into logs unchecked)."""
    if header and _SANE_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def bind_request(request_id: str) -> dict[str, str]:
    """Start a request's log context; returns the dict later bindings write into."""
    ids = {"request_id": request_id}
    _ids.set(ids)
    return ids


def bind_job(job_id: str) -> None:
    """Mark the rest of this request (or task) as concerning ``job_id``."""
    ids = _ids.get()
    if ids is None:
        _ids.set({"job_id": job_id})
    else:
        ids["job_id"] = job_id


def current_ids() -> dict[str, str]:
    return dict(_ids.get() or {})


def _job_id_of(record: logging.LogRecord) -> str | None:
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    bound = (_ids.get() or {}).get("job_id")
    if bound:
        return bound
    if isinstance(record.msg, str) and record.msg.startswith("job %s") and record.args:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return str(args[0])
    return None


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id"?, "job_id"?, ...extra, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or current_ids().get("request_id")
        if request_id:
            out["request_id"] = request_id
        job_id = _job_id_of(record)
        if job_id:
            out["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) \
                    else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines, with the ids appended when there are any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{k}={v}" for k, v in (("request_id", getattr(record, "request_id", None)
                                        or current_ids().get("request_id")),
                                       ("job_id", _job_id_of(record))) if v]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Send every logger (uvicorn's included) to stderr in ``fmt`` ('json' or 'text')."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


__all__ = ["configure", "bind_request", "bind_job", "current_ids", "new_request_id",
           "JsonFormatter", "TextFormatter"]
