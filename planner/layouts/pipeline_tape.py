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

What the loop leaves to the step's end is made as the composed actions leave it, summed: the
send works' storages (each forward's output sent on and each input gradient sent back, freed
when the loop ends), the last stage's output chunks (concatenated by ``merge_chunks``, freed at
the next step's start) and losses, and the gradients each stage's first backward makes
(``attach``). The rest of the step (its start, the sends' release, the optimizer) runs on the
machine as it does after a replayed loop.

The records come from a replay of the same setup at a few micro-batches
(``RECORD_MICROBATCHES``), of the fewest ranks that hold every stage role
(``pipeline_replays.stage_roles``): a kind's record is relative to where it starts, so it
does not depend on the micro-batch count. A kind is verified by two occurrences that agree; a
step's first forward and backward of a stage, which occur once a step, by the first and the
second step's. Schedules: interleaved 1F1B (``TAPED``; its actions are forwards and full
backwards, each stage's output sent to another rank), for lists of ``MIN_ACTIONS`` or more
(shorter ones cost as little replayed). Anything a composed action would refuse
(``Unmemoizable``) or a kind not verified raises ``NotTaped``, and the caller replays the
rank's shortened lists instead. ``tests/test_pipeline_tape.py`` holds every rank's taped step
equal to its full replay, op by op, to the byte.
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable, enabled
from planner.layouts.pipeline_machines import TraceMachine
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak
from planner.layouts.pipeline_orders import B_SLOT, F_SLOT
from planner.layouts.pipeline_records import _same, attach, forward_rest
from planner.layouts.pipeline_replays import first_highest, stage_roles
from planner.layouts.pipeline_schedules import ScheduleConstraintError, schedule_of
from planner.machine import cache
from planner.machine.deadline import check as check_work_limit
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, Val
from planner.step.ops import T

__all__ = ["NotTaped", "TAPED", "clear", "loop", "taped_rank", "tapes"]

TAPED = ("interleaved-1f1b",)
RECORD_MICROBATCHES = 3  # a stage's first forward and backward, then two of each to verify
MIN_ACTIONS = 512  # shorter lists: their shortened replays cost about as little
_BIG = 1 << 62


class NotTaped(Exception):
    """An action of the rank is not composed from a verified record: replay the rank."""


def _rec(memo: ActionMemo, name: str, st: int, step: int):
    e = memo.entries.get((name, memo.roles.get(st, st), step))
    if e is None or not e.verified or e.bad:
        raise NotTaped((name, st, step))
    return e.rec


def _columns(prog):
    """(each action's kind + 4 x stage, the kind + stage values present, their first
    actions, each action's index among them), kept with the program (both steps read them)."""
    got = prog.__dict__.get("_tape_columns")
    if got is None:
        sched = prog.sched
        codes = np.asarray(sched.orders[prog.rank], dtype=np.int64)
        m = sched.microbatches
        slot, rest = np.divmod(codes, sched.num_stages * m)
        full = np.frombuffer(bytes(sched.full_backward), dtype=np.uint8)[rest] != 0
        kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
        tok = kind + 4 * (rest // m)
        vals = np.nonzero(np.bincount(tok))[0]
        lut = np.zeros(int(vals[-1]) + 1 if len(vals) else 1, dtype=np.int64)
        lut[vals] = np.arange(len(vals))
        first = [int(np.argmax(tok == v)) for v in vals.tolist()]
        got = prog._tape_columns = (tok, vals.tolist(), first, lut[tok])
    return got


def loop(prog) -> bool:
    """``PipelineRankProgram.step``'s action loop from its kinds' records (the module
    docstring); True once done. Raises ``NotTaped`` before it changes anything but the
    gradients a first backward makes."""
    m, memo, S = prog.m, prog.memo, prog.sched.num_stages
    check_work_limit()
    tok, vals, first_at, inv = _columns(prog)
    n = len(tok)
    if not n:
        return True
    if max(v & 3 for v in vals) > 1:
        raise NotTaped("a split backward")
    ids = inv * 2
    ids[first_at] += 1  # the step's first action of its kind and stage: a kind of its own
    counts = np.bincount(ids, minlength=2 * len(vals))
    used = np.nonzero(counts)[0].tolist()
    width = len(m.cur)
    net = np.zeros((2 * len(vals), width), dtype=np.int64)
    rel = np.zeros_like(net)
    drawn = np.zeros(2 * len(vals), dtype=bool)
    metas: list = [None] * (2 * len(vals))
    outs: dict[int, set] = {}
    for i in used:  # the forwards first: a backward's net depends on its forward's output
        t = vals[i // 2]
        if t & 3 == 0:
            outs.setdefault(t >> 2, set()).add(_forward(memo, prog, t >> 2, i & 1, S))
    sends = [0] * width
    chunks: list = []  # the last stage's outputs and losses, with their counts
    losses: list = []
    made = []
    for i in used:
        t = vals[i // 2]
        st, first = t >> 2, i & 1
        if t & 3 == 0:
            rec = _rec(memo, "F0" if first else "F", st, prog.step_no)
            d = list(rec.net)
            if rec.sent:
                sends[_INDEX[rec.out.cat]] += rec.out.nbytes * int(counts[i])
            if st == S - 1:
                chunks.append((rec.out, int(counts[i])))
                losses.append((rec.loss, int(counts[i])))
        else:
            rec = _rec(memo, "B0" if first else "B", st, prog.step_no)
            held = outs.get(st)
            if held is None or len(held) != 1:
                raise NotTaped(("B", st, "forwards unlike"))
            nbytes, cat = next(iter(held))
            d = list(rec.net)
            d[_INDEX[cat]] += nbytes  # the output the sends (or output_chunks) still hold
            if rec.grad is not None:
                if len(rec.grad) != 3:
                    raise NotTaped(("B", st, "input gradients"))
                sends[_INDEX[rec.grad[1]]] += rec.grad[0] * int(counts[i])
            if first and rec.made:
                made.append((st, rec.made))
        net[i] = d
        plan = _plan(rec)
        if plan is not None:
            drawn[i], rel[i] = True, rec.rows[plan]
            metas[i] = rec.names[plan]
    start = np.asarray(m.cur, dtype=np.int64)
    net_tot, rel_tot = net.sum(1), rel.sum(1)
    if (int(np.abs(net).max()) * n + int(np.abs(start).max(initial=0)) * width
            + int(np.abs(rel).max()) * width) >= _BIG:
        raise NotTaped("sizes past int64")
    for st, rec_made in made:  # (each checks every place before it makes any)
        if not attach(prog, st, rec_made):
            raise NotTaped(("B0", st, "gradients"))
    # the loop's rows: each drawing action's start plus its kind's row; only the first highest
    # can be its window's first highest (the others are lower, or as high and later)
    steps = net_tot[ids]
    live = np.cumsum(steps)
    live -= steps  # the live bytes (total) at each action's start, from the loop's
    sel = np.nonzero(drawn[ids])[0]
    if len(sel):
        tot = live[sel] + rel_tot[ids[sel]]
        k = int(sel[int(np.argmax(tot))])
        before = np.bincount(ids[:k], minlength=len(net)) @ net
        row = start + before + rel[ids[k]]
        m.rows.append(tuple(int(x) for x in row))
        op, phase = metas[ids[k]]
        m.meta.append((op, phase, m.window))
    end = start + counts @ net
    for i, b in enumerate(sends):  # each sent storage's only reference left: its send work
        if b:
            sent = Buf(b, CATEGORIES[i], "sends (composed)")
            sent.refs = 1
            prog.sends.append(sent)
    for handed, out in ((chunks, prog.output_chunks), (losses, prog.losses)):
        for h, count in handed:
            b = Buf(h.nbytes * count, h.cat, f"{h.name} (composed)")
            b.refs = 1
            out.append(T(Val(b, None), h.numel * count, h.esz))
    m.cur[:] = [int(x) for x in end]
    m.total = sum(m.cur)
    memo.composed += n
    return True


_PLANS: dict[int, tuple] = {}  # id(record) -> (record, the row it draws: memo_plan)


def _plan(rec) -> int | None:
    got = _PLANS.get(id(rec))
    if got is None or got[0] is not rec:
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        got = _PLANS[id(rec)] = (rec, TraceMachine.memo_plan(rec.rows, rec.names))
    return got[1]


def _forward(memo: ActionMemo, prog, st: int, first: int, S: int) -> tuple[int, str]:
    """A forward kind's output as its backward finds it held (bytes, category), checked as a
    composed forward and backward would check it."""
    rec = _rec(memo, "F0" if first else "F", st, prog.step_no)
    if rec.local or rec.out is None or (st == S - 1) == (rec.loss is None):
        raise NotTaped(("F", st))
    if rec.sent != (0 if st == S - 1 else 1):
        raise NotTaped(("F", st, "sends"))
    if rec.out.graph_refs:  # a held output the graph references: not composed
        raise NotTaped(("F", st, "output held"))
    if forward_rest(rec)[1]:
        raise NotTaped(("F", st, "rest"))
    return rec.out.nbytes, rec.out.cat


# ---- a rank's step ------------------------------------------------------------------------------
_RECORDS: dict = {}  # (setup but the micro-batch count, layout) -> verified ActionMemo entries
_RECORDS_MAX = 64


def clear() -> None:
    _RECORDS.clear()


cache.on_clear(clear)


def _records(model, training, schedule, device: str) -> dict | None:
    """The kinds' records of the setup's ranks (the module docstring), or None where the
    replay at a few micro-batches does not compose."""
    key = (model.model_dump_json(),
           training.model_dump_json(exclude={"gradient_accumulation_steps"}), device,
           schedule.name, schedule.num_stages, schedule.num_ranks, tuple(schedule.stage_to_rank))
    if key in _RECORDS:
        return _RECORDS[key]
    entries: dict | None = {}
    try:
        small = schedule_of(schedule.name, schedule.num_ranks, RECORD_MICROBATCHES,
                            schedule.num_stages // schedule.num_ranks)
    except ScheduleConstraintError:
        small = None
    if small is None or list(small.stage_to_rank) != list(schedule.stage_to_rank):
        entries = None
    else:
        covered: set = set()
        try:
            for r in range(small.num_ranks):
                roles = stage_roles(small, r, model)
                if set(roles.values()) <= covered:
                    continue
                covered |= set(roles.values())
                check_work_limit()
                prog = PipelineRankProgram(model, training, small, r, device=device,
                                           machine=TraceMachine(), compress_blocks=True)
                prog.memo = ActionMemo(entries, roles)
                if not prog.memo.applies(prog):
                    raise Unmemoizable("not composed")
                prog.step_windows()
        except Unmemoizable:
            entries = None
        if entries is not None:
            _first_kinds_verified(entries)
    if len(_RECORDS) >= _RECORDS_MAX:
        _RECORDS.pop(next(iter(_RECORDS)), None)
    _RECORDS[key] = entries
    return entries


def tapes(schedule, rank: int) -> bool:
    """Whether ``taped_rank`` takes the rank: a schedule it tapes, a list long enough that
    its shortened replays (or a template's compile) cost more."""
    return (schedule.name in TAPED and len(schedule.orders[rank]) >= MIN_ACTIONS
            and enabled())


def _first_kinds_verified(entries: dict) -> None:
    """A step's first forward and backward of a stage occur once a step: the first step's and
    the second's, recorded alike, verify each other (two occurrences of a kind that agree, as
    ``ActionMemo`` verifies the others)."""
    for (name, role, step), e in list(entries.items()):
        if step != 1 or name[-1] != "0" or e.verified or e.bad:
            continue
        e2 = entries.get((name, role, 2))
        if e2 is not None and not e2.bad and _same(e.rec, e2.rec):
            e.verified = e2.verified = True


def taped_rank(model, training, schedule, rank: int, device: str = "cuda"
               ) -> StagePeak | None:
    """The rank's replayed step (first and steady windows' peaks) with its action loop taped;
    None where the tape does not apply (the caller replays the rank's shortened lists)."""
    if not tapes(schedule, rank):
        return None
    entries = _records(model, training, schedule, device)
    if entries is None:
        return None
    m = TraceMachine()
    # (no action list: the loop reads the rank's action columns)
    prog = PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                               actions=[], microbatches=schedule.microbatches,
                               compress_blocks=True, one_receive_buffer=True)
    prog.memo = ActionMemo(entries, stage_roles(schedule, rank, model))
    prog.tape = loop
    try:
        wanted = prog.step_windows()
    except (NotTaped, Unmemoizable):
        return None
    rows, meta = m.trace()
    return StagePeak(rank, prog.stages, *[first_highest(rows, meta, w) for w in wanted])
