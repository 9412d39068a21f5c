"""The step simulator's answers for POST /v1/memory, memoised: step templates and replays.

Per setup (everything but the micro-batch size and the sequence length) and size domain, the
setup's step template (planner/step_template.py) gives the peaks as closed forms in those two
sizes; None marks a setup whose replay depends on their values (always replayed concretely). A
setup's template is compiled when it comes back with a second size: a one-off estimate costs
one concrete replay, a sweep one compile (a few replays' worth) and then microseconds per size.
Concrete replays are memoised too (exact repeats of a setup without a template).

Per *structure* (a setup without the model's dimensions: planner/structure_template.py), a
single-device step is also compiled with the dimensions symbolic, off the request path: the
first estimate of a structure replays concretely and queues the structure's compile on one
background thread (a compile costs about a hundred replays); once it is done, the estimate of
any model of that structure that would otherwise be replayed is an evaluation instead. A step
that decides on the dimensions holds guarded variants (planner/structure_template.py): a model
no variant admits is replayed and queues one more (up to ``_STRUCTURE_MAX_VARIANTS``).
"""

from __future__ import annotations

import contextlib
import operator
import queue
import threading

from planner.reference_step import ReferenceProgram, StepPeaks
from planner.specs import (
    ActivationCheckpointing,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.step_template import (
    StepTemplate,
    Undecided,
    compile_template,
    compile_windows,
    domain_of,
)

_SIM_CACHE: dict[tuple, StepPeaks] = {}
_SIM_CACHE_MAX = 512
_TEMPLATES: dict[tuple, StepTemplate | None] = {}
_TEMPLATES_MAX = 256
_SEEN: dict[tuple, int] = {}
_SEEN_MAX = 4096
_SIZES = ("micro_batch_size", "sequence_length")
_NESTED = ("activation_checkpointing", "lora", "precision_overrides")
_SETUP_FIELDS = operator.itemgetter(*(f for f in TrainingSpec.model_fields
                                      if f not in _SIZES and f not in _NESTED))
_AC_FIELDS = operator.itemgetter(*ActivationCheckpointing.model_fields)
_MODEL_FIELDS = operator.itemgetter(*ResolvedModel.model_fields)
_PAR_FIELDS = operator.itemgetter(*ParallelSpec.model_fields)
_LOCK = threading.Lock()  # cache writes (sync routes run in a thread pool)
_USE_TEMPLATES = True
_STRUCTURES: dict[tuple, object] = {}  # structure key -> _Variants
_PENDING: set[tuple] = set()  # (structure key, generation) queued or compiling
_QUEUE: queue.Queue | None = None  # served by one daemon thread (a process exits without it)
_STRUCTURE_MODE = "background"  # "background", "sync" (compiled in the request) or "off"
_GENERATION = [0]  # bumped by clear(): a compile queued before it is dropped


def _put(store: dict, key, value, limit: int) -> None:
    """Insert into a bounded cache, dropping its oldest entry when full."""
    with _LOCK:
        if len(store) >= limit:
            store.pop(next(iter(store)), None)
        store[key] = value


def setup_key(model: ResolvedModel, tr: TrainingSpec, device: str,
              checkpointed: frozenset[int], par: ParallelSpec | None = None,
              rank: int = 0) -> tuple:
    """Key of everything the replay depends on but the two sizes, domain last. Plain tuples of
    the specs' fields, so lookups compare primitives; a list inside (explicit blocks, LoRA
    target modules) does not hash, and lookups fall back to ``_json_key``. ``par``/``rank``: a
    data-parallel rank's replay (planner/reference_parallel.py)."""
    d = tr.__dict__
    return (_MODEL_FIELDS(model.__dict__), _SETUP_FIELDS(d),
            _AC_FIELDS(d["activation_checkpointing"].__dict__), d["lora"],
            d["precision_overrides"], device, checkpointed,
            None if par is None else _PAR_FIELDS(par.__dict__), rank,
            domain_of(tr.micro_batch_size, tr.sequence_length))


def _json_key(key: tuple, tr: TrainingSpec) -> tuple:
    return (key[0], tr.model_dump_json(exclude=set(_SIZES)), *key[5:])  # the rest hashes


def _program(model: ResolvedModel, tr: TrainingSpec, device: str, checkpointed: frozenset[int],
             par: ParallelSpec | None, rank: int, **kw):
    if par is None:
        return ReferenceProgram(model, tr, device=device, checkpointed=set(checkpointed), **kw)
    from planner.reference_parallel import ParallelProgram

    return ParallelProgram(model, tr, par, rank, device=device, checkpointed=set(checkpointed),
                           **kw)


def simulate(model: ResolvedModel, tr: TrainingSpec, device: str,
             checkpointed: frozenset[int], par: ParallelSpec | None = None,
             rank: int = 0) -> StepPeaks:
    """The reference step's peaks (a pure function of the inputs), on one device or for one
    data-parallel rank: from the setup's template when it has one, else replayed op by op."""
    skey = setup_key(model, tr, device, checkpointed, par, rank)
    try:  # the hot path first: a compiled setup
        tpl = _TEMPLATES.get(skey) if _USE_TEMPLATES else None
    except TypeError:  # a list inside the specs: _cached keys it by JSON
        tpl = None
    if tpl is not None:
        return tpl.evaluate(tr.micro_batch_size, tr.sequence_length)

    def replay():
        if par is None and _USE_TEMPLATES and _STRUCTURE_MODE != "off":
            hit = _structure_estimate(skey, model, tr, device, checkpointed)
            if hit is not None:
                return hit
        return _program(model, tr, device, checkpointed, par, rank).run()

    def compile_(domain):
        def make(machine, sizes):
            return _program(model, tr, device, checkpointed, par, rank, machine=machine,
                            sizes=sizes)
        return compile_template(model, tr, device, set(checkpointed), domain, make)
    return _cached(skey, tr, replay, compile_, lambda tpl, b, t: tpl.evaluate(b, t))


def pipeline_rank(model: ResolvedModel, tr: TrainingSpec, schedule, device: str, rank: int):
    """One pipeline rank's replayed step (planner/pipeline_memory.py: StagePeak), templated and
    memoised like ``simulate``."""
    from planner.pipeline_memory import PipelineRankProgram, StagePeak

    def program(**kw):
        return PipelineRankProgram(model, tr, schedule, rank, device=device, **kw)

    def compile_(domain):
        return compile_windows(lambda m, sizes: program(machine=m, sizes=sizes), domain,
                               lambda prog: prog.step_windows())

    stages = [s for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == rank]
    base = setup_key(model, tr, device, frozenset(), None, rank)
    plan = (schedule.name, schedule.num_ranks, schedule.num_stages, schedule.microbatches)
    return _cached((*base[:-1], plan, base[-1]), tr, lambda: program().run_steps(), compile_,
                   lambda tpl, b, t: StagePeak(rank, stages, *tpl.evaluate(b, t)))


def _cached(skey: tuple, tr: TrainingSpec, replay, compile_, evaluate):
    """``replay()``'s result for ``skey`` (domain last) at tr's sizes: evaluated from the
    compiled template (``compile_(domain)``, ``evaluate(template, B, T)``) when there is one,
    compiled when the setup comes back with another size, else replayed (memoised)."""
    b, t = tr.micro_batch_size, tr.sequence_length
    try:
        tpl = _TEMPLATES.get(skey) if _USE_TEMPLATES else hash(skey) and None
    except TypeError:  # a list inside the specs
        skey = _json_key(skey, tr)
        tpl = _TEMPLATES.get(skey) if _USE_TEMPLATES else None
    if tpl is not None:
        return evaluate(tpl, b, t)
    key = (skey, b, t)
    hit = _SIM_CACHE.get(key)
    if hit is not None:
        return hit
    if _USE_TEMPLATES and skey not in _TEMPLATES:  # None there: found size-dependent
        with _LOCK:
            if len(_SEEN) >= _SEEN_MAX:
                _SEEN.clear()
            seen = _SEEN[skey] = _SEEN.get(skey, 0) + 1
        if seen >= 2:
            tpl = _compile(skey, compile_)
            if tpl is not None:
                return evaluate(tpl, b, t)
    hit = replay()
    _put(_SIM_CACHE, key, hit, _SIM_CACHE_MAX)
    return hit


def _compile(skey: tuple, compile_):
    try:
        tpl = compile_(skey[-1])
    except (Undecided, TypeError):
        tpl = None
    _put(_TEMPLATES, skey, tpl, _TEMPLATES_MAX)
    _SEEN.pop(skey, None)
    return tpl


def _structure_key(skey: tuple, model: ResolvedModel, tr: TrainingSpec, dom: tuple) -> tuple:
    """The setup key with the model's dimensions left out (family, blocks and tied embeddings
    kept) and the structure's domain last; hashable (a list inside the specs: keyed by JSON)."""
    key = (model.family, model.num_layers, model.tie_embeddings, model.architecture_known,
           *skey[1:-1], dom)
    try:
        hash(key)
    except TypeError:
        key = (model.family, model.num_layers, model.tie_embeddings, model.architecture_known,
               tr.model_dump_json(exclude=set(_SIZES)), *skey[5:-1], dom)
    return key


def _structure_estimate(skey: tuple, model: ResolvedModel, tr: TrainingSpec, device: str,
                        checkpointed: frozenset[int]) -> StepPeaks | None:
    """The step's peaks from the structure's template when it is compiled; otherwise None, and
    the structure's compile is queued (or, in "sync" mode, run here)."""
    from planner.structure_template import structure_of

    st = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    if st is None:
        return None
    dom, names, values = st
    key = _structure_key(skey, model, tr, dom)
    known = _STRUCTURES.get(key)
    if known is not None:
        tpl = known.find(values)
        if tpl is not None:
            return tpl.evaluate(values)
        if known.attempts >= _STRUCTURE_MAX_VARIANTS:
            return None
    job = (model, tr, device, checkpointed, names, dom[0], values, key, _GENERATION[0])
    if _STRUCTURE_MODE == "sync":
        tpl = _compile_structure(*job)
        return None if tpl is None else tpl.evaluate(values)
    global _QUEUE
    with _LOCK:
        # one compile of a structure at a time, and a bounded queue: a flood of structures
        # seen once each stays on the replay instead of keeping the thread busy
        if (key, job[-1]) not in _PENDING and len(_PENDING) < _STRUCTURE_MAX_PENDING:
            if _QUEUE is None:
                _QUEUE = queue.Queue()
                threading.Thread(target=_serve, args=(_QUEUE,), name="memplan-structure",
                                 daemon=True).start()
            _PENDING.add((key, job[-1]))
            _QUEUE.put(job)
    return None


def _serve(q: queue.Queue) -> None:
    while True:
        job = q.get()
        try:
            _compile_structure(*job)
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


def _compile_structure(model, tr, device, checkpointed, names, half, values, key,
                       generation):
    from planner.deadline import WorkLimit, WorkLimitExceeded, work_limit
    from planner.reference_step import plan_period
    from planner.structure_template import compile_structure

    L = model.num_layers
    k = plan_period(set(checkpointed), L)
    simulated = L if not k or L // k < 7 else 5 * k + L % k
    tpl = None
    if simulated <= _STRUCTURE_MAX_BLOCKS:
        try:
            with work_limit(WorkLimit(_STRUCTURE_WORK_LIMIT_S)):
                tpl = compile_structure(model, tr, device, set(checkpointed), names, half,
                                        values)
        except (Undecided, WorkLimitExceeded, Exception):  # noqa: BLE001
            # a size the program cannot take symbolically (TypeError, ...) included: the
            # structure stays on the replay, which is the answer anyway
            tpl = None
    if generation == _GENERATION[0]:
        known = _STRUCTURES.get(key)
        if known is None:
            known = _Variants()
            _put(_STRUCTURES, key, known, _TEMPLATES_MAX)
        with _LOCK:
            known.attempts += 1
            if tpl is not None:
                known.templates.append(tpl)
    with _LOCK:
        _PENDING.discard((key, generation))
    return tpl


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


def compiled_template(model: ResolvedModel, tr: TrainingSpec, device: str,
                      checkpointed: frozenset[int], batch: int) -> StepTemplate | None:
    """The setup's template for micro-batch ``batch`` (at ``tr``'s sequence length) when it is
    compiled; None otherwise (nothing is compiled here)."""
    if not _USE_TEMPLATES:
        return None
    key = setup_key(model, tr, device, checkpointed)
    key = (*key[:-1], domain_of(batch, tr.sequence_length))
    try:
        tpl = _TEMPLATES.get(key)
    except TypeError:
        tpl = None
    if tpl is None and _STRUCTURE_MODE != "off":
        from planner.structure_template import structure_of

        st = structure_of(model, batch, tr.sequence_length)
        known = None if st is None else _STRUCTURES.get(_structure_key(key, model, tr, st[0]))
        s = None if known is None else known.find(st[2])
        if s is not None:
            return _ModelTemplate(s, model)
    return tpl


class _ModelTemplate:
    """A structure's template bound to one model: ``evaluate(B, T)`` as a setup's template
    (for the batch it was looked up for; its guards are checked again at every size)."""

    __slots__ = ("model", "tpl")

    def __init__(self, tpl, model: ResolvedModel) -> None:
        self.tpl, self.model = tpl, model

    def evaluate(self, B: int, T: int) -> StepPeaks:
        from planner.structure_template import structure_of

        values = structure_of(self.model, B, T)[2]
        if self.tpl.admits is not None and not self.tpl.admits(*values):
            raise Undecided("the structure's template does not hold at this size")
        return self.tpl.evaluate(values)


_MEMO: dict[tuple, object] = {}


def setup_memo(fn, model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec):
    """``fn(model, tr, par)`` memoised per setup, for functions that do not depend on the
    micro-batch size or the sequence length (per-rank model states, ZeRO-1 partitions)."""
    try:
        key = (fn, *setup_key(model, tr, "", frozenset(), par)[:-1])
        hit = _MEMO.get(key)
    except TypeError:  # a list inside the specs: not memoised
        return fn(model, tr, par)
    if hit is None:
        hit = fn(model, tr, par)
        _put(_MEMO, key, hit, _TEMPLATES_MAX)
    return hit


@contextlib.contextmanager
def replay_only():
    """Estimates inside use the op-by-op replay alone (tests and benchmarks compare the two;
    not thread-safe: it switches a module setting)."""
    global _USE_TEMPLATES
    was, _USE_TEMPLATES = _USE_TEMPLATES, False
    try:
        yield
    finally:
        _USE_TEMPLATES = was


def clear() -> None:
    with _LOCK:
        _SIM_CACHE.clear()
        _TEMPLATES.clear()
        _SEEN.clear()
        _MEMO.clear()
        _STRUCTURES.clear()
        _GENERATION[0] += 1
