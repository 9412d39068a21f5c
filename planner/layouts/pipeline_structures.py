"""Pipeline rank structure templates on the request path: compiled off it, one per structure.

As for the single-device and data-parallel structures (planner/step/structures.py): the first
estimate of a pipeline rank on a structure (planner/layouts/pipeline_structure.py: the structure,
the schedule's name, stage and rank counts, and the rank's shortened lists with its stages'
roles; neither the model's dimensions nor the micro-batch count) replays, and queues the
structure's compile on the structure thread ("sync" mode: compiled in the request); once it is
done, the rank of any model, micro-batch count and rank of that structure is evaluated, not
replayed. A model the compiled variants' guards do not admit is replayed and queues one more
variant (up to ``MAX_VARIANTS``). A compile that fails (``Undecided``, ``TypeError``: a size the
program cannot take symbolically, replays that are not affine) leaves the structure on the
replay, which is the answer anyway. ``structure_mode("off")`` turns this off with the others.
"""

from __future__ import annotations

import operator

from planner.catalog.specs import ActivationCheckpointing, TrainingSpec
from planner.layouts.pipeline_structure import compile_pipeline_structure, rank_lists
from planner.machine import cache
from planner.machine.cache import _LOCK, _LOSS_FIELDS, _NESTED, _SIZES, _put
from planner.machine.deadline import BackgroundLimit, WorkLimitExceeded, work_limit
from planner.machine.symbolic import Undecided
from planner.step import structures
from planner.step.structure import structure_of

__all__ = ["COUNTS", "estimate", "structure_key"]

MAX_VARIANTS = 4
_MAX = 1024
_WORK_LIMIT_S = 20.0
_STRUCTURES: dict[tuple, list] = {}  # key -> [attempts, [templates]]
# how many pipeline rank structures were compiled and how many ranks were evaluated from one
COUNTS = {"compiles": 0, "evaluated": 0}

# the training fields a replay depends on but the sizes and the micro-batch count (the
# schedule's, in the key through the shortened lists)
_FIELDS = operator.itemgetter(*(f for f in TrainingSpec.model_fields
                                if f not in _SIZES and f not in _NESTED
                                and f != "gradient_accumulation_steps"))
_AC_FIELDS = operator.itemgetter(*ActivationCheckpointing.model_fields)


def structure_key(model, tr: TrainingSpec, schedule, device: str, dom, signature) -> tuple:
    """Everything a pipeline rank's replay depends on besides the model's dimensions, the
    sizes, the micro-batch count and the rank's name; hashable (a list inside the specs: keyed
    by JSON)."""
    d = tr.__dict__
    key = (model.family, model.num_layers, model.tie_embeddings, model.architecture_known,
           model.model_type, _FIELDS(d) + _LOSS_FIELDS(d["loss"].__dict__),
           _AC_FIELDS(d["activation_checkpointing"].__dict__),
           d["lora"], d["precision_overrides"], device, schedule.name, schedule.num_stages,
           schedule.num_ranks, dom, signature)
    try:
        hash(key)
    except TypeError:
        key = (*key[:5], tr.model_dump_json(exclude={*_SIZES, "gradient_accumulation_steps"}),
               *key[9:])
    return key


def estimate(model, tr: TrainingSpec, schedule, device: str, rank: int):
    """The rank's StagePeak from its structure's template when that is compiled and admits the
    model; otherwise None, and the structure's compile is queued (or, in "sync" mode, run
    here: the answer then comes from it)."""
    st = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    if st is None:
        return None
    dom, names, values = st
    lists = rank_lists(schedule, rank, model)
    key = structure_key(model, tr, schedule, device, dom, lists.signature)
    full = (*values, *lists.dropped)
    known = _STRUCTURES.get(key)
    if known is not None:
        for tpl in known[1]:
            if tpl.admits is None or tpl.admits(*full):
                COUNTS["evaluated"] += 1
                return tpl.stage_peak(rank, _stages(schedule, rank), full)
        if known[0] >= MAX_VARIANTS:
            return None
    gen = structures._GENERATION[0]

    def compile_():
        return _compile(model, tr, schedule, device, rank, names, dom[0], values, lists, key,
                        gen)
    if structures._STRUCTURE_MODE == "sync":
        tpl = compile_()
        if tpl is None:
            return None
        COUNTS["evaluated"] += 1
        return tpl.stage_peak(rank, _stages(schedule, rank), full)
    structures.submit(("pipeline", key, gen), compile_)
    return None


def _stages(schedule, rank: int) -> list[int]:
    return [s for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == rank]


def _compile(model, tr, schedule, device, rank, names, half, values, lists, key, gen):
    """Compile the structure's template at this model and rank; recorded either way (the
    template, or one more attempt)."""
    COUNTS["compiles"] += 1
    try:
        with work_limit(BackgroundLimit(_WORK_LIMIT_S)):
            # the layout's compiles share their kinds' records: the key but the lists'
            # signature (structure_key's last field)
            tpl = compile_pipeline_structure(model, tr, schedule, rank, device, names, half,
                                             values, lists, layout=key[:-1])
    except (Undecided, WorkLimitExceeded, Exception):  # noqa: BLE001
        # a size the program cannot take symbolically (TypeError, ...) included: the
        # structure stays on the replay, which is the answer anyway
        tpl = None
    if gen == structures._GENERATION[0]:
        known = _STRUCTURES.get(key)
        if known is None:
            known = [0, []]
            _put(_STRUCTURES, key, known, _MAX)
        with _LOCK:
            known[0] += 1
            if tpl is not None:
                known[1].append(tpl)
    return tpl


def _clear() -> None:
    with _LOCK:
        _STRUCTURES.clear()


cache.on_clear(_clear)
