"""Structured logs: one JSON object a line, carrying the request id and the job id.

The request id comes from the client's ``X-Request-ID`` (when it is a sane token) or is generated,
and is echoed in the response's ``X-Request-ID``; every line logged while a request is handled
carries it. A route that touches a job binds its id (``bind_job``). The worker's lines name their
job as ``"job %s: ..."`` with the id as the first argument; the formatter lifts that id into
``job_id`` too, so a job can be followed from submission through the worker by one field.

The access line (one a request, ``memplan.access``) is the one line every request pays for, so it
skips the generic machinery without changing what is logged: :func:`log_access` builds its
``LogRecord`` directly (the standard attributes ``Logger.info`` would set, the request's ids and
the extras ``route``, ``status``, ``duration_ms``; no caller lookup on the stack) and hands it to
the logger's handlers only when the logger would emit INFO; the JSON formatter writes that record
as a string directly (no dict, no encoder pass), and any other record with a timestamp text reused
within a second and one JSON encoder. In memplan's own configuration (the access logger's lines
reach one :class:`LineWriter` with the JSON formatter, no filter on the way) there is no record at
all: the line is written straight to the writer. Every line is the same JSON, keys in the same
order, as the generic path gives (``tests/test_access_log.py``).

``configure`` sends the lines to a :class:`LineWriter`, which writes the lines of one event loop
turn in one system call rather than one a line.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import random
import re
import sys
import threading
import time
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
    # uuid.uuid4().hex without the UUID object or a system call: 128 bits of the process's
    # random generator (seeded from the OS, reseeded in a forked child), version 4, RFC 4122
    # variant. An id tells requests apart; it is no secret (a client may choose its own).
    return f"{random.getrandbits(128) & _UUID4_KEEP | _UUID4_SET:032x}"


_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & (2**128 - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


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


def _bound(key: str) -> str | None:
    ids = _ids.get()
    return ids.get(key) if ids else None


def _job_id_of(record: logging.LogRecord) -> str | None:
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    bound = _bound("job_id")
    if bound:
        return bound
    if isinstance(record.msg, str) and record.msg.startswith("job %s") and record.args:
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return str(args[0])
    return None


# The UTC second of the last line and its text: lines come many a second.
_second: tuple[int, str] = (-1, "")
_encode = json.JSONEncoder(ensure_ascii=False).encode  # what json.dumps(..., ensure_ascii=False)
_PLAIN = (str, int, float, bool, type(None))             # builds anew on every call


def _timestamp(created: float, msecs: float) -> str:
    """``2026-01-02T03:04:05.678Z``: the record's UTC time, to the millisecond."""
    global _second
    second = _second
    if second[0] != int(created):
        second = _second = (int(created), time.strftime("%Y-%m-%dT%H:%M:%S",
                                                        time.gmtime(created)))
    return f"{second[1]}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id"?, "job_id"?, ...extra, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        if type(record) is AccessRecord:
            line = _access_json(record)
            if line is not None:
                return line
        out: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _bound("request_id")
        if request_id:
            out["request_id"] = request_id
        job_id = _job_id_of(record)
        if job_id:
            out["job_id"] = job_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, _PLAIN) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out)


class TextFormatter(logging.Formatter):
    """Plain lines, with the ids appended when there are any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{k}={v}" for k, v in (("request_id", getattr(record, "request_id", None)
                                        or _bound("request_id")),
                                       ("job_id", _job_id_of(record))) if v]
        return f"{line} [{' '.join(ids)}]" if ids else line


# ---- the access line ---------------------------------------------------------------------------
_ACCESS_MSG = "%s %s %d"
_string = json.encoder.encode_basestring  # a JSON string, as the encoder above writes it


class AccessRecord(logging.LogRecord):
    """The record of an access line: a LogRecord to every handler, formatter and filter, which
    :class:`JsonFormatter` writes without building a dict (``_access_json``)."""

    __slots__ = ("fields",)  # the attributes log_access set (an attribute added since: generic)


def _access_json(record: AccessRecord) -> str | None:
    """The line ``JsonFormatter`` builds for this record, written directly: None (the generic
    path) unless the record holds exactly what ``log_access`` put there, of its types."""
    d = record.__dict__
    # (a formatter of another handler may have set "message" and "asctime": never logged here)
    if len(d) - ("message" in d) - ("asctime" in d) != record.fields or record.exc_info:
        return None
    return _access_line(d["created"], d["msecs"], d["levelname"], d["name"], record.getMessage(),
                        d.get("request_id"), d.get("job_id") or _bound("job_id"), d["route"],
                        d["status"], d["duration_ms"])


def _access_line(created: float, msecs: float, level: str, name: str, msg: str, request_id: Any,
                 job_id: Any, route: Any, status: Any, duration: Any) -> str | None:
    """The JSON of an access line from its fields; None (the generic path) where one is not of
    the type the line is written for."""
    if (not request_id or type(request_id) is not str or type(route) is not str
            or type(status) is not int
            or type(duration) is not float or duration != duration or duration in _INFINITE
            or (job_id is not None and type(job_id) is not str)):
        return None
    job = f', "job_id": {_string(job_id)}' if job_id else ""
    return (f'{{"ts": "{_timestamp(created, msecs)}", "level": {_string(level.lower())}, '
            f'"logger": {_string(name)}, "msg": {_string(msg)}, "request_id": '
            f'{_string(request_id)}{job}, "route": {_string(route)}, "status": {status!r}, '
            f'"duration_ms": {duration!r}}}')


_INFINITE = (float("inf"), float("-inf"))


def log_access(logger: logging.Logger, ids: dict[str, str], method: str, path: str, status: int,
               route: str, duration_ms: float) -> None:
    """One access line, ``"METHOD PATH STATUS"`` with ``route``, ``status`` and ``duration_ms``
    and the request's ids, as ``logger.info(msg, *args, extra=...)`` in the request's context
    logs it: the same record attributes (the source location being this function's), without
    the stack walk and the generic record construction."""
    if not logger.isEnabledFor(logging.INFO):
        return
    created = time.time()
    writer = _line_writer_of(logger)
    if writer is not None:
        # memplan's own configuration: the line the record would give, without the record
        line = _access_line(created, int((created - int(created)) * 1000) + 0.0, "INFO",
                            logger.name, _ACCESS_MSG % (method, path, status),
                            ids.get("request_id") or None,
                            ids.get("job_id") or _bound("job_id"), route, status, duration_ms)
        if line is not None:
            writer.write_line(line)
            return
    record = AccessRecord.__new__(AccessRecord)
    d = record.__dict__
    d.update(_ACCESS_RECORD)
    d["name"] = logger.name
    d["args"] = (method, path, status)
    d["created"] = created
    d["msecs"] = int((created - int(created)) * 1000) + 0.0
    d["relativeCreated"] = (created - logging._startTime) * 1000
    if logging.logThreads:
        d["thread"] = threading.get_ident()
        d["threadName"] = threading.current_thread().name
    if logging.logMultiprocessing:
        mp = sys.modules.get("multiprocessing")
        d["processName"] = mp.current_process().name if mp is not None else "MainProcess"
    if logging.logProcesses:
        d["process"] = os.getpid()
    # the ids bound now (a route may have added its job), so the line does not depend on the
    # context it is formatted in
    request_id = ids.get("request_id")
    if request_id:
        d["request_id"] = request_id
    job_id = ids.get("job_id")
    if job_id:
        d["job_id"] = job_id
    d["route"] = route
    d["status"] = status
    d["duration_ms"] = duration_ms
    record.fields = len(d)
    logger.handle(record)


def _line_writer_of(logger: logging.Logger) -> LineWriter | None:
    """The one handler ``logger``'s INFO records reach, when it is a :class:`LineWriter` with a
    :class:`JsonFormatter` and no filter on the way (what ``configure('json')`` sets up); else
    None. Checked on every line: a handler or filter added later (a test's capture, an
    operator's configuration) takes the generic path from its next line on."""
    writer = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters or node.disabled:
            return None
        for handler in node.handlers:
            if writer is not None:
                return None
            writer = handler
        if not node.propagate:
            break
        node = node.parent
    if (type(writer) is not LineWriter or writer.filters or writer.level > logging.INFO
            or type(writer.formatter) is not JsonFormatter):
        return None
    return writer  # type: ignore[return-value]


# LogRecord.__init__'s attributes, in its order (the source location: log_access)
_ACCESS_RECORD: dict[str, Any] = vars(logging.LogRecord(
    "memplan.access", logging.INFO, __file__, log_access.__code__.co_firstlineno, _ACCESS_MSG, (),
    None, "log_access"))


# ---- writing -----------------------------------------------------------------------------------
class LineWriter(logging.StreamHandler):
    """A stream handler that writes the lines logged on an event loop's thread together, once the
    loop's current callbacks are done (``loop.call_soon``): one write for the access lines of all
    the requests a loop turn finished, instead of one each. Lines logged off the loop (worker
    threads, the command line) are written at once, after anything still pending; the order of
    the lines is the order they were logged. ``flush()`` (and ``logging.shutdown`` at exit)
    writes what is pending."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        # the loop a flush is scheduled on (None: none is), and its thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def emit(self, record: logging.LogRecord) -> None:  # under the handler's lock
        try:
            line = self.format(record) + self.terminator
        except Exception:  # noqa: BLE001 - as StreamHandler: report, never raise
            self.handleError(record)
            return
        self._add(line)

    def write_line(self, line: str) -> None:
        """A line already formatted (the access line, :func:`log_access`), written as
        ``emit`` writes a record's."""
        with self.lock:  # type: ignore[union-attr]
            self._add(line + self.terminator)

    def _add(self, line: str) -> None:
        self._lines.append(line)
        loop = self._loop
        if loop is not None and threading.get_ident() == self._loop_thread and loop.is_running():
            return  # the flush scheduled on this thread's loop writes it with the turn's lines
        loop = asyncio._get_running_loop()  # (a system call: once a turn, not once a line)
        if loop is None:
            self.flush()
        else:
            self._loop, self._loop_thread = loop, threading.get_ident()
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._loop = None
            if not self._lines:
                return
            text, self._lines = "".join(self._lines), []
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:  # noqa: BLE001 - as StreamHandler: report, never raise
                self.handleError(logging.makeLogRecord({"msg": text[:200]}))


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    """Send every logger (uvicorn's included) to stderr in ``fmt`` ('json' or 'text')."""
    handler = LineWriter(sys.stderr)
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
           "log_access", "AccessRecord", "JsonFormatter", "TextFormatter", "LineWriter"]
