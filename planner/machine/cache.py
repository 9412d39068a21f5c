"""Memoised replays and templates, per setup: what every replayed answer goes through.

A *setup* is everything a replay depends on but the micro-batch size and the sequence length
(``setup_key``: the specs' fields as plain tuples, the template domain last). Per setup:

- a concrete replay's result is memoised (``_SIM_CACHE``), for exact repeats;
- when the setup comes back with a second size, its template is compiled (a replay with the two
  sizes symbolic, ``planner/machine/recording.py``): a one-off estimate costs one replay, a sweep
  one compile and then microseconds per size; None marks a setup found size-dependent (always
  replayed concretely). A caller that asks each setup for few sizes raises that count with
  ``compile_after`` (a compile costs about three replays of the same step);
- ``setup_memo`` keeps size-independent per-setup results (per-rank model states, partitions).

The caches are bounded (oldest entry dropped) and their writes locked (estimates run in a thread
pool). ``replay_only()`` turns templates off (tests and benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import threading

from planner.catalog.loss_specs import LossSpec
from planner.catalog.specs import ActivationCheckpointing, ParallelSpec, ResolvedModel, TrainingSpec
from planner.machine import peak_pruning
from planner.machine.recording import domain_of
from planner.machine.symbolic import Undecided

_SIM_CACHE: dict[tuple, object] = {}  # replayed results (StepPeaks, ...)
_SIM_CACHE_MAX = 512
_TEMPLATES: dict[tuple, object] = {}  # compiled templates; None: found size-dependent
_TEMPLATES_MAX = 256
_MEMO_MAX = 8192  # per-setup results (model states, partitions): small, and a plan search reads thousands
_SEEN: dict[tuple, int] = {}
_SEEN_MAX = 4096
_SIZES = ("micro_batch_size", "sequence_length")
_NESTED = ("activation_checkpointing", "lora", "precision_overrides", "loss")
_SETUP_FIELDS = operator.itemgetter(*(f for f in TrainingSpec.model_fields
                                      if f not in _SIZES and f not in _NESTED))
_AC_FIELDS = operator.itemgetter(*ActivationCheckpointing.model_fields)
_LOSS_FIELDS = operator.itemgetter(*LossSpec.model_fields)
_MODEL_FIELDS = operator.itemgetter(*ResolvedModel.model_fields)
_PAR_FIELDS = operator.itemgetter(*ParallelSpec.model_fields)
_LOCK = threading.Lock()  # cache writes (sync routes run in a thread pool)
USE_TEMPLATES = True
# the distinct size at which a setup's template is compiled (per context: a request's thread)
_COMPILE_AFTER: contextvars.ContextVar[int] = contextvars.ContextVar("compile_after", default=2)


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
    data-parallel rank's replay (planner/layouts/data_parallel.py)."""
    d = tr.__dict__
    # (the loss spec as its fields: hashing and comparing a frozen model costs microseconds)
    return (_MODEL_FIELDS(model.__dict__), _SETUP_FIELDS(d) + _LOSS_FIELDS(d["loss"].__dict__),
            _AC_FIELDS(d["activation_checkpointing"].__dict__), d["lora"],
            d["precision_overrides"], device, checkpointed,
            None if par is None else _PAR_FIELDS(par.__dict__), rank,
            domain_of(tr.micro_batch_size, tr.sequence_length))


def _json_key(key: tuple, tr: TrainingSpec) -> tuple:
    return (key[0], tr.model_dump_json(exclude=set(_SIZES)), *key[5:])  # the rest hashes


def cached(skey: tuple, tr: TrainingSpec, replay, compile_, evaluate):
    """``replay()``'s result for ``skey`` (domain last) at tr's sizes: evaluated from the
    compiled template (``compile_(domain)``, ``evaluate(template, B, T)``) when there is one,
    compiled when the setup comes back with another size, else replayed (memoised)."""
    b, t = tr.micro_batch_size, tr.sequence_length
    try:  # (hashed even with templates off: an unhashable key goes to its JSON form)
        tpl = _TEMPLATES.get(skey) if USE_TEMPLATES else hash(skey) and None
    except TypeError:  # a list inside the specs
        skey = _json_key(skey, tr)
        tpl = _TEMPLATES.get(skey) if USE_TEMPLATES else None
    if tpl is not None:
        return evaluate(tpl, b, t)
    key = (skey, b, t)
    hit = _SIM_CACHE.get(key)
    if hit is not None:
        return hit
    if USE_TEMPLATES and skey not in _TEMPLATES:  # None there: found size-dependent
        with _LOCK:
            if len(_SEEN) >= _SEEN_MAX:
                _SEEN.clear()
            seen = _SEEN[skey] = _SEEN.get(skey, 0) + 1
        if seen >= _COMPILE_AFTER.get():
            tpl = compile_once(skey, compile_)
            if tpl is not None:
                return evaluate(tpl, b, t)
    hit = replay()
    COUNTS["replays"] += 1
    _put(_SIM_CACHE, key, hit, _SIM_CACHE_MAX)
    return hit


# how many replays and template compiles ``cached`` has run (tests read the difference)
COUNTS = {"replays": 0, "compiles": 0}


def compile_once(skey: tuple, compile_):
    COUNTS["compiles"] += 1
    try:
        tpl = compile_(skey[-1])
    except (Undecided, TypeError):
        tpl = None
    _put(_TEMPLATES, skey, tpl, _TEMPLATES_MAX)
    _SEEN.pop(skey, None)
    return tpl


_MEMO: dict[tuple, object] = {}


def setup_memo(fn, model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec):
    """``fn(model, tr, par)`` memoised per setup, for functions that do not depend on the
    micro-batch size, the sequence length or activation checkpointing (per-rank model states,
    ZeRO-1 partitions)."""
    try:
        k = setup_key(model, tr, "", frozenset(), par)
        key = (fn, k[0], k[1], *k[3:-1])  # k[2]: the checkpointing fields
        hit = _MEMO.get(key)
    except TypeError:  # a list inside the specs: not memoised
        return fn(model, tr, par)
    if hit is None:
        hit = fn(model, tr, par)
        _put(_MEMO, key, hit, _MEMO_MAX)
    return hit


_JSON_MEMO: dict[tuple, object] = {}


def json_memo(fn, *specs):
    """``fn(*specs)`` memoised by the specs' JSON, for pure functions of specs that do not hash
    (a list inside: LoRA target modules)."""
    key = (fn, *(s.model_dump_json() for s in specs))
    hit = _JSON_MEMO.get(key)
    if hit is None:
        hit = fn(*specs)
        _put(_JSON_MEMO, key, hit, _MEMO_MAX)
    return hit


@contextlib.contextmanager
def compile_after(sizes: int):
    """Inside, a setup's template is compiled when the setup meets its ``sizes``-th distinct
    size (2 outside). For callers that ask each setup for only a few sizes (the plan search): a
    compile costs about three replays, so one that serves a single size more is a loss. Answers
    are the same either way (a template equals the replay)."""
    token = _COMPILE_AFTER.set(max(2, sizes))
    try:
        yield
    finally:
        _COMPILE_AFTER.reset(token)


@contextlib.contextmanager
def compile_first():
    """Inside, a setup's template is compiled the first time the setup is met, for a caller
    about to ask the same setup for other sizes (the largest fitting micro-batch after an
    estimate): one compile instead of a replay and then a compile. Answers are the same."""
    token = _COMPILE_AFTER.set(1)
    try:
        yield
    finally:
        _COMPILE_AFTER.reset(token)


def compiling_first() -> bool:
    """Inside ``compile_first``."""
    return _COMPILE_AFTER.get() <= 1


@contextlib.contextmanager
def replay_only():
    """Estimates inside use the op-by-op replay alone (tests and benchmarks compare the two;
    not thread-safe: it switches a module setting)."""
    global USE_TEMPLATES
    was, USE_TEMPLATES = USE_TEMPLATES, False
    try:
        yield
    finally:
        USE_TEMPLATES = was


_ON_CLEAR: list = []


def on_clear(fn) -> None:
    """Have ``clear()`` call ``fn()`` too (caches kept by the layers above: shared rank replays)."""
    _ON_CLEAR.append(fn)


on_clear(peak_pruning.clear)  # peak rows selected per window's contents


def clear() -> None:
    with _LOCK:
        _SIM_CACHE.clear()
        _TEMPLATES.clear()
        _SEEN.clear()
        _MEMO.clear()
        _JSON_MEMO.clear()
    for fn in _ON_CLEAR:
        fn()


def template(key: tuple):
    """The compiled template of ``key`` (a ``setup_key``), or None (not compiled, found
    size-dependent, templates off, or a key that does not hash)."""
    if not USE_TEMPLATES:
        return None
    try:
        return _TEMPLATES.get(key)
    except TypeError:
        return None
