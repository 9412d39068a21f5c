"""POST /v1/memory's answers, memoised per request: the same request again is a dict lookup.

An answer of the reference (or megatron) implementation is a pure function of the request and
of the call's options (device, notes, the allocator replay): every figure comes from a replay or
its template, which are equal to the byte, and a refusal is raised, never kept. So an answer is
kept by its request, flattened into a tuple of the specs' fields (``answer_key``: hashing and
comparing the frozen specs themselves costs microseconds), and given again to the same request.
It is kept the second time its request comes: a sweep's requests, each asked once, leave only
their hashes behind.
Not kept: implementation 'transformers' (its searches stop at the request's work limit, which
the notes then say), a request with a list inside (explicit checkpointed blocks, LoRA target
modules: it does not hash), and answers with long notes (a deep pipeline's per-rank list).

The key also holds the modes that decide *how* an answer is computed (templates on or off,
structure templates), so the tests that compare the two ways compute each. The memo is bounded
(oldest answer dropped) and cleared with the step caches. An answer is shared between the
requests that ask it: it is frozen, and its lists are read, never changed.
"""

from __future__ import annotations

import operator
import threading

from planner.catalog.loss_specs import LossSpec
from planner.catalog.specs import (
    ActivationCheckpointing,
    HardwareSpec,
    MemoryRequest,
    MemoryResult,
    ModelSpec,
    ParallelSpec,
    TrainingSpec,
)
from planner.machine import cache
from planner.step import structures

__all__ = ["answer_key", "keep", "known"]

ANSWERS_MAX = 2048
SEEN_MAX = 16384
NOTES_MAX = 8192  # characters of notes an answer kept may have
_ANSWERS: dict[int, tuple[tuple, MemoryResult]] = {}  # key's hash -> (key, answer)
_SEEN: set[int] = set()  # hashes of the keys answered once
_LOCK = threading.Lock()
_SIZES = ("micro_batch_size", "sequence_length")
_NESTED = ("activation_checkpointing", "loss")
_MODEL = operator.itemgetter(*ModelSpec.model_fields)
_TRAINING = operator.itemgetter(*(f for f in TrainingSpec.model_fields
                                  if f not in _NESTED and f not in _SIZES))
_AC = operator.itemgetter(*ActivationCheckpointing.model_fields)
_LOSS = operator.itemgetter(*LossSpec.model_fields)
_PAR = operator.itemgetter(*ParallelSpec.model_fields)
_HARDWARE = operator.itemgetter(*HardwareSpec.model_fields)


def answer_key(req: MemoryRequest, device: str, explain: bool, allocator: bool) -> tuple | None:
    """(the setup: the request but its two sizes, and the options; the micro-batch size; the
    sequence length), as plain values; None when the answer is not kept (implementation
    'transformers')."""
    tr = req.training.__dict__
    if tr["implementation"] == "transformers":
        return None
    hw = req.hardware
    return ((_MODEL(req.model.__dict__), _TRAINING(tr),
             _AC(tr["activation_checkpointing"].__dict__), _LOSS(tr["loss"].__dict__),
             _PAR(req.parallelism.__dict__), None if hw is None else _HARDWARE(hw.__dict__),
             device, explain, allocator, cache.USE_TEMPLATES, structures.mode()),
            tr["micro_batch_size"], tr["sequence_length"])


def known(key: tuple | None) -> tuple[int | None, MemoryResult | None]:
    """(the key's hash, the answer kept for it): (None, None) for a key that is not kept
    (None, or a list inside the request: it does not hash)."""
    if key is None:
        return None, None
    try:
        h = hash(key)
    except TypeError:  # a list inside the request
        return None, None
    hit = _ANSWERS.get(h)
    return h, hit[1] if hit is not None and hit[0] == key else None


def keep(h: int | None, key: tuple, result: MemoryResult) -> None:
    """Keep ``result`` as the answer of ``key`` (hash ``h``) when the key comes the second
    time: a request asked once (a sweep over sizes) costs a hash in a set, not a kept answer
    (holding thousands of answers alive slows every later estimate down)."""
    if h is None or sum(map(len, result.notes)) > NOTES_MAX:
        return
    if h not in _SEEN:
        if len(_SEEN) >= SEEN_MAX:
            _SEEN.clear()
        _SEEN.add(h)
        return
    with _LOCK:
        _ANSWERS[h] = (key, result)
        if len(_ANSWERS) > ANSWERS_MAX:
            _ANSWERS.pop(next(iter(_ANSWERS)), None)


def clear() -> None:
    with _LOCK:
        _ANSWERS.clear()
        _SEEN.clear()


cache.on_clear(clear)
