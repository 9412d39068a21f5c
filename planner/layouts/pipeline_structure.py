"""Structure templates of a pipeline rank: the model's dimensions and the micro-batch count free.

A pipeline rank's step (planner/layouts/pipeline_memory.py: ``PipelineRankProgram``) allocates,
like the single-device step, sizes that are polynomials in the model's dimensions
(planner/step/structure.py: ``B``, ``T``, ``nkv``, ``g``, ``hd``/``hh``, ``f``, ``V``, ``P``). Its
estimate replays shortened action lists (planner/layouts/pipeline_periods.py: the middle periods
of the list's periodic runs left out) and extrapolates every instant's live bytes as
``v0 + sum_k N_k·s_k`` in the periods ``N_k`` left out in each direction k
(planner/layouts/pipeline_replays.py). Here the same shortened lists are replayed once with the
dimensions symbolic (``MPoly`` rows over the sizes), and the extrapolation is kept symbolic too:
``N_k`` is a variable ``n<k>`` (at least 0) of the template, so every instant's live bytes are a
polynomial in the sizes and the ``N_k``, and each window's peak a set of candidate rows
(planner/machine/peak_candidates.py), evaluated per model.

The template's key is what the replays depend on besides those: the structure (family, block
count, the training options, the device, the domain of sizes of 1), the schedule's name, stage
and rank counts, and the shortened lists themselves with each stage named by its role
(``stage_roles``: place on the rank, first or last stage, layer count, neighbours on the rank).
The micro-batch count m is not in the key: two setups whose shortened lists are alike differ only
in how many periods each direction stands in for, which the extrapolation covers (the same
argument that shares replays between ranks, ``_CLASSES``); so one compile serves every m (and
every rank of a class) with those lists. Those lists, for a count alike two searched counts of
the rank, are derived rather than searched (``rank_lists``: planner/layouts/pipeline_families.py),
in a few array operations per rank, and so are a rank's from two other ranks' of the schedule
whose lists are alike (``_of_other_ranks``: the middle ranks of a deep pipeline); interleaved 1F1B
below nine rounds of micro-batches takes its whole list (``WHOLE_BELOW_ROUNDS``: its shortened
lists are the count's own or still searched). The replays compose the repeated actions per kind
(planner/layouts/pipeline_actions.py), from one record per kind shared by the lists. What the
domain leaves open is answered at the model being compiled and kept as a guard (``admits``), as
for the single-device structures. A size the program cannot take symbolically, or replays that
do not have the affine form, raise ``Undecided``/``TypeError``: the caller replays (never a
wrong answer).
tests/test_pipeline_structure.py holds the answers equal to the full replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable
from planner.layouts.pipeline_families import (
    columns,
    derive,
    derived_entry,
    known,
    record,
)
from planner.layouts.pipeline_kind_records import SharedKinds
from planner.layouts.pipeline_machines import _Recording
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_replays import _outside, stage_roles
from planner.layouts.pipeline_runs import Actions
from planner.layouts.pipeline_schedules import rank_stages
from planner.machine.cache import _put
from planner.machine.deadline import check as check_work_limit
from planner.machine.peak_candidates import Candidates, candidates
from planner.machine.symbolic import Undecided
from planner.step.structure import (
    _guard_fn,
    _natural,
    _shift_matrix,
    _symbolic_sizes,
    _to_shifted,
)

__all__ = ["PipelineStructureTemplate", "RankLists", "compile_pipeline_structure", "rank_lists"]


@dataclass
class RankLists:
    """A rank's shortened lists: ``signature`` (the lists with the stages' roles: the
    template's key), ``dropped`` (the periods each direction leaves out: the template's ``n``
    variables) and ``lists`` (what a compile replays)."""

    signature: tuple
    dropped: tuple[int, ...]
    lists: list


class Signature(tuple):
    """A rank's shortened lists with the stages' roles: a tuple whose hash is computed once (it
    keys the rank's structure on every estimate: thousands of small tuples)."""

    def __hash__(self) -> int:
        h = self.__dict__.get("hash")
        if h is None:
            h = self.__dict__["hash"] = tuple.__hash__(self)
        return h


_LISTS: dict[tuple, RankLists] = {}
_LISTS_MAX = 4096
# per (schedule, rank, block count): the searched micro-batch counts (pipeline_families.Known)
_KNOWN: dict[tuple, dict] = {}
_KNOWN_MAX = 1024
COUNTS = {"searched": 0, "derived": 0, "ranks": 0, "whole": 0}


def rank_lists(schedule, rank: int, model) -> RankLists:
    """The rank's shortened lists (memoised per schedule, rank and block count: they depend on
    nothing else); the full list as the one list where no periodic run is found. A micro-batch
    count not seen is derived from two searched ones of the rank whose lists are alike
    (planner/layouts/pipeline_families.py) where that holds on its list, searched otherwise."""
    layout = (schedule.name, schedule.num_stages, schedule.num_ranks,
              tuple(schedule.stage_to_rank), rank, model.num_layers)
    key = (*layout, schedule.microbatches)
    hit = _LISTS.get(key)
    if hit is not None:
        return hit
    history = _KNOWN.get(layout)
    if history is None:
        history = {}
        _put(_KNOWN, layout, history, _KNOWN_MAX)
    cols = []

    def cols_of():
        if not cols:
            cols.append(columns(schedule, rank))
        return cols[0]
    got = derive(history, schedule.microbatches, cols_of) if len(history) >= 2 else None
    whole = _whole(schedule)
    ranks = None if whole else _rank_history(schedule, model)
    if got is not None:
        COUNTS["derived"] += 1
        found, dropped, how = got
        hit = RankLists(found.signature, dropped, found.lists)
        record(history, derived_entry(hit, how))  # (a member of a's family)
    elif ranks is not None and (hit := _of_other_ranks(schedule, rank, model, ranks)):
        COUNTS["ranks"] += 1
    else:
        groups, lists = [], None
        if not whole:  # (searched on the schedule's decoded columns: no list of tuples)
            tok, mb, flag = cols_of()
            groups, lists = shortened_lists(Actions(tok & 3, tok >> 2, mb, flag))
        COUNTS["whole" if whole else "searched"] += 1
        if not groups:
            lists = [(rank_actions(schedule, rank), schedule.microbatches)]
        role = stage_roles(schedule, rank, model).get
        sig = Signature((mb, tuple([(k, role(st), j, f) for k, st, j, f in items]))
                        for items, mb in lists)
        hit = RankLists(sig, tuple(g[0].dropped for g in groups), lists)
        if not whole:
            record(history, known(schedule.microbatches, hit, groups, cols_of()))
            record(ranks, known(rank, hit, groups, _local_columns(schedule, rank)))
    _put(_LISTS, key, hit, _LISTS_MAX)  # (the structure thread's compiles read them too)
    return hit


# ---- a rank's lists from two other ranks' ----------------------------------------------------
# Within a schedule, ranks whose lists are alike up to their stages' names (the middle ranks of
# a deep pipeline) have runs whose starts and repetitions are affine in the rank, as a rank's
# are in the micro-batch count: the same derivation (planner/layouts/pipeline_families.py) with
# the rank in the count's place, on the actions with each stage numbered by its place on the
# rank, for a rank whose stages' roles are those of the ranks it derives from.
_RANKS_KNOWN: dict[tuple, dict] = {}  # (schedule, micro-batch count, block count) -> {rank: Known}
_RANKS_KNOWN_MAX = 64


def _rank_history(schedule, model) -> dict:
    key = (schedule.name, schedule.num_stages, schedule.num_ranks,
           tuple(schedule.stage_to_rank), schedule.microbatches, model.num_layers)
    got = _RANKS_KNOWN.get(key)
    if got is None:
        got = {}
        _put(_RANKS_KNOWN, key, got, _RANKS_KNOWN_MAX)
    return got


def _local_columns(schedule, rank: int):
    """The rank's action columns (``pipeline_families.columns``) with each stage numbered by
    its place on the rank."""
    tok, mb, flag = columns(schedule, rank)
    lut = np.zeros(schedule.num_stages, dtype=np.int64)
    mine = rank_stages(schedule)[rank]
    lut[mine] = np.arange(len(mine))
    return (tok & 3) + 4 * lut[tok >> 2], mb, flag


def _of_other_ranks(schedule, rank: int, model, ranks: dict) -> RankLists | None:
    """The rank's lists derived from two ranks' of its family whose stages have its stages'
    roles (their lists with the stages renamed; the same signature), checked on its own list;
    None where none applies."""
    if len(ranks) < 2:
        return None
    got = derive(ranks, rank, lambda: _local_columns(schedule, rank))
    if got is None:
        return None
    found, dropped, how = got
    a = how[0].m
    roles, mine = stage_roles(schedule, rank, model), rank_stages(schedule)[rank]
    theirs = stage_roles(schedule, a, model)
    if [roles[s] for s in mine] != [theirs[s] for s in rank_stages(schedule)[a]]:
        return None
    to = dict(zip(rank_stages(schedule)[a], mine))
    lists = [([(k, to.get(st, st), j, f) for k, st, j, f in items], mb)
             for items, mb in found.lists]
    hit = RankLists(found.signature, dropped, lists)
    record(ranks, derived_entry(hit, how))
    return hit


# Interleaved 1F1B below this many rounds of micro-batches (one per rank) takes its whole
# action list. Below about six rounds its shortened lists are the count's own
# (the steady state's rounds are too few to be one run, and the search groups their inner runs
# differently for each count), so neither a template nor the lists serve another count
# (planner/layouts/pipeline_families.py); up to eight rounds a third of the ranks still search.
# The whole list costs no search, compiles in one replay of composed actions, and evaluates as
# fast (pp 8 interleaved, 7-8 rounds: a new count's estimate 1.1-1.2 ms whole against 10-12 ms
# searched, a known one 0.18 ms against 0.26 ms; pp 32, 8 rounds: 17 ms against 202 ms).
WHOLE_BELOW_ROUNDS = 9


def _whole(schedule) -> bool:
    """Interleaved 1F1B below ``WHOLE_BELOW_ROUNDS`` rounds (its period is a round: pp·v
    forwards and backwards). The V shapes' periods are a few actions at any count: their lists
    are always searched (ZB-V pp 64 m 512: 420-450 actions a list against 3,072 whole)."""
    return (schedule.name == "interleaved-1f1b"
            and schedule.microbatches < WHOLE_BELOW_ROUNDS * schedule.num_ranks)


def forget_microbatches(m: int, name: str | None = None, ranks: int | None = None) -> None:
    """Drop the searched count ``m`` of every rank (of schedule ``name`` on ``ranks`` ranks,
    where given) and its memoised lists: as if never seen."""
    def of(key):
        return (name is None or key[0] == name) and (ranks is None or key[2] == ranks)
    for layout, history in list(_KNOWN.items()):
        if of(layout):
            history.pop(m, None)
    for key in [k for k in _LISTS if k[-1] == m and of(k)]:
        _LISTS.pop(key, None)
    for key in [k for k in _RANKS_KNOWN if k[4] == m and of(k)]:
        _RANKS_KNOWN.pop(key, None)  # (the count's ranks, each other's source)


@dataclass
class PipelineStructureTemplate:
    """A pipeline rank's two step windows (first step, steady step) with the sizes ``names``
    and the periods left out (``n0``, ``n1``, ...) free: ``evaluate(values)`` (the sizes, then
    the ``dropped`` periods) gives the windows' peaks."""

    names: tuple[str, ...]
    windows: list[Candidates]
    admits: object = None  # f(*values) -> bool, or None (no guard)

    def evaluate(self, values: tuple[int, ...]) -> list:
        return [c.best(*values) for c in self.windows]

    def stage_peak(self, rank: int, stages: list[int], values: tuple[int, ...]) -> StagePeak:
        return StagePeak(rank, stages, *self.evaluate(values))


def _replay(model, tr, schedule, rank, device, sizes, sp, items, mb, memo):
    """(marks outside the extra periods × categories × monomials, their monomials, the marks'
    (op, phase, window), the step windows) of one list replayed with symbolic sizes, its
    actions composed per kind where ``memo`` applies (planner/layouts/pipeline_actions.py)."""
    check_work_limit()
    m = _Recording()
    prog = PipelineRankProgram(model, tr, schedule, rank, device=device, machine=m, sizes=sizes,
                               actions=items, microbatches=mb, compress_blocks=True)
    if memo is not None and memo.applies(prog):
        prog.memo = memo
    wanted = prog.step_windows()
    m._flush()
    full, exps = _natural(m, sp)
    meta = [(mk[1], mk[2], mk[3]) for mk in m.marks]
    rows, meta = _outside(full, meta, m.cuts, wanted)
    return rows, exps, meta, wanted


def compile_pipeline_structure(model, tr, schedule, rank: int, device: str,
                               names: tuple[str, ...], half: bool, values: tuple[int, ...],
                               lists: RankLists, layout: tuple | None = None
                               ) -> PipelineStructureTemplate:
    """Replay the rank's shortened lists once with the sizes ``names`` symbolic (witness
    ``values``, a model of the structure) and extrapolate them symbolically; raises Undecided
    (or TypeError) when the replay depends on the sizes' values beyond the guards or the
    replays are not affine in the periods."""
    nd = len(lists.dropped)
    extra = tuple((f"n{k}", 0) for k in range(nd))
    sp, sizes = _symbolic_sizes(names, half, (*values, *lists.dropped), extra)
    # the lists' replays share one record per action kind (their sizes are of one space)
    memo = ActionMemo({}, stage_roles(schedule, rank, model))
    shared = None if layout is None else SharedKinds(layout, sp, len(names))
    try:
        if shared is not None:
            shared.into(memo)
        traces = [_replay(model, tr, schedule, rank, device, sizes, sp, items, mb, memo)
                  for items, mb in lists.lists]
        if shared is not None:
            shared.keep(memo)
    except Unmemoizable:  # a composed action did not add up: every action op by op
        sp, sizes = _symbolic_sizes(names, half, (*values, *lists.dropped), extra)
        traces = [_replay(model, tr, schedule, rank, device, sizes, sp, items, mb, None)
                  for items, mb in lists.lists]
    base, bexps, meta, wanted = traces[0]
    if any(t[2] != meta or t[3] != wanted for t in traces[1:]):
        raise Undecided("the shortened replays do not correspond")
    # every replay over one set of monomials (the sizes'), to take differences
    size_cols: dict[tuple, int] = {}
    for _, exps, _, _ in traces:
        for e in exps:
            size_cols.setdefault(e, len(size_cols))
    aligned = []
    for rows, exps, _, _ in traces:
        a = np.zeros(rows.shape[:2] + (len(size_cols),), dtype=np.int64)
        a[:, :, [size_cols[e] for e in exps]] = rows
        aligned.append(a)
    b0 = aligned[0]
    slopes = [a - b0 for a in aligned[1:1 + nd]]
    if nd and not np.array_equal(aligned[-1], b0 + 2 * sum(slopes)):
        raise Undecided("the shortened replays are not affine in the periods left out")
    # over the sizes and the periods: v0 + sum_k n_k·s_k
    # (the monomials over the space's variables: the sizes', the periods' at 0)
    nb = sp.n - nd
    parts, exps = [b0], list(size_cols)
    for k, s in enumerate(slopes):
        used = np.nonzero(np.abs(s).max(axis=(0, 1), initial=0))[0]
        parts.append(s[:, :, used])
        keep = set(used.tolist())
        exps += [(*e[:nb + k], e[nb + k] + 1, *e[nb + k + 1:])
                 for i, e in enumerate(size_cols) if i in keep]
    full = np.concatenate(parts, axis=2)
    if np.abs(full).max(initial=0) >= 1 << 56:
        raise Undecided("live bytes outside the template's range")
    mat, shifted = _shift_matrix(sp, exps)
    total = full.sum(1)
    ops = [mk[0] for mk in meta]
    phases = [mk[1] for mk in meta]
    win = np.array([mk[2] for mk in meta])
    out = []
    for w in wanted:
        sel = np.nonzero(win == w)[0]
        if not len(sel):
            out.append(Candidates(tuple(exps), [], [], [], [], False, sp.names))
            continue
        out.append(candidates(_to_shifted(total[sel], mat), None, tuple(shifted),
                              [ops[i] for i in sel], [phases[i] for i in sel], False,
                              natural=(sp.names, tuple(exps), total[sel], full[sel])))
    return PipelineStructureTemplate(sp.names, out, _guard_fn(sp.names, list(sp.guards.values())))
