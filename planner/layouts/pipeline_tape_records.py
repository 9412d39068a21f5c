"""The records a pipeline rank's taped loop (planner/layouts/pipeline_tape.py) is made from.

A kind's record (``planner/layouts/pipeline_records.py``) is what a replay of one action of the
kind did, relative to where it started, so it does not depend on the rank's other actions or
micro-batches. ``record_list`` keeps a rank's list to the micro-batches of each kind's first
two actions on each stage (and to one stage per role, ``kind_roles``:
``pipeline_replays.stage_roles`` with a stage's place on the rank told only as first or not; a
stage's actions take nothing from the rank's other stages but its receive buffers);
``records`` replays it for a rank that reads a kind not verified yet that no rank replayed
before read, and verifies each kind by two occurrences that agree: its two in a step, or the
first step's and the second's (a step's first forward and backward of a stage occur once a
step).
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable
from planner.layouts.pipeline_codes import NAMES, decoded_columns
from planner.layouts.pipeline_machines import TraceMachine
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_replays import stage_roles
from planner.machine import cache
from planner.machine.deadline import check as check_work_limit

__all__ = ["as_keyed", "clear", "kind_roles", "needed", "record_kinds", "record_list", "records",
           "specs_key"]


def as_keyed(kind, stage):
    """Kind + 4 x stage of each action as ``ActionMemo`` keys it (on the first stage an I does
    nothing, -1 here, and a W is a full backward, a B)."""
    kind = kind.copy()
    kind[(stage == 0) & (kind == 3)] = 1
    tok = kind + 4 * stage
    tok[(stage == 0) & (kind == 2)] = -1
    return tok


_RECORDS: dict = {}  # (setup, layout, micro-batch count) -> verified ActionMemo entries
_RECORDS_MAX = 64


def clear() -> None:
    _RECORDS.clear()


cache.on_clear(clear)


def record_list(schedule, rank: int, roles: dict | None = None) -> tuple[list, int]:
    """(actions, micro-batch count) of the rank's list kept to the micro-batches of each kind's
    first two actions on each stage (as ``ActionMemo`` keys them: the step's first, a kind of
    its own, and one more), in order (the step's first backward of a stage, whichever kind, is
    the one that makes its gradients). ``roles`` (stage -> role): the actions of each role's
    first stage alone (a stage's actions take nothing from the rank's other stages but its
    receive buffers, made with the program). The kept micro-batches are numbered in order; the
    actions keep theirs."""
    kind, stage, mb = decoded_columns(schedule, rank)
    if roles is not None:
        firsts: dict = {}
        for st in sorted(roles):
            firsts.setdefault(roles[st], st)
        mine = np.isin(stage, np.array(sorted(firsts.values()), dtype=np.int64))
        kind, stage, mb = kind[mine], stage[mine], mb[mine]
    tok = as_keyed(kind, stage)
    keep: set = set()
    for twice in (False, True):  # each kind's first action, then its second
        live = tok >= 0
        _, at = np.unique(tok[live], return_index=True)
        keep.update(mb[live][at].tolist())
        if not twice:
            tok = tok.copy()
            tok[np.flatnonzero(live)[at]] = -1
    kept = np.isin(mb, np.fromiter(keep, dtype=np.int64, count=len(keep)))
    new = {j: i for i, j in enumerate(sorted(keep))}
    return [(NAMES[k], st, new[j], 0) for k, st, j in
            zip(kind[kept].tolist(), stage[kept].tolist(), mb[kept].tolist())], len(new)


def kind_roles(schedule, rank: int, model) -> dict[int, tuple]:
    """What a stage's actions depend on (``pipeline_replays.stage_roles``) with its place on
    the rank told only as first or not: a rank's later stages of one layer count and
    neighbours (the interleaved middle) share their kinds' records."""
    return {st: (role[0] == 0, *role[1:])
            for st, role in stage_roles(schedule, rank, model).items()}


def needed(per) -> set:
    """The ``ActionMemo`` keys of a rank's kinds, ``per``: (kind 0-3, role, first) each, in
    both steps."""
    return {(NAMES[k] + ("0" if f else ""), role, step) for k, role, f in per
            for step in (1, 2)}


def records(model, training, schedule, device: str, rank: int, needed: set) -> dict | None:
    """The kinds' records of the setup's ranks (the module docstring): ``rank``'s list kept to
    a few micro-batches is replayed where a kind it reads (``needed``: ``ActionMemo`` keys) is
    not verified yet and no rank replayed before read it (a kind that list leaves unverified
    leaves the rank to the replay); None where a replay does not compose."""
    key = (*specs_key(model, training), device, schedule.name, schedule.num_stages,
           schedule.num_ranks, schedule.microbatches)
    got = _RECORDS.get(key, ())
    if got is None:
        return None
    if got and (needed <= got[1] or all(
            (e := got[0].get(k)) is not None and e.verified for k in needed)):
        return got[0]
    entries, tried = got or ({}, set())
    try:
        record_kinds(model, training, schedule, device, rank, kind_roles(schedule, rank, model),
                     entries, TraceMachine())
    except Unmemoizable:
        entries = None
    if len(_RECORDS) >= _RECORDS_MAX and key not in _RECORDS:
        _RECORDS.pop(next(iter(_RECORDS)), None)
    _RECORDS[key] = None if entries is None else (entries, tried | needed)
    return entries


def record_kinds(model, training, schedule, device: str, rank: int, roles: dict,
                 entries: dict, machine, sizes=None) -> None:
    """Replay the rank's kept list (``record_list``) on ``machine`` (the trace machine, or
    the recording machine with polynomial ``sizes``: a taped template's), its kinds recorded
    into ``entries`` and verified across the two steps; raises ``Unmemoizable`` where it does
    not compose."""
    check_work_limit()
    items, mb = record_list(schedule, rank, roles)
    prog = PipelineRankProgram(model, training, schedule, rank, device=device, machine=machine,
                               sizes=sizes, actions=items, microbatches=mb,
                               compress_blocks=True)
    prog.memo = ActionMemo(entries, roles)
    if not prog.memo.applies(prog):
        raise Unmemoizable("not composed")
    prog.step_windows()  # (ActionMemo verifies a step's record by the last step's too)


def specs_key(model, training) -> tuple:
    """The specs' JSON (for keys), kept for the last few pairs: every rank of an estimate asks
    for it with the same two objects."""
    got = _SPECS.get((id(model), id(training)))
    if got is None or got[0] is not model or got[1] is not training:
        if len(_SPECS) >= 8:
            _SPECS.pop(next(iter(_SPECS)))
        got = _SPECS[id(model), id(training)] = (model, training, (
            model.model_dump_json(), training.model_dump_json()))
    return got[2]


_SPECS: dict[tuple, tuple] = {}
