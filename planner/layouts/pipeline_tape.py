"""A pipeline rank's whole action loop evaluated at once from its action kinds' records.

Once every kind of a rank's actions is verified (``planner/layouts/pipeline_actions.py``: the
forwards and backwards of one stage role, the step's first of each a kind of its own), a
composed action is integer arithmetic: it draws one row, its recorded highest, at the live
bytes where it starts plus the recorded relative row, and leaves the live bytes changed by
its kind's net (a forward's recorded net; a backward's recorded net plus the output the
schedule's bookkeeping still holds, which the composed backward checks). So the live bytes at
every action's start are the loop's start plus a prefix sum of those nets: the loop is a few
array operations over the rank's action codes, whatever the micro-batch count, with no action
replayed and no period searched or extrapolated. Of the loop's rows only the first highest can
be its window's first highest (the others are lower, or as high and later), so that one row is
drawn, at its place between the step's start and end.

What the loop leaves to the step's end is made as the composed actions leave it, summed per
category: the send works' storages (each forward's output sent on and each input gradient sent
back, freed when the loop ends; an I's input gradient is also its receive buffer's ``.grad``
until the next step's start), the input gradients made the previous stage's gradient receive
buffer on the rank (the V's turn: kept until the next step's replace them), the last stage's
output chunks (concatenated by ``merge_chunks``, freed at the next step's start) and losses,
and the gradients each stage's first backward makes (``attach``). The rest of the step (its
start, the sends' release, the optimizer) runs on the machine as it does after a replayed
loop.

Schedules (``TAPED``): every one whose actions are composed (GPipe, 1F1B, interleaved 1F1B,
ZB-H1, ZB-H2, ZB-V, DualPipeV; on the first stage an I does nothing and a W is a full
backward, as ``ActionMemo`` keys them; what GPipe's and 1F1B's bookkeeping holds between
actions: ``pipeline_tape_single``). The records: ``pipeline_tape_records``. Ranks whose stages
have the same roles and whose actions count the same per kind share the rows outside their
loops (``_Skeleton``). The planner tapes lists of ``MIN_ACTIONS`` or more and compiles no
template for them (their compile, on shortened lists, costs more than the tape at every
size: ``tapes``). Anything a composed action would refuse (``Unmemoizable``) or a kind not
verified raises ``NotTaped``, and the caller replays the rank's shortened lists instead.
``tests/test_pipeline_tape.py`` holds every rank's taped step equal to its full replay, op by
op, to the byte, for every schedule it takes.
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable, enabled
from planner.layouts.pipeline_codes import NAMES
from planner.layouts.pipeline_machines import TraceMachine
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak
from planner.layouts.pipeline_records import attach, forward_rest
from planner.layouts.pipeline_schedules import rank_stages
from planner.layouts.pipeline_tape_peaks import clear as clear_peaks
from planner.layouts.pipeline_tape_peaks import peaks_of
from planner.layouts.pipeline_tape_records import (
    kind_roles,
    needed,
    records,
    specs_key,
)
from planner.layouts.pipeline_tape_single import SINGLE, held_records, held_sizes
from planner.machine import cache
from planner.machine.deadline import check as check_work_limit
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, PeakSnap, Val
from planner.step.ops import T

__all__ = ["TAPED", "NotTaped", "clear", "loop", "table", "takes", "taped_rank", "tapes"]

TAPED = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")
MIN_ACTIONS = 512  # shorter lists: their shortened replays cost about as little
DEEP = 64  # GPipe and 1F1B pipelines taped past this many ranks (``tapes``)
_BIG = 1 << 62


class NotTaped(Exception):
    """An action of the rank is not composed from a verified record: replay the rank."""


def _rec(memo: ActionMemo, name: str, st: int, step: int):
    e = memo.entries.get((name, memo.roles.get(st, st), step))
    if e is None or not e.verified or e.bad:
        raise NotTaped((name, st, step))
    return e.rec


def table(prog, pk) -> tuple:
    """The loop's kinds, worked out from their records with sizes as they come (ints, or
    polynomials on a template's recording machine): (the kind ids used; per used id its record
    and its net bytes per category; the change of the live bytes over the loop per category;
    the storages it leaves to the step's end (``_leave``'s arguments); what a one-stage
    schedule's bookkeeping reads, or None). Raises ``NotTaped`` where a record would not
    compose, and makes the gradients the stages' first backwards make (``attach``) last."""
    memo, sched = prog.memo, prog.sched
    S, on, rank, step = sched.num_stages, sched.stage_to_rank, prog.rank, prog.step_no
    check_work_limit()
    vals, counts = pk.vals, pk.counts
    single = sched.name in SINGLE
    used = np.nonzero(counts)[0].tolist()
    outs: dict[int, set] = {}
    for i in used:  # the forwards first: a backward's net depends on its forward's output
        t = vals[i // 2]
        if t & 3 == 0:
            outs.setdefault(t >> 2, set()).add(_forward(memo, prog, t >> 2, i & 1))
    # what the loop leaves to the step's end, (where, stage, category) -> bytes: storages sent
    # ("send"), input gradients kept as the receive buffer's .grad too ("send+grad"), made the
    # previous stage's gradient receive buffer on the rank ("local", "local+grad")
    left: dict[tuple, int] = {}
    chunks: list = []  # the last stage's outputs and losses, with their counts
    losses: list = []
    made, recs, nets = [], {}, {}
    for i in used:
        t = vals[i // 2]
        st, k, first, c = t >> 2, t & 3, i & 1, int(counts[i])
        rec = recs[i] = _rec(memo, NAMES[k] + ("0" if first else ""), st, step)
        d = list(rec.net)
        if k == 0:
            if rec.sent:
                key = ("send", 0, rec.out.cat)
                left[key] = left.get(key, 0) + rec.out.nbytes * c
            if st == S - 1:
                chunks.append((rec.out, c))
                losses.append((rec.loss, c))
        else:
            held = outs.get(st)
            if k == 1 and (held is None or len(held) != 1):
                raise NotTaped(("B", st, "forwards unlike"))
            if k == 1 and not single:  # the output the sends (or output chunks) still hold
                nbytes, cat = next(iter(held))
                d[_INDEX[cat]] += nbytes
            if k in (1, 2) and st > 0:  # the input gradient, handed back
                if rec.grad is None or len(rec.grad) != 3:
                    raise NotTaped((NAMES[k], st, "input gradient"))
                nbytes, cat, _ = rec.grad
                where = "local" if on[st - 1] == rank else "send"
                key = (where + ("+grad" if k == 2 else ""), st - 1, cat)
                if not single:  # (one stage a rank: ``pipeline_tape_single``)
                    left[key] = left.get(key, 0) + nbytes * c
            elif k in (1, 2) and rec.grad is not None:
                raise NotTaped((NAMES[k], st, "input gradient"))
            if first and rec.made:
                made.append((st, rec.made))
        nets[i] = d
    change = [sum(int(counts[i]) * nets[i][c] for i in used) for c in range(len(CATEGORIES))]
    hold = None
    if single:  # what the schedule holds between actions (``pipeline_tape_single``)
        hold = held_records(memo, prog.stages[0], step, outs)
        if hold is None:
            raise NotTaped(("B", prog.stages[0], "outputs or input gradients unlike"))
        sizes = held_sizes(hold)
        for (nbytes, cat), coef in zip(sizes, pk.held_change):
            change[cat] += coef * nbytes
        for (nbytes, cat), count in zip(sizes, pk.held_sent):
            if cat >= 0 and count:
                key = ("send", 0, CATEGORIES[cat])
                left[key] = left.get(key, 0) + nbytes * count
    for st, rec_made in made:  # (each checks every place before it makes any)
        if not attach(prog, st, rec_made):
            raise NotTaped(("made", st, "gradients"))
    return used, recs, nets, change, (left, chunks, losses), hold


def loop(prog) -> bool:
    """``PipelineRankProgram.step``'s action loop from its kinds' records (the module
    docstring), but the row it draws: its kinds' tables are appended to ``prog.tape_loops``
    (where its row goes among the machine's, the window, the live bytes at its start, and per
    kind: (kind, role, first) key, net, relative row, whether it draws one, its (op, phase));
    True once done. Raises ``NotTaped`` before it changes anything but the gradients a first
    backward makes."""
    m, memo, sched = prog.m, prog.memo, prog.sched
    pk = peaks_of(sched, prog.rank)
    width = len(m.cur)
    start = np.asarray(m.cur, dtype=np.int64)
    used, recs, nets, change, leaves, hold = table(prog, pk)
    net = np.array([nets[i] for i in used], dtype=object).reshape(len(used), width)
    rel = np.zeros((len(used), width), dtype=object)
    drawn = np.zeros(len(used), dtype=bool)
    metas: list = [None] * len(used)
    for u, i in enumerate(used):
        plan = _plan(recs[i])
        if plan is not None:
            drawn[u], rel[u] = True, recs[i].rows[plan]
            metas[u] = recs[i].names[plan]
    if (int(np.abs(net).max(initial=0)) * pk.n + int(np.abs(start).max(initial=0)) * width
            + int(np.abs(rel).max(initial=0)) * width) >= _BIG:
        raise NotTaped("sizes past int64")
    _leave(prog, *leaves)
    m.cur[:] = [int(x) + d for x, d in zip(start, change)]
    m.total = sum(m.cur)
    memo.composed += pk.n
    # its rows are drawn by the caller (``taped_rank``): the kinds' tables, by (kind, role, first)
    vals = pk.vals
    keys = [(vals[i // 2] & 3, memo.roles.get(vals[i // 2] >> 2), i & 1) for i in used]
    prog.tape_loops.append((len(m.rows), m.window, start, keys, net.astype(np.int64),
                            rel.astype(np.int64), drawn, metas, hold))
    return True


def _leave(prog, left: dict, chunks: list, losses: list) -> None:
    """The storages the loop leaves to the step's end (``loop``'s ``left``), each kind summed
    in one, held where the composed actions leave theirs."""
    for st in {st for (where, st, _) in left if where.startswith("local")}:
        for key in [key for key in prog.grad_recv if key[0] == st]:
            del prog.grad_recv[key]  # replaced in the loop (their release is in its nets)
    for (where, st, cat), nbytes in left.items():
        b = Buf(nbytes, cat, f"{where} (composed)")
        b.refs = 2 if where.endswith("+grad") else 1
        if where.startswith("send"):
            prog.sends.append(b)
        else:
            prog.grad_recv[st, where] = b
        if where.endswith("+grad"):
            prog.input_grads.append(b)
    for handed, out in ((chunks, prog.output_chunks), (losses, prog.losses)):
        for h, count in handed:
            b = Buf(h.nbytes * count, h.cat, f"{h.name} (composed)")
            b.refs = 1
            out.append(T(Val(b, None), h.numel * count, h.esz))


_PLANS: dict[int, tuple] = {}  # id(record) -> (record, the row it draws: memo_plan)


def _plan(rec) -> int | None:
    got = _PLANS.get(id(rec))
    if got is None or got[0] is not rec:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        got = _PLANS[id(rec)] = (rec, TraceMachine.memo_plan(rec.rows, rec.names))
    return got[1]


def _forward(memo: ActionMemo, prog, st: int, first: int) -> tuple[int, str]:
    """What of a forward kind's output its B finds still held (bytes, category: sent, the next
    stage's input on the rank, or an output chunk), checked as a composed forward and backward
    would check it."""
    sched = prog.sched
    S, on = sched.num_stages, sched.stage_to_rank
    rec = _rec(memo, "F0" if first else "F", st, prog.step_no)
    local = st + 1 < S and on[st + 1] == prog.rank
    if rec.local != local or rec.out is None or (st == S - 1) == (rec.loss is None):
        raise NotTaped(("F", st))
    if rec.sent != (0 if st == S - 1 or local or sched.name in SINGLE else 1):
        raise NotTaped(("F", st, "sends"))
    if rec.out.graph_refs:  # a held output the graph references: not composed
        raise NotTaped(("F", st, "output held"))
    if not local and forward_rest(rec)[1]:
        raise NotTaped(("F", st, "rest"))
    return rec.out.nbytes, rec.out.cat


# ---- a rank's step ------------------------------------------------------------------------------
# (setup, the rank's stage roles in order, its actions' count per kind) -> ``_Skeleton``
_SKELETONS: dict[tuple, object] = {}
_SKELETONS_MAX = 256


def clear() -> None:
    _SKELETONS.clear()
    clear_peaks()


cache.on_clear(clear)


def tapes(schedule, rank: int) -> bool:
    """Whether the planner answers the rank from the tape (and compiles no template for it): a
    schedule the tape takes, a list long enough that its shortened replays (or a template's
    compile) cost more; GPipe and 1F1B only past ``DEEP`` ranks (below, their ranks' few
    short lists compile into templates that answer a sweep of sizes faster)."""
    return (takes(schedule, rank)
            and (schedule.name not in SINGLE or schedule.num_ranks > DEEP))


def takes(schedule, rank: int) -> bool:
    """Whether the tape takes the rank: a schedule it composes, a list of ``MIN_ACTIONS`` or
    more (GPipe and 1F1B included: their taped templates answer a new model of a known
    layout, planner/layouts/pipeline_tape_templates.py)."""
    return (schedule.name in TAPED and len(schedule.orders[rank]) >= MIN_ACTIONS
            and enabled())


class _Skeleton:
    """A rank's taped step but its loops' rows: per window, its first highest other row
    (total, index, row, (op, phase)) or None; per loop, where its row goes, its window, the
    live bytes at its start and its kinds' tables (by key)."""

    __slots__ = ("best", "loops", "wanted")

    def __init__(self, wanted, best, loops) -> None:
        self.wanted, self.best, self.loops = wanted, best, loops


def taped_rank(model, training, schedule, rank: int, device: str = "cuda"
               ) -> StagePeak | None:
    """The rank's replayed step (first and steady windows' peaks) with its action loop taped;
    None where the tape does not apply (the caller replays the rank's shortened lists). Ranks
    whose stages have the same roles, in order, and whose actions count the same per kind (the
    middle ranks of a deep pipeline) leave the same rows outside their loops: those are made
    once (``_Skeleton``), and each such rank draws its loops' rows alone."""
    if not takes(schedule, rank):
        return None
    roles = kind_roles(schedule, rank, model)
    pk = peaks_of(schedule, rank)
    vals, counts = pk.vals, pk.counts
    keys = [(v & 3, roles[v >> 2], f) for v in vals for f in (0, 1)]
    per: dict = {}
    for i in np.nonzero(counts)[0].tolist():
        per[keys[i]] = per.get(keys[i], 0) + int(counts[i])
    entries = records(model, training, schedule, device, rank, needed(per))
    if entries is None:
        return None
    stages = rank_stages(schedule)[rank]
    skey = (*specs_key(model, training), device, schedule.name,
            schedule.num_stages, schedule.microbatches, tuple(roles[st] for st in stages),
            tuple(sorted(per.items())))
    sk = _SKELETONS.get(skey)
    if sk is None:
        sk = _skeleton(model, training, schedule, rank, device, entries, roles)
        if sk is None:
            return None
        if len(_SKELETONS) >= _SKELETONS_MAX:
            _SKELETONS.pop(next(iter(_SKELETONS)))
        _SKELETONS[skey] = sk
    return StagePeak(rank, list(stages), *[_peak(sk, w, pk, keys) for w in sk.wanted])


def _skeleton(model, training, schedule, rank, device, entries, roles) -> _Skeleton | None:
    m = TraceMachine()
    # (no action list: the loop reads the rank's action columns)
    prog = PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                               actions=[], microbatches=schedule.microbatches,
                               compress_blocks=True, one_receive_buffer=True)
    prog.memo = ActionMemo(entries, roles)
    prog.tape, prog.tape_loops = loop, []
    try:
        wanted = prog.step_windows()
    except (NotTaped, Unmemoizable):
        return None
    rows, meta = m.trace()
    windows = np.array([mk[2] for mk in meta], dtype=np.int64)
    best = {}
    for w in wanted:
        sel = np.nonzero(windows == w)[0]
        if len(sel):
            i = int(sel[int(np.argmax(rows[sel].sum(1)))])
            best[w] = (int(rows[i].sum()), i, rows[i], meta[i][:2])
    loops, index, keys0 = [], None, None
    for at, w, start, keys, net, rel, drawn, metas, hold in prog.tape_loops:
        if keys != keys0:  # (the steps' kinds alike: one index, one mapping of a rank's)
            index, keys0 = {k: i for i, k in enumerate(keys)}, keys
        if drawn.any():  # (the kinds' totals, a row's where it draws one, far below where not)
            loops.append((at, w, start, index, net, net.sum(1), rel,
                          np.where(drawn, rel.sum(1), -_BIG), metas, hold))
    return _Skeleton(wanted, best, loops)


def _peak(sk: _Skeleton, window: int, pk, keys: list) -> PeakSnap:
    """The window's first highest row: the skeleton's, or a loop's if higher (or as high and
    earlier). A loop's: the first highest of its kept actions' starts plus their kinds' rows
    (``pipeline_tape_peaks``: no other action's row can be), with what a one-stage schedule's
    bookkeeping holds (``pipeline_tape_single.extras``, linear in the three sizes ``hold``
    gives)."""
    best = sk.best.get(window)
    cls, index_of = None, None
    for at, w, start, index, net, net_tot, rel, drawn_tot, metas, hold in sk.loops:
        if w != window:
            continue
        if index is not index_of:
            cls = np.array([index.get(k, 0) for k in keys], dtype=np.int64)
            index_of = index
        held = None
        if hold is not None:
            sizes = held_sizes(hold)
            held = np.array([b for b, _ in sizes], dtype=np.int64)
        j = pk.first_highest(net_tot[cls], drawn_tot[cls], held)
        before, c = pk.before_at(j), pk.ids[j]
        total = int(start.sum()) + int(before[:len(cls)] @ net_tot[cls]) \
            + int(drawn_tot[cls[c]])
        if held is not None:
            total += int(before[len(cls):] @ held)
        if best is None or total > best[0] or (total == best[0] and at <= best[1]):
            row = start + before[:len(cls)] @ net[cls] + rel[cls[c]]
            if held is not None:
                for coef, (b, cat) in zip(before[len(cls):].tolist(), sizes):
                    if cat >= 0:
                        row[cat] += coef * b
            best = (total, at, row, metas[cls[c]])
    if best is None:
        return PeakSnap()
    row = [int(x) for x in best[2]]
    return PeakSnap(sum(row), row, best[3][0], best[3][1])
