"""How the estimate routes run their planner work: bounded, time-limited, cancellable, and answered
on the event loop when the answer is already known to be a template evaluation.

- At most ``max_concurrent_estimates`` estimates compute at once per process, on worker threads
  of their own (an anyio capacity limiter), so the health, catalog and job routes never queue
  behind them. A request that finds every slot taken waits up to ``estimate_queue_s`` for one,
  then gets a 503 problem with ``Retry-After``.
- Each estimate runs under a work limit of ``estimate_deadline_s`` (planner.machine.deadline): past it,
  the planner stops at its next check and the answer is a 503 problem naming the limit.
- When the client goes away, the work limit is cancelled: the planner stops at its next check
  and the slot is free again.

The fast path. Every replay, rank loop and schedule simulation of the planner calls
``planner.machine.deadline.check()`` as it goes; an answer read from a compiled step template or a
memo calls it never and takes microseconds. A route may name the *setup* of a request (everything
but the sizes a sweep varies, see :func:`setup_key`). When an estimate of that setup ran on a
worker thread without one check and within ``INLINE_CPU_S`` of CPU, the setup is marked fast, and
its next estimates run on the event loop itself: no thread hand-off, no disconnect watcher, in a
free estimate slot (when none is free, the request takes the queue like any other). An inline
estimate runs to its end without giving the loop back, so nothing else can take or see that slot
meanwhile: the slot is checked to be free rather than taken and given back. An inline estimate runs
under a work limit whose first ``check()`` stops it: the planner was about to replay, so the setup
loses its mark and the estimate starts again on a worker thread under the real limits. An inline
estimate that used more than ``INLINE_CPU_S`` of CPU loses the mark too (its CPU time is read only
when its wall time is over that: the CPU a thread uses grows no faster than the clock). The answer
is the same function of the same request either way: only where it runs differs. (A stopped inline
attempt has counted the setup as seen once in the planner's step cache, so the retry may compile
the setup's template one request early: the template's answers equal the replay's to the byte.)

The fast lane (:class:`FastLane`, asked by the request layer in front of all of FastAPI's own
layers, inside its body-size limit: ``service.front``) answers such estimates before the
framework's middlewares, routing, dependency solving and response validation, which cost several
times the template evaluation: a JSON ``POST`` to a lane's path whose body validates and whose
setup is marked fast is answered there, serialised as the route serialises it. Anything else (a
refusal of any kind, an unmarked setup, a replay reached, protected estimate routes) goes on to the
route with the body already read, and is answered as before.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Hashable
from operator import itemgetter
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, Request
from pydantic import BaseModel

from planner.catalog.specs import MemoryRequest
from planner.machine.deadline import (
    WorkLimit,
    WorkLimitExceeded,
    foreground,
    run_in_foreground,
    work_limit,
)
from planner.machine.recording import domain_of
from service.errors import PROBLEM, Problem, loads_unique

T = TypeVar("T")

INLINE_CPU_S = 0.001  # the most CPU an estimate answered on the event loop may take
FAST_SETUPS_MAX = 4096

ESTIMATE_LIMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "content": {PROBLEM: {}},
          "description": "Every estimate slot stayed busy (Retry-After), or the estimate ran "
          "past the per-request work limit"},
}

_SIZES = ("micro_batch_size", "sequence_length")


def setup_key(route: str, request: MemoryRequest) -> Hashable:
    """A memory request's setup: all of it but the micro-batch size and the sequence length,
    with the size domain the planner's step templates are compiled for. The specs are frozen
    models, so the key is a tuple of their values (JSON where a list inside does not hash). The
    key only decides where an estimate runs, never what it answers."""
    key = _setup_tuple(route, request)
    try:
        hash(key)
    except TypeError:  # e.g. explicit checkpointed blocks, LoRA target modules
        key = _setup_json(route, request, key[-1])
    return key


def marked_setup(slots: EstimateSlots, route: str, request: MemoryRequest) -> Hashable | None:
    """The request's setup key (:func:`setup_key`) when that setup is marked fast, else None:
    the key hashed once, by the lookup itself."""
    key = _setup_tuple(route, request)
    try:
        return key if key in slots.fast else None
    except TypeError:
        key = _setup_json(route, request, key[-1])
        return key if key in slots.fast else None


def _setup_tuple(route: str, request: MemoryRequest) -> tuple:
    getters = _GETTERS.get(type(request))
    if getters is None:
        getters = _GETTERS[type(request)] = _getters(type(request))
    tr = request.training
    return (route, getters[0](request.__dict__), getters[1](tr.__dict__),
            domain_of(tr.micro_batch_size, tr.sequence_length))


def _setup_json(route: str, request: MemoryRequest, domain: Hashable) -> Hashable:
    return (route, request.model_dump_json(exclude={"training": set(_SIZES)}), domain)


def _getters(kind: type[MemoryRequest]) -> tuple[Callable[[dict], tuple], Callable[[dict], tuple]]:
    """The values of a request's fields but ``training``, and of its training's fields but the
    sizes, each as a tuple in the fields' order."""
    def getter(names: tuple[str, ...]) -> Callable[[dict], tuple]:
        if len(names) == 1:
            return lambda d: (d[names[0]],)
        return itemgetter(*names)  # type: ignore[return-value]

    training = kind.model_fields["training"].annotation
    return (getter(tuple(k for k in kind.model_fields if k != "training")),
            getter(tuple(k for k in training.model_fields if k not in _SIZES)))


_GETTERS: dict[type, tuple[Callable[[dict], tuple], Callable[[dict], tuple]]] = {}


class EstimateSlots:
    """The per-process estimate limits (one per app, in ``app.state.estimates``)."""

    def __init__(self, max_concurrent: int, queue_s: float, deadline_s: float,
                 transformers_deadline_s: float | None = None) -> None:
        self.limiter = anyio.CapacityLimiter(max_concurrent)
        # the threads the estimates run on: never more than the slots held, and not the default
        # thread pool that the synchronous routes (readiness, catalogs, jobs) use
        self.threads = anyio.CapacityLimiter(max_concurrent)
        self.queue_s, self.deadline_s = queue_s, deadline_s
        self.transformers_deadline_s = transformers_deadline_s or deadline_s
        self.fast: dict[Hashable, None] = {}  # setups answered on the event loop (oldest first)

    @classmethod
    def from_settings(cls, settings) -> EstimateSlots:
        return cls(settings.max_concurrent_estimates, settings.estimate_queue_s,
                   settings.estimate_deadline_s, settings.transformers_deadline_s)

    def mark_fast(self, setup: Hashable) -> None:
        if len(self.fast) >= FAST_SETUPS_MAX:
            self.fast.pop(next(iter(self.fast)), None)
        self.fast[setup] = None


class _NeedsThread(WorkLimitExceeded):
    """An inline estimate reached the planner's first work check (a replay is starting)."""

    def __init__(self) -> None:
        super().__init__("a replay is needed: the estimate moves to a worker thread")


class _InlineLimit(WorkLimit):
    """The work limit of an estimate on the event loop: its first check stops it."""

    __slots__ = ()

    def check(self) -> None:
        raise _NeedsThread()


class _ThreadLimit(WorkLimit):
    """The work limit of an estimate on a worker thread, counting the planner's checks and
    measuring the CPU the estimate used."""

    __slots__ = ("checks", "cpu_s")

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.checks, self.cpu_s = 0, float("inf")

    def check(self) -> None:
        self.checks += 1
        WorkLimit.check(self)


_INLINE = _InlineLimit(0.0)


def _run_limited(limit: _ThreadLimit, fn: Callable[[], T]) -> T:
    with work_limit(limit), foreground():
        start = time.thread_time()
        result = fn()
        limit.cpu_s = time.thread_time() - start
        return result


async def _watch_disconnect(request: Request, limit: WorkLimit) -> None:
    while not limit.cancelled:
        if await request.is_disconnected():
            limit.cancel()
            return
        await anyio.sleep(0.05)


def _try_inline(slots: EstimateSlots, setup: Hashable, fn: Callable[[], T]) -> tuple[bool, Any]:
    """(True, answer) when answered on the event loop; (False, None) when it must run on a thread
    (no free slot, or the planner reached a work check)."""
    # A free token means no estimate waits (a freed token goes straight to a waiting one); no await
    # below, so the token stays free while this estimate runs.
    if slots.limiter.available_tokens < 1:
        return False, None
    try:
        start, cpu_start = time.perf_counter(), time.thread_time()
        result = run_in_foreground(_INLINE, fn)
        # A thread's CPU time grows no faster than the clock: within INLINE_CPU_S of wall time,
        # the estimate used no more CPU than that, and its CPU (a system call) is not asked.
        if (time.perf_counter() - start > INLINE_CPU_S
                and time.thread_time() - cpu_start > INLINE_CPU_S):
            slots.fast.pop(setup, None)
        return True, result
    except _NeedsThread:
        slots.fast.pop(setup, None)
        return False, None


async def run_estimate(request: Request, fn: Callable[[], T], setup: Hashable | None = None,
                       transformers: bool = False) -> T:
    """Run ``fn`` (the planner call, with its own error mapping) under the process's limits;
    ``setup`` (see :func:`setup_key`) lets a known-fast setup be answered on the event loop;
    ``transformers``: the request traces a Hugging Face model (its own, longer limit)."""
    slots: EstimateSlots = request.app.state.estimates
    deadline, setting = (slots.transformers_deadline_s, "transformers_deadline_s") if transformers \
        else (slots.deadline_s, "estimate_deadline_s")
    if setup is not None and setup in slots.fast:
        done, answer = _try_inline(slots, setup, fn)
        if done:
            return answer
    with anyio.move_on_after(slots.queue_s) as waited:
        await slots.limiter.acquire()
    if waited.cancelled_caught:
        raise HTTPException(
            503, f"all {int(slots.limiter.total_tokens)} estimate slots of this process stayed busy "
            f"for {slots.queue_s:g} s (max_concurrent_estimates); retry",
            headers={"Retry-After": "1"})
    limit = _ThreadLimit(deadline)
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_disconnect, request, limit)
            try:
                ctx = contextvars.copy_context()
                result = await anyio.to_thread.run_sync(
                    ctx.run, _run_limited, limit, fn, limiter=slots.threads)
            except Exception as exc:  # noqa: BLE001 - raised below, outside the task group
                error = exc
            tg.cancel_scope.cancel()
    finally:
        slots.limiter.release()
    if isinstance(error, WorkLimitExceeded):
        raise HTTPException(
            503, f"{error.detail} ({setting} = {deadline:g} s): a request this "
            "large is not answered within the limit") from None
    if error is not None:
        raise error
    if setup is not None and limit.checks == 0 and limit.cpu_s <= INLINE_CPU_S:
        slots.mark_fast(setup)
    return result


# ---- the fast lane -----------------------------------------------------------------------------
class Lane:
    """An estimate route the fast lane may answer: its path template (for metrics and logs), body
    model, planner call (with the route's error mapping) and setup key name."""

    def __init__(self, path: str, body: type[MemoryRequest], answer: Callable[[Any], Any],
                 name: str) -> None:
        self.path, self.body, self.answer, self.name = path, body, answer, name
        self.defaults = shared_defaults(body)

    def validate(self, doc: Any) -> MemoryRequest:
        """The body model of a parsed body (raises as ``model_validate`` does), built from the
        lane's shared parts where it can (:func:`shared_defaults`)."""
        if type(doc) is dict:
            _share(doc, self.defaults)
        return self.body.__pydantic_validator__.validate_python(doc)


class _Shared:
    """A frozen model field of a lane's body model: the one instance of its default (when a
    factory builds it), and the instances validated from flat parts the bodies gave."""

    __slots__ = ("default", "model", "nested", "seen")

    def __init__(self, model: type[BaseModel], default: BaseModel | None,
                 nested: dict[str, _Shared]) -> None:
        self.model, self.default, self.nested = model, default, nested
        self.seen: dict[tuple, BaseModel] = {}


def shared_defaults(kind: type[BaseModel]) -> dict[str, _Shared]:
    """The fields of ``kind`` (and of its fields' models, recursively) that hold a frozen model,
    with what a body's part is replaced by before validation: the one instance of the field's
    default when the body leaves the field out and a factory builds it; the instance validated
    before from the same part when the part is flat (names to strings, integers, booleans,
    nulls) and its model holds no such field itself (a sweep asks one model, parallelism,
    checkpointing or loss many times). Either validates to a model equal to the one the part
    itself gives: an instance is accepted as it is (pydantic does not validate a model instance
    again), a frozen one may be shared by every request, and a part's model is a function of the
    part. Validating these once saves building them on every request (``tests/
    test_estimate_fast_path.py`` compares the two validations)."""
    out: dict[str, _Shared] = {}
    for name, field in kind.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)
                and model.model_config.get("frozen") and field.alias is None
                and model.model_config.get("revalidate_instances", "never") == "never"):
            continue
        out[name] = _Shared(model, model() if field.default_factory is model else None,
                            shared_defaults(model))
    return out


_FLAT = frozenset({str, int, bool, type(None)})  # (no floats: -0.0 == 0.0 would share them)
_SEEN_MAX = 1024


def _share(doc: dict, fields: dict[str, _Shared]) -> None:
    for name, shared in fields.items():
        value = doc.get(name, _MISSING)
        if value is _MISSING:
            if shared.default is not None:
                doc[name] = shared.default
        elif type(value) is dict:
            if shared.nested:
                _share(value, shared.nested)
                continue
            key = []
            for k, v in value.items():
                if v.__class__ not in _FLAT:
                    break
                key.append((k, v.__class__, v))
            else:
                seen = shared.seen.get(part := tuple(key))
                if seen is None:
                    try:
                        seen = shared.model.__pydantic_validator__.validate_python(value)
                    except ValueError:  # the body's validation words it
                        continue
                    if len(shared.seen) >= _SEEN_MAX:
                        shared.seen.clear()
                    shared.seen[part] = seen
                doc[name] = seen


_MISSING = object()


def json_content(content_type: bytes | None) -> bool:
    """A Content-Type header's value names JSON (the route parses nothing else)."""
    return content_type is not None and (
        content_type == b"application/json"
        or content_type.split(b";", 1)[0].strip().lower() == b"application/json")


class FastLane:
    """Answers ``POST`` to a lane's path on the spot when the body is valid JSON of the route's
    model and its setup is marked fast (see the module docstring): the same answer the route gives,
    without the framework's routing, dependency solving and response validation. Everything else
    (errors of any kind, unmarked setups, a replay reached, protected estimate routes, another
    content type) goes on to the app with the body it read, and is answered by the route as
    before. The request layer in front of FastAPI (``service.front``) asks it first, inside the
    body-size limit, and logs and measures its answers under the route's template."""

    def __init__(self, lanes: list[Lane], slots: EstimateSlots, settings: Any) -> None:
        self.slots, self.settings = slots, settings
        self.lanes = {lane.path: lane for lane in lanes}

    def lane_for(self, scope: dict, content_type: bytes | None) -> Lane | None:
        """The lane that may answer this request (its path, a JSON POST, estimates open)."""
        lane = self.lanes.get(scope["path"])
        if (lane is None or scope["method"] != "POST" or self.settings.protect_estimates
                or not json_content(content_type)):
            return None
        return lane

    async def answer(self, lane: Lane, receive: Any) -> tuple[bytes | None, Any]:
        """(the answer's JSON, None), or (None, the receive channel the route reads the body
        from: the body read here, then the client's messages)."""
        chunks: list[bytes] = []
        try:
            message = await receive()
            while message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
                message = await receive()
            else:  # the client went away: the route sees it where it reads the body
                return None, _replay(b"".join(chunks), message, receive)
        except Exception as exc:  # noqa: BLE001 - e.g. over the body-size limit: raised again
            return None, _replay(b"".join(chunks), exc, receive)  # in the route
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        answer = self._answer(lane, body)
        if answer is None:
            return None, _replay(body, None, receive)
        return answer, None

    def _answer(self, lane: Lane, body: bytes) -> bytes | None:
        try:
            request = lane.validate(loads_unique(body))
        except Exception:  # noqa: BLE001 - the route answers (and words) every refusal
            return None
        setup = marked_setup(self.slots, lane.name, request)
        if setup is None:
            return None
        try:
            done, result = _try_inline(self.slots, setup, lambda: lane.answer(request))
        except Exception:  # noqa: BLE001 - an error: the route answers it, as it always has
            return None
        # the bytes of model_dump_json(by_alias=True), as the route writes them
        return result.__pydantic_serializer__.to_json(result, by_alias=True) if done else None


def _replay(body: bytes, then: dict | Exception | None, receive: Any) -> Any:
    """A receive channel giving ``body`` again, then ``then`` (a message, or an exception the
    body read raised, raised again), then the client's own messages."""
    queue: list[Any] = [{"type": "http.request", "body": body, "more_body": then is not None}]
    if then is not None:
        queue.append(then)

    async def replayed() -> dict:
        if not queue:
            return await receive()
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return replayed
