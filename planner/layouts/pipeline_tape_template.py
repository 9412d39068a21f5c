"""A taped pipeline layout as a template: every taped rank's peaks with the model's sizes free.

The tape (planner/layouts/pipeline_tape.py) answers a long rank from its action kinds' records
and the rank's action columns; what it reads of the model is the records' sizes and the step
outside the loop. Here both are made once with the sizes symbolic (the structure's ``MPoly``
sizes, planner/step/structure.py), so a new model of the layout is a few generated functions'
evaluation, not a replay:

- the kinds' records come from the same kept lists (``pipeline_tape_records.record_list``)
  replayed on the recording machine, verified alike (two occurrences equal term by term);
- each rank's step is replayed there once with its loop taped (``table``, the same arithmetic
  on polynomials): a mark stands where the loop starts, and the loop's change of the live
  bytes is logged after it as one change per category;
- the loop's rows are the start's live bytes plus, at each action that can hold the loop's
  first highest row (``pipeline_tape_peaks``: the same for every size, since it holds for any
  values of the kinds' nets and rows), the counts before it times the kinds' nets plus each
  mark of its kind that can be the kind's first highest for some sizes (``undominated``);
- every window's rows, the loop's in their place among the machine's, become the window's
  peak candidates (planner/machine/peak_candidates.py), as a rank structure's are.

What the domain leaves open is decided at the witness and kept as a guard (``admits``). A rank
the tape does not take (a kind not verified, a composed action refused, counts too wide for the
dense form) has no template: the caller tapes or replays it.
``tests/test_pipeline_tape_template.py`` holds every rank's evaluation equal to the full
replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable
from planner.layouts.pipeline_machines import _nonzero, _Recording, undominated
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak
from planner.layouts.pipeline_schedules import rank_stages
from planner.layouts.pipeline_tape import NotTaped, _leave, table, takes
from planner.layouts.pipeline_tape_peaks import peaks_of
from planner.layouts.pipeline_tape_records import (
    kind_roles,
    needed,
    record_kinds,
)
from planner.layouts.pipeline_tape_single import held_sizes
from planner.machine.deadline import check as check_work_limit
from planner.machine.peak_candidates import Candidates, candidates
from planner.machine.stepsim import CATEGORIES, PeakSnap
from planner.machine.symbolic import MPoly, Undecided
from planner.step.structure import (
    _guard_fn,
    _natural,
    _shift_matrix,
    _symbolic_sizes,
    _to_shifted,
)

__all__ = ["TapedTemplate", "compile_taped"]

_TAPE = "(tape)"  # the mark where a loop starts (its live bytes: the loop's start)
_LIMIT = 1 << 56


@dataclass
class TapedTemplate:
    """Per taped rank, its stages and its two step windows' candidates over the sizes
    ``names``; ``admits(*values)`` (None: no guard) whether a model's sizes decide what the
    compile decided at its witness alike."""

    names: tuple[str, ...]
    ranks: dict[int, tuple[list[int], list[Candidates]]]
    admits: object = None
    seconds: list = field(default_factory=list)  # each rank's compile (its records' included)

    # (sizes, id(window) -> its peak): the windows ranks share, evaluated once a model
    _memo: tuple = field(default=((), {}), init=False, repr=False, compare=False)

    def stage_peak(self, rank: int, values: tuple[int, ...]) -> StagePeak | None:
        got = self.ranks.get(rank)
        if got is None:
            return None
        memo = self._memo
        if memo[0] != values:
            memo = self._memo = (values, {})
        out = []
        for c in got[1]:
            s = memo[1].get(id(c))
            if s is None:
                s = memo[1][id(c)] = c.best(*values)
            out.append(PeakSnap(s.total, list(s.by_cat), s.op, s.phase))
        return StagePeak(rank, list(got[0]), *out)


def compile_taped(model, tr, schedule, device: str, names: tuple[str, ...], half: bool,
                  values: tuple[int, ...]) -> TapedTemplate:
    """Every taped rank of the layout with the sizes ``names`` symbolic (witness ``values``);
    ranks the tape does not take are left out. Raises Undecided (or TypeError) where the
    records or the step depend on the sizes beyond the guards."""
    sp, sizes = _symbolic_sizes(names, half, values)
    entries: dict = {}
    tried: set = set()
    out: dict = {}
    alike: dict = {}  # a window's rows -> the one Candidates of them (GPipe's middle ranks)
    seconds = []
    for rank in range(schedule.num_ranks):
        if not takes(schedule, rank):
            continue
        check_work_limit()
        t0 = time.perf_counter()
        roles = kind_roles(schedule, rank, model)
        try:
            _records(model, tr, schedule, device, rank, sizes, entries, tried, roles)
            windows = _rank_windows(model, tr, schedule, device, rank, sp, sizes, entries,
                                    roles)
        except (NotTaped, Unmemoizable):
            continue
        out[rank] = (rank_stages(schedule)[rank], [_shared(c, alike) for c in windows])
        seconds.append(time.perf_counter() - t0)
    if not out:
        raise Undecided("no rank taped")
    return TapedTemplate(sp.names, out, _guard_fn(sp.names, list(sp.guards.values())),
                         seconds)


def _shared(c: Candidates, alike: dict) -> Candidates:
    """``c``, or an earlier rank's window of the same rows (evaluated once an estimate)."""
    sig = (c.exps, tuple(map(tuple, c.key)), tuple(tuple(map(tuple, x)) for x in c.cats),
           tuple(c.ops), tuple(c.phases), c.zero)
    return alike.setdefault(sig, c)


def _records(model, tr, schedule, device, rank, sizes, entries, tried, roles) -> None:
    """The kinds the rank reads, recorded on the recording machine from its kept list where
    one is not verified yet (``pipeline_tape_records.records``, with polynomial sizes)."""
    pk = peaks_of(schedule, rank)
    kinds = needed({(pk.vals[i // 2] & 3, roles[pk.vals[i // 2] >> 2], i & 1)
                    for i in np.nonzero(pk.counts)[0].tolist()})
    if kinds <= tried or all((e := entries.get(k)) is not None and e.verified
                             for k in kinds):
        return
    tried |= kinds
    record_kinds(model, tr, schedule, device, rank, roles, entries, _Recording(), sizes)


def _loop(prog) -> bool:
    """``pipeline_tape.loop`` on the recording machine: a mark where the loop starts, the
    loop's change of the live bytes logged after it, and the kinds' tables kept (their nets
    and the marks each can draw, as polynomials)."""
    m, memo = prog.m, prog.memo
    pk = peaks_of(prog.sched, prog.rank)
    if pk.before is None:
        raise NotTaped("counts too wide to keep dense")
    m._flush()
    marker = len(m.marks)
    m.marks.append((len(m.log), _TAPE, m.phase, m.window, False))
    n0 = len(m.log)
    used, recs, nets, change, leaves, hold = table(prog, pk)
    # (the gradients ``attach`` made are in the first backwards' nets, so in ``change``)
    del m.log[n0:]
    m._since_last = None
    if m._cur_at[0] > n0:
        m._cur_at = (0, [0] * len(CATEGORIES))
    _leave(prog, *leaves)
    for c, d in enumerate(change):
        if _nonzero(d):
            m.log.append((c + 1, d))
    memo.composed += pk.n
    draws = {i: _draws(recs[i]) for i in used}
    prog.tape_loops.append((marker, pk, used, nets, draws, hold))
    return True


_DRAWS: dict[int, tuple] = {}  # id(record) -> (record, its drawable marks and their names)


def _draws(rec) -> tuple[list, list]:
    """The marks of a kind's record that can be its first highest for some sizes
    (``undominated``), with their (op, phase); kept per record (the ranks share them)."""
    got = _DRAWS.get(id(rec))
    if got is None or got[0] is not rec:
        if len(_DRAWS) >= 4096:
            _DRAWS.clear()
        keep = undominated(list(rec.rows)) if rec.rows else []
        got = _DRAWS[id(rec)] = (rec, ([rec.rows[r] for r in keep],
                                       [rec.names[r][:2] for r in keep]))
    return got[1]


class _Cols:
    """Monomial columns shared by the machine's marks and the loops' polynomials."""

    def __init__(self, exps: list) -> None:
        self.exps = list(exps)
        self.at = {e: i for i, e in enumerate(self.exps)}
        self.zero = self.exps[0]

    def row(self, parts) -> list:
        """A row per category as [(column, coefficient)] (new monomials added)."""
        out = []
        for c, p in enumerate(parts):
            if isinstance(p, MPoly):
                items = p.t.items()
            elif p:
                items = ((self.zero, int(p)),)
            else:
                items = ()
            for e, k in items:
                j = self.at.get(e)
                if j is None:
                    j = self.at[e] = len(self.exps)
                    self.exps.append(e)
                out.append((c, j, k))
        return out


def _dense(rows: list, n: int) -> np.ndarray:
    a = np.zeros((len(rows), len(CATEGORIES), n), dtype=np.int64)
    for r, entries in enumerate(rows):
        for c, j, k in entries:
            if abs(k) >= _LIMIT:
                raise Undecided("a size outside the template's range")
            a[r, c, j] += k
    return a


def _rank_windows(model, tr, schedule, device, rank, sp, sizes, entries, roles) -> list:
    m = _Recording()
    prog = PipelineRankProgram(model, tr, schedule, rank, device=device, machine=m, sizes=sizes,
                               actions=[], microbatches=schedule.microbatches,
                               compress_blocks=True, one_receive_buffer=True)
    prog.memo = ActionMemo(entries, roles)
    prog.tape, prog.tape_loops = _loop, []
    wanted = prog.step_windows()
    m._flush()
    full, exps = _natural(m, sp)
    cols = _Cols(exps)
    blocks = {}  # marker -> (rows, ops, phases)
    for marker, pk, used, nets, draws, hold in prog.tape_loops:
        k = len(pk.counts)
        net_rows = [cols.row(nets[i]) for i in used]
        rel_rows, metas = [], []
        first, n_of = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
        for i in used:  # (each kind's marks together: from ``first``, ``n_of`` of them)
            rs, ns = draws[i]
            first[i], n_of[i] = len(rel_rows), len(rs)
            rel_rows += [cols.row(r) for r in rs]
            metas += ns
        held = None if hold is None else [
            cols.row([b if c == cat else 0 for c in range(len(CATEGORIES))])
            for b, cat in held_sizes(hold)]
        blocks[marker] = (net_rows, rel_rows, metas, (first, n_of), held, pk, used, k)
    width = len(cols.exps)
    if width > full.shape[2]:
        full = np.concatenate([full, np.zeros(full.shape[:2] + (width - full.shape[2],),
                                              dtype=np.int64)], axis=2)
    pieces, ops, phases, wins = [], [], [], []
    at = 0
    for marker in sorted(blocks):
        net_rows, rel_rows, metas, marks, held, pk, used, k = blocks[marker]
        pieces.append(full[at:marker])
        for mk in m.marks[at:marker]:
            ops.append(mk[1])
            phases.append(mk[2])
            wins.append(mk[3])
        rows = _loop_rows(full[marker], _dense(net_rows, width), _dense(rel_rows, width),
                          marks, None if held is None else _dense(held, width), pk, used, k)
        pieces.append(rows[0])
        idx = rows[1]
        ops += [metas[r][0] for r in idx]
        phases += [metas[r][1] for r in idx]
        wins += [m.marks[marker][3]] * len(idx)
        at = marker + 1
    pieces.append(full[at:])
    for mk in m.marks[at:]:
        ops.append(mk[1])
        phases.append(mk[2])
        wins.append(mk[3])
    every = np.concatenate(pieces, axis=0)
    if np.abs(every).max(initial=0) >= _LIMIT:
        raise Undecided("live bytes outside the template's range")
    mat, shifted = _shift_matrix(sp, cols.exps)
    total = every.sum(1)
    win = np.array(wins)
    out = []
    for w in wanted:
        sel = np.nonzero(win == w)[0]
        if not len(sel):
            out.append(Candidates(tuple(cols.exps), [], [], [], [], False, sp.names))
            continue
        out.append(candidates(_to_shifted(total[sel], mat), None, tuple(shifted),
                              [ops[i] for i in sel], [phases[i] for i in sel], False,
                              natural=(sp.names, tuple(cols.exps), total[sel], every[sel])))
    return out


def _loop_rows(start, NET, REL, marks, HELD, pk, used, k) -> tuple[np.ndarray, np.ndarray]:
    """(the loop's rows: at each kept action, each mark its kind can draw, from the start's
    live bytes plus the counts before it times the kinds' nets (and the held sizes); which of
    ``REL`` each row draws), in the loop's order. ``marks``: per kind id, where its marks
    start in ``REL`` and how many it has."""
    ids, counts = pk.fewer()  # (every kept action is a row here: as few as can be)
    before = counts[:, :k][:, used]
    if (np.abs(before).max(initial=0) * (np.abs(NET).max(initial=0) * max(len(used), 1)
                                          + (0 if HELD is None else np.abs(HELD).max()) * 3)
            >= _LIMIT):
        raise Undecided("live bytes outside the template's range")
    base = start[None] + np.tensordot(before, NET, axes=(1, 0))
    if HELD is not None:
        base += np.tensordot(counts[:, k:], HELD, axes=(1, 0))
    first, n_of = marks
    reps = n_of[ids]
    rows_of = np.repeat(np.arange(len(ids)), reps)
    offs = np.arange(len(rows_of)) - np.repeat(np.cumsum(reps) - reps, reps)
    idx = np.repeat(first[ids], reps) + offs
    return base[rows_of] + REL[idx], idx
