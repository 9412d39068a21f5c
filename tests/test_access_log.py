"""The access line written directly (``service.logs.log_access`` and the JSON formatter's access
path) equals, to the character, the line ``logger.info(..., extra=...)`` gives through the generic
record and formatter, over random requests (seeded); generated request ids are uuid4 hex; the
line writer keeps the order of the lines while it writes a loop turn's lines at once."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import random
import time
import uuid

import pytest

from service.logs import (AccessRecord, JsonFormatter, LineWriter, TextFormatter, _access_json,
                          bind_job, bind_request, log_access, new_request_id)

ALPHABET = "abcXYZ09/-_.~%{}\"\\\n\t\x00\x1féü€😀 "


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def capture():
    logger = logging.getLogger("test.memplan.access")
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler
    logger.removeHandler(handler)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, n)))


def _both(logger, handler, rng: random.Random):
    """(log_access's record, logger.info's record, its JSON and text lines formatted in the
    request's context, as a handler does) of one random request."""
    method = rng.choice(["GET", "POST", "DELETE", "PATCH"])
    path = "/" + _text(rng, 40)
    status = rng.choice([200, 202, 400, 404, 413, 422, 500, 503, rng.randint(100, 599)])
    route = rng.choice(["/v1/memory", "/v1/validations/{job_id}", "unmatched", _text(rng, 20)])
    duration = rng.choice([0.0, round(rng.random() * 10 ** rng.randint(-3, 5), 3),
                           rng.random()])
    request_id = rng.choice(["req-1", "a" * 128, _text(rng, 30) or "x"])
    job_id = rng.choice([None, "j-1", _text(rng, 12) or "j"])

    def run() -> tuple[logging.LogRecord, logging.LogRecord, str, str]:
        ids = bind_request(request_id)
        if job_id:
            bind_job(job_id)
        log_access(logger, ids, method, path, status, route, duration)
        logger.info("%s %s %d", method, path, status,
                    extra={"route": route, "status": status, "duration_ms": duration})
        fast, generic = handler.records[-2:]
        generic.created, generic.msecs = fast.created, fast.msecs
        return fast, generic, JsonFormatter().format(generic), TextFormatter().format(generic)
    return contextvars.copy_context().run(run)


def test_access_lines_equal_the_generic_lines(capture):
    logger, handler = capture
    rng = random.Random(20260312)
    json_fmt, text_fmt = JsonFormatter(), TextFormatter()
    cases = 0
    for _ in range(400):
        fast, generic, json_line, text_line = _both(logger, handler, rng)
        assert type(fast) is AccessRecord
        # formatted outside the request's context: the record carries the request's ids
        line = json_fmt.format(fast)
        assert line == json_line and _access_json(fast) == line  # written directly
        fast.fields = -1  # the same record through the generic path
        assert json_fmt.format(fast) == line
        assert text_fmt.format(fast) == text_line
        cases += 1
    assert cases == 400


def test_access_records_have_the_standard_attributes(capture):
    logger, handler = capture
    fast, generic, _, _ = _both(logger, handler, random.Random(7))
    standard = list(vars(logging.LogRecord("", 0, "", 0, "", (), None)))
    for key in ("message", "asctime"):  # set by the formatter of pytest's log capture
        fast.__dict__.pop(key, None)
    assert [k for k in vars(fast) if k not in standard] == (
        ["request_id"] + (["job_id"] if fast.__dict__.get("job_id") else [])
        + ["route", "status", "duration_ms"])
    assert [k for k in vars(fast) if k in standard] == standard
    for key in ("name", "msg", "args", "levelname", "levelno", "exc_info", "exc_text",
                "stack_info", "thread", "threadName", "processName", "process", "route",
                "status", "duration_ms"):
        assert getattr(fast, key) == getattr(generic, key), key
    assert fast.getMessage() == generic.getMessage()
    assert fast.created - int(fast.created) >= fast.msecs / 1000 - 1e-9


def test_an_attribute_added_on_the_way_is_logged(capture):
    logger, handler = capture

    def add_field(record: logging.LogRecord) -> bool:
        record.replica = "r-2"
        return True
    logger.addFilter(add_field)
    try:
        log_access(logger, {"request_id": "r"}, "GET", "/healthz", 200, "/healthz", 0.5)
    finally:
        logger.removeFilter(add_field)
    line = JsonFormatter().format(handler.records[-1])
    assert line.endswith('"route": "/healthz", "status": 200, "duration_ms": 0.5, '
                         '"replica": "r-2"}')


def test_no_record_when_the_access_logger_would_not_emit(capture):
    logger, handler = capture
    logger.setLevel(logging.WARNING)
    log_access(logger, {"request_id": "r"}, "GET", "/healthz", 200, "/healthz", 0.5)
    assert handler.records == []


def test_generated_request_ids_are_uuid4_hex():
    ids = {new_request_id(None) for _ in range(500)}
    assert len(ids) == 500
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert new_request_id("abc-1") == "abc-1" and new_request_id("a b") not in ("a b", "")


def test_a_line_writer_with_the_json_formatter_gets_the_same_line_directly(capture,
                                                                           monkeypatch):
    """memplan's own configuration (one LineWriter with the JSON formatter): log_access writes
    the line without a record, the characters the record's JSON line has; a filter on the way
    (or another handler) and the record goes through as before."""
    logger, handler = capture
    direct = logging.getLogger("test.memplan.access.direct")
    stream = io.StringIO()
    writer = LineWriter(stream)
    writer.setFormatter(JsonFormatter())
    direct.addHandler(writer)
    direct.setLevel(logging.INFO)
    direct.propagate = False
    rng = random.Random(20261206)
    seen: list[logging.LogRecord] = []

    def no_record(record: logging.LogRecord) -> None:
        raise AssertionError(f"a record reached the writer: {record}")
    writer.handle = no_record  # type: ignore[method-assign]
    try:
        for i in range(300):
            method = rng.choice(["GET", "POST"])
            path, route = "/" + _text(rng, 30), rng.choice(["/v1/memory", _text(rng, 10)])
            status = rng.choice([200, 413, rng.randint(100, 599)])
            duration = rng.choice([0.0, round(rng.random() * 10 ** rng.randint(-3, 4), 3)])
            request_id, job_id = _text(rng, 20) or "r", rng.choice([None, "j-1", _text(rng, 8)])
            now = rng.choice([1765000000.0, 1765000000.9995, 1765000000 + rng.random() * 1e5])
            monkeypatch.setattr(time, "time", lambda now=now: now)

            def run(request_id: str, job_id: str | None, *fields: object) -> None:
                ids = bind_request(request_id)
                if job_id:
                    bind_job(job_id)
                log_access(direct, ids, *fields)  # type: ignore[arg-type]
                log_access(logger, ids, *fields)  # type: ignore[arg-type]
            contextvars.copy_context().run(run, request_id, job_id, method, path, status, route,
                                           duration)
            monkeypatch.undo()
            record = handler.records[-1]
            record.name = direct.name  # (the record's logger: the other one)
            assert stream.getvalue().split("\n")[-2] == JsonFormatter().format(record)
        del writer.handle
        writer.addFilter(lambda record: seen.append(record) or True)
        contextvars.copy_context().run(lambda: log_access(
            direct, bind_request("r-f"), "GET", "/healthz", 200, "/healthz", 0.5))
        assert len(seen) == 1 and type(seen[0]) is AccessRecord
        assert stream.getvalue().split("\n")[-2] == JsonFormatter().format(seen[0])
    finally:
        direct.removeHandler(writer)


class Stream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_line_writer_writes_a_loop_turn_at_once_in_order():
    stream = Stream()
    handler = LineWriter(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.memplan.writer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("before")  # no event loop here: written at once
        assert (stream.getvalue(), stream.writes) == ("before\n", 1)

        async def requests() -> None:
            for i in range(5):
                logger.info("turn 1 line %d", i)
            assert stream.writes == 1  # pending until the loop's current callbacks are done
            await asyncio.sleep(0)
            assert stream.writes == 2
            logger.info("turn 2")
            # a line from another thread: what is pending goes first
            await asyncio.to_thread(logger.info, "from a thread")
            logger.info("pending at the end")

        asyncio.run(requests())
        handler.flush()
        assert stream.getvalue().splitlines() == (
            ["before"] + [f"turn 1 line {i}" for i in range(5)]
            + ["turn 2", "from a thread", "pending at the end"])
    finally:
        logger.removeHandler(handler)


def test_a_route_error_is_a_500_with_the_request_id_and_its_access_line(tmp_path, capture):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/jobs.db"))

    async def boom() -> None:
        raise RuntimeError("boom")
    app.add_api_route("/boom", boom)
    logger, handler = capture
    access = logging.getLogger("memplan.access")
    access.addHandler(handler)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            r = client.get("/boom", headers={"X-Request-ID": "req-500"})
            # the route, then (the setup marked fast) the fast lane
            answers = [client.post("/v1/memory", json={"model": {"preset": "gpt2"}},
                                   headers={"X-Request-ID": f"req-{i}"}) for i in range(3)]
    finally:
        access.removeHandler(handler)
        access.setLevel(old_level)
        app.state.jobs.close()
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert [(a.status_code, a.headers["x-request-id"]) for a in answers] == [
        (200, f"req-{i}") for i in range(3)]
    assert answers[0].content == answers[2].content
    lines = {rec.request_id: rec for rec in handler.records if rec.name == "memplan.access"}
    assert (lines["req-500"].status, lines["req-500"].route) == (500, "/boom")
    for i in range(3):
        assert (lines[f"req-{i}"].status, lines[f"req-{i}"].route) == (200, "/v1/memory")
