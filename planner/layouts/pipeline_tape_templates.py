"""Taped layout templates on the request path: a new model of a known long pipeline evaluated.

A long pipeline rank is taped (planner/layouts/pipeline_tape.py): its records and the step
outside its loop are replayed for every new model, tens of milliseconds a layout. Once a layout
(the structure, the schedule, its stage, rank and micro-batch counts) has been estimated for a
second model (its dimensions besides the micro-batch size and sequence length: a sweep over
models, not a fit search over batch sizes), its ranks are compiled with the sizes symbolic
(planner/layouts/pipeline_tape_template.py) on the structure thread (``structure_mode("sync")``:
in the request, at the first model), and from then on every model of the layout whose sizes its
guards admit is a few generated functions' evaluation per rank. GPipe's and 1F1B's long ranks
(taped only past 64 ranks; below, their few shortened lists compile into rank structures)
take the taped template first too: a new model's evaluation of 64 rank structures costs more
than of their taped templates. Layouts of more than
``MAX_RANKS`` ranks are not compiled (a function per rank and window; the tape answers them in
well under the time limit). A compile that fails leaves the layout on the tape, which is the
answer anyway.
"""

from __future__ import annotations

from planner.layouts.pipeline_structures import structure_key
from planner.layouts.pipeline_tape_template import TapedTemplate, compile_taped
from planner.machine import cache
from planner.machine.cache import _LOCK, _put
from planner.machine.deadline import BackgroundLimit, WorkLimitExceeded, work_limit
from planner.machine.symbolic import Undecided
from planner.step import structures
from planner.step.structure import structure_of

__all__ = ["COUNTS", "MAX_RANKS", "estimate"]

MAX_RANKS = 64
MAX_VARIANTS = 4
_MAX = 32  # layouts kept (a compiled one: 1-3 MiB, a generated function per rank and window)
_WORK_LIMIT_S = 20.0
_SIZES = ("B", "T")  # the sizes a fit search varies: not a new model
# key -> [models seen (their other sizes), attempts, [templates]]
_LAYOUTS: dict[tuple, list] = {}
# compiles, ranks evaluated from one, and each compile's seconds per rank (the last few)
COUNTS: dict = {"compiles": 0, "evaluated": 0, "rank_seconds": []}


def estimate(model, tr, schedule, device: str, rank: int):
    """The rank's StagePeak from its layout's taped template when that is compiled and admits
    the model; otherwise None (the compile queued where the layout meets its second model, or
    in "sync" mode run here). The template found for the last setup is kept: every rank of an
    estimate asks with the same objects."""
    last = _LAST[0]
    if (last is not None and last[0] is model and last[1] is tr and last[2] is schedule
            and last[3] == device):
        tpl, values = last[4], last[5]
        got = tpl.stage_peak(rank, values)
        if got is not None:
            COUNTS["evaluated"] += 1
        return got
    if not structures.enabled() or schedule.num_ranks > MAX_RANKS:
        return None
    st = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    if st is None:
        return None
    dom, names, values = st
    key = structure_key(model, tr, schedule, device, dom, ("tape", schedule.microbatches))
    known = _LAYOUTS.get(key)
    if known is None:
        known = [set(), 0, []]
        _put(_LAYOUTS, key, known, _MAX)
    for tpl in known[2]:
        if tpl.admits is None or tpl.admits(*values):
            _LAST[0] = (model, tr, schedule, device, tpl, values)
            got = tpl.stage_peak(rank, values)
            if got is not None:
                COUNTS["evaluated"] += 1
            return got
    if known[1] >= MAX_VARIANTS:
        return None
    known[0].add(tuple(v for n, v in zip(names, values) if n not in _SIZES))
    gen = structures._GENERATION[0]

    def compile_():
        return _compile(model, tr, schedule, device, names, dom[0], values, known, gen)
    if structures._STRUCTURE_MODE == "sync":
        tpl = compile_()
        return None if tpl is None else tpl.stage_peak(rank, values)
    if len(known[0]) >= 2:
        structures.submit(("tape", key, gen), compile_)
    return None


# the last setup's (model, training, schedule, device, template, sizes)
_LAST: list = [None]


def _compile(model, tr, schedule, device, names, half, values, known, gen
             ) -> TapedTemplate | None:
    COUNTS["compiles"] += 1
    try:
        with work_limit(BackgroundLimit(_WORK_LIMIT_S)):
            tpl = compile_taped(model, tr, schedule, device, names, half, values)
    except (Undecided, WorkLimitExceeded, Exception):  # noqa: BLE001
        tpl = None  # (a size the program cannot take symbolically included: the tape answers)
    if tpl is not None:
        spent = COUNTS["rank_seconds"]
        spent.extend(tpl.seconds)
        del spent[:-4096]
    if gen == structures._GENERATION[0]:
        with _LOCK:
            known[1] += 1
            if tpl is not None:
                known[2].append(tpl)
    return tpl


def _clear() -> None:
    with _LOCK:
        _LAYOUTS.clear()
        _LAST[0] = None


cache.on_clear(_clear)
