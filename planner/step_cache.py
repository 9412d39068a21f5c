"""The step simulator's answers for POST /v1/memory, memoised: step templates and replays.

Per setup (everything but the micro-batch size and the sequence length) and size domain, the
setup's step template (planner/step_template.py) gives the peaks as closed forms in those two
sizes; None marks a setup whose replay depends on their values (always replayed concretely). A
setup's template is compiled when it comes back with a second size: a one-off estimate costs
one concrete replay, a sweep one compile (a few replays' worth) and then microseconds per size.
Concrete replays are memoised too (exact repeats of a setup without a template).
"""

from __future__ import annotations

import contextlib
import operator
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
    from planner.pipeline_memory import StagePeak
    from planner.pipeline_replays import compile_rank, rank_step

    def compile_(domain):
        return compile_rank(model, tr, schedule, rank, device, domain)

    stages = [s for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == rank]
    base = setup_key(model, tr, device, frozenset(), None, rank)
    plan = (schedule.name, schedule.num_ranks, schedule.num_stages, schedule.microbatches)
    return _cached((*base[:-1], plan, base[-1]), tr,
                   lambda: rank_step(model, tr, schedule, rank, device), compile_,
                   lambda tpl, b, t: StagePeak(rank, stages, *tpl.evaluate(b, t)))


def _cached(skey: tuple, tr: TrainingSpec, replay, compile_, evaluate):
    """``replay()``'s result for ``skey`` (domain last) at tr's sizes: evaluated from the
    compiled template (``compile_(domain)``, ``evaluate(template, B, T)``) when there is one,
    compiled when the setup comes back with another size, else replayed (memoised)."""
    b, t = tr.micro_batch_size, tr.sequence_length
    try:
        tpl = _TEMPLATES.get(skey) if _USE_TEMPLATES else None
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


def compiled_template(model: ResolvedModel, tr: TrainingSpec, device: str,
                      checkpointed: frozenset[int], batch: int) -> StepTemplate | None:
    """The setup's template for micro-batch ``batch`` (at ``tr``'s sequence length) when it is
    compiled; None otherwise (nothing is compiled here)."""
    if not _USE_TEMPLATES:
        return None
    key = setup_key(model, tr, device, checkpointed)
    key = (*key[:-1], domain_of(batch, tr.sequence_length))
    try:
        return _TEMPLATES.get(key)
    except TypeError:
        return None


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
    from planner.pipeline_replays import clear_classes

    with _LOCK:
        _SIM_CACHE.clear()
        _TEMPLATES.clear()
        _SEEN.clear()
        _MEMO.clear()
    clear_classes()
