"""Structure templates on the request path: compiled off it, one per structure, and served.

A *structure* is a single-device setup without the model's dimensions
(``planner/step/structure.py``). The first estimate of a structure replays concretely
(``planner/step/simulate.py``) and queues the structure's compile on one daemon thread (a compile
costs about a hundred replays; an exiting process stops it at its next check and joins it); once
it is done, the estimate of any model of that structure that would otherwise be replayed is an
evaluation. A step that decides on the dimensions holds guarded variants: a model no variant
admits is replayed and queues one more (up to ``_STRUCTURE_MAX_VARIANTS``). Any failure of a
compile leaves the structure on the replay, which is the answer anyway.

A data-parallel rank (DDP, FSDP2) has structures of its own, keyed by the parallel spec as well
(``planner/step/rank_structure.py``): the rank itself is left out of the key, and under FSDP2
its *class* (which first dimensions it holds in full, in part or not at all) selects the
variants, each class compiled on its first estimate like a structure.

A pipeline rank's structures (planner/layouts/pipeline_structures.py) are compiled on the same
thread (``submit``) and follow the same mode.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import queue
import threading

from planner.catalog.specs import ResolvedModel, TrainingSpec
from planner.machine import cache
from planner.machine.cache import _LOCK, _SIZES, _TEMPLATES_MAX, _put
from planner.machine.deadline import (
    BackgroundLimit,
    WorkLimitExceeded,
    stop_background,
    stopping,
    work_limit,
)
from planner.machine.symbolic import Undecided
from planner.step.peaks import StepPeaks
from planner.step.plans import plan_period
from planner.step.rank_structure import (
    NO_SHARDS,
    compile_rank_structure,
    shard_rows_of,
    templated,
)
from planner.step.structure import compile_structure, structure_of

__all__ = ["estimate", "model_template", "structure_mode", "submit", "wait_for_structures"]

_STRUCTURES: dict[tuple, object] = {}  # structure key -> _Variants
_PENDING: set[tuple] = set()  # (structure key, generation) queued or compiling
_QUEUE: queue.Queue | None = None  # served by one daemon thread, stopped at exit (``_stop``)
_THREAD: threading.Thread | None = None
_STOP_JOIN_S = 5.0  # the longest an exiting process waits for the compile to stop
_STRUCTURE_MODE = "background"  # "background", "sync" (compiled in the request) or "off"
_GENERATION = [0]  # bumped by clear(): a compile queued before it is dropped


def enabled() -> bool:
    return cache.USE_TEMPLATES and _STRUCTURE_MODE != "off"


def mode() -> str:
    """"background", "sync" or "off" (``structure_mode``)."""
    return _STRUCTURE_MODE


def _structure_key(skey: tuple, model: ResolvedModel, tr: TrainingSpec, dom: tuple) -> tuple:
    """The setup key with the model's dimensions and the rank left out (family, blocks and tied
    embeddings kept; a data-parallel rank's classes are looked up inside) and the structure's
    domain last; hashable (a list inside the specs: keyed by JSON)."""
    key = (model.family, model.num_layers, model.tie_embeddings, model.architecture_known,
           *skey[1:-2], dom)
    try:
        hash(key)
    except TypeError:
        key = (model.family, model.num_layers, model.tie_embeddings, model.architecture_known,
               tr.model_dump_json(exclude=set(_SIZES)), *skey[5:-2], dom)
    return key


def estimate(skey: tuple, model: ResolvedModel, tr: TrainingSpec, device: str,
             checkpointed: frozenset[int], par=None, rank: int = 0,
             program=None) -> StepPeaks | None:
    """The step's peaks from the structure's template when it is compiled; otherwise None, and
    the structure's compile is queued (or, in "sync" mode, run here). ``par``, ``rank`` and
    ``program``: a data-parallel rank's step (planner/step/rank_structure.py), as ``simulate``
    takes them."""
    if par is not None and not templated(par):
        return None
    if _simulated_blocks(frozenset(checkpointed), model.num_layers) > _STRUCTURE_MAX_BLOCKS:
        return None  # never compiled (below): nothing to queue or look up
    st = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    if st is None:
        return None
    dom, names, values = st
    key = _structure_key(skey, model, tr, dom)
    known = _STRUCTURES.get(key)
    classes = None
    if known is not None:
        if known.shards is None:  # its parameters' first dimensions are not polynomials
            return None
        classes, full = known.shards.extend(values, rank)
        variants = known.variants.get(classes)
        if variants is not None:
            tpl = variants.find(full)
            if tpl is not None:
                return tpl.evaluate(full)
            if variants.attempts >= _STRUCTURE_MAX_VARIANTS:
                return None
    job = (model, tr, device, checkpointed, names, dom[0], values, par, rank, program, key,
           classes, _GENERATION[0])
    if _STRUCTURE_MODE == "sync":
        got = _compile_structure(*job)
        return None if got is None else got[1].evaluate(got[0])
    with _LOCK:
        # one compile of a structure (and rank class) at a time, and a bounded queue: a flood
        # of structures seen once each stays on the replay instead of keeping the thread busy
        pend = (key, classes, job[-1])
        if pend not in _PENDING and len(_PENDING) < _STRUCTURE_MAX_PENDING:
            _started().put(job)
            _PENDING.add(pend)
    return None


def submit(pend: tuple, fn) -> bool:
    """Queue ``fn()`` (a compile of a layer above: a pipeline rank's structure,
    planner/layouts/pipeline_structures.py) on the structure thread, unless ``pend`` is queued
    already or the queue is full; whether it was queued."""
    with _LOCK:
        if pend in _PENDING or len(_PENDING) >= _STRUCTURE_MAX_PENDING:
            return False
        q = _started()  # under the lock: one queue and one thread, whoever comes first
        _PENDING.add(pend)

    def job() -> None:
        try:
            fn()
        finally:
            with _LOCK:
                _PENDING.discard(pend)
    q.put(job)
    return True


def _started() -> queue.Queue:
    """The compile queue, its thread started on first use (callers hold ``_LOCK``). At exit the
    thread is stopped and joined (``_stop``) before the interpreter is torn down."""
    global _QUEUE, _THREAD
    if _QUEUE is None:
        _QUEUE = queue.Queue()
        _THREAD = threading.Thread(target=_serve, args=(_QUEUE,), name="memplan-structure",
                                   daemon=True)
        _THREAD.start()
        atexit.register(_stop)
    return _QUEUE


def _stop() -> None:
    """At exit: the running compile stops at its next check, the queued ones are dropped, and
    the thread is joined (a compile checks its limit every few milliseconds; a thread left in
    numpy while the interpreter is torn down crashed or hung a finished ``memplan estimate``)."""
    stop_background()
    if _QUEUE is not None:
        _QUEUE.put(None)
    if _THREAD is not None:
        _THREAD.join(_STOP_JOIN_S)


def _serve(q: queue.Queue) -> None:
    while True:
        job = q.get()
        if job is None or stopping():  # the process is exiting (``_stop``)
            q.task_done()
            if job is None:
                return
            continue
        try:
            job() if callable(job) else _compile_structure(*job)
        except Exception:  # noqa: BLE001, S110 - the thread serves on; the structure replays
            pass
        finally:
            q.task_done()


# A structure's compile replays its blocks symbolically and prunes every window's rows: only
# steps with few simulated blocks (a compressed replay simulates five periods) are compiled,
# each within a work limit of its own (the background thread has no request's limit). A
# structure whose step decides on its dimensions (the largest parameter, a size threshold)
# holds a few guarded variants, one per path its models take.
_STRUCTURE_MAX_BLOCKS = 48
_STRUCTURE_WORK_LIMIT_S = 20.0
_STRUCTURE_MAX_VARIANTS = 4
_STRUCTURE_MAX_PENDING = 8


@functools.lru_cache(maxsize=256)
def _simulated_blocks(checkpointed: frozenset[int], num_layers: int) -> int:
    """How many blocks a compressed replay of the step simulates (``compression_plan``)."""
    k = plan_period(set(checkpointed), num_layers)
    return num_layers if not k or num_layers // k < 7 else 5 * k + num_layers % k


class _Variants:
    """A structure's compiled templates (each for the models its guards admit) and how many
    compiles were tried."""

    __slots__ = ("attempts", "templates")

    def __init__(self) -> None:
        self.templates: list = []
        self.attempts = 0

    def find(self, values: tuple[int, ...]):
        for tpl in self.templates:
            if tpl.admits is None or tpl.admits(*values):
                return tpl
        return None


class _Structure:
    """A structure's variants per rank class (one class, ``()``, on one device and under DDP)
    and its FSDP2 shard rows (planner/step/rank_structure.py: ``ShardRows``)."""

    __slots__ = ("shards", "variants")

    def __init__(self, shards) -> None:
        self.shards = shards
        self.variants: dict[tuple, _Variants] = {}

    @property
    def templates(self) -> list:
        """Every compiled template of the structure, over its rank classes."""
        return [t for v in self.variants.values() for t in v.templates]


def _compile_structure(model, tr, device, checkpointed, names, half, values, par, rank,
                       program, key, classes, generation):
    """Compile the structure's template for this model (and rank): (the values the template
    takes, the template), or None when it does not compile; recorded either way."""
    pending = (key, classes, generation)
    simulated = _simulated_blocks(frozenset(checkpointed), model.num_layers)
    tpl, full = None, values
    known = _STRUCTURES.get(key)
    shards = NO_SHARDS if par is None else known.shards if known is not None else None
    try:
        with work_limit(BackgroundLimit(_STRUCTURE_WORK_LIMIT_S)):
            if shards is None:
                shards = shard_rows_of(model, tr, device, checkpointed, names, half, par)
            classes, full = shards.extend(values, rank)
            if simulated > _STRUCTURE_MAX_BLOCKS:
                pass
            elif par is None:
                tpl = compile_structure(model, tr, device, set(checkpointed), names, half,
                                        values)
            else:
                tpl = compile_rank_structure(model, tr, device, checkpointed, names, half,
                                             values, par, rank, program, shards)[1]
    except (Undecided, WorkLimitExceeded, Exception):  # noqa: BLE001
        # a size the program cannot take symbolically (TypeError, ...) included: the
        # structure stays on the replay, which is the answer anyway
        tpl = None
    if generation == _GENERATION[0]:
        known = _STRUCTURES.get(key)
        if known is None:
            known = _Structure(shards)  # None: no shard rows, the structure is replayed
            _put(_STRUCTURES, key, known, _TEMPLATES_MAX)
        if shards is not None:
            with _LOCK:
                variants = known.variants.setdefault(classes, _Variants())
                variants.attempts += 1
                if tpl is not None:
                    variants.templates.append(tpl)
    with _LOCK:
        _PENDING.discard(pending)
    return None if tpl is None else (full, tpl)


def wait_for_structures() -> None:
    """Block until every queued structure compile is done (tests and benchmarks)."""
    if _QUEUE is not None:
        _QUEUE.join()


@contextlib.contextmanager
def structure_mode(mode: str):
    """Structure templates compiled in the background (the default), in the request ("sync":
    tests and benchmarks), or not at all ("off")."""
    global _STRUCTURE_MODE
    was, _STRUCTURE_MODE = _STRUCTURE_MODE, mode
    try:
        yield
    finally:
        _STRUCTURE_MODE = was


class _ModelTemplate:
    """A structure's template bound to one model: ``evaluate(B, T)`` as a setup's template
    (for the batch it was looked up for; its guards are checked again at every size)."""

    __slots__ = ("model", "tpl")

    def __init__(self, tpl, model: ResolvedModel) -> None:
        self.tpl, self.model = tpl, model

    def evaluate(self, B: int, T: int) -> StepPeaks:
        values = structure_of(self.model, B, T)[2]
        if self.tpl.admits is not None and not self.tpl.admits(*values):
            raise Undecided("the structure's template does not hold at this size")
        return self.tpl.evaluate(values)


def model_template(key: tuple, model: ResolvedModel, tr: TrainingSpec, batch: int):
    """The structure's template for ``key`` (a setup key at ``batch``) bound to ``model``, when
    the structure is compiled and admits the model; else None."""
    if _STRUCTURE_MODE == "off":
        return None
    st = structure_of(model, batch, tr.sequence_length)
    known = None if st is None else _STRUCTURES.get(_structure_key(key, model, tr, st[0]))
    variants = None if known is None else known.variants.get(())
    s = None if variants is None else variants.find(st[2])
    return None if s is None else _ModelTemplate(s, model)


def _clear() -> None:
    with _LOCK:
        _STRUCTURES.clear()
        _GENERATION[0] += 1


cache.on_clear(_clear)
