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

Schedules (``TAPED``): the multi-stage runtime's, whose actions are composed (interleaved 1F1B,
ZB-H1, ZB-H2, ZB-V, DualPipeV; on the first stage an I does nothing and a W is a full
backward, as ``ActionMemo`` keys them). The records come from replays of the ranks' lists kept
to a few micro-batches (``record_list``: each kind twice a step), one for each rank whose
stage roles (``kind_roles``: a stage's place on the rank told only as first or not) no rank
replayed before holds: a kind's record
is relative to where it starts, so it does not depend on the other micro-batches. A kind is
verified by two occurrences that agree: its two in a step, or the first step's and the
second's (a step's first forward and backward of a stage occur once a step). The planner
tapes lists of ``MIN_ACTIONS`` or more, and compiles no template for them (their compile, on
shortened lists, costs more than the tape at every size: ``tapes``); shorter ones are replayed
and templated as before. Anything a composed action would refuse (``Unmemoizable``) or a kind
not verified raises ``NotTaped``, and the caller replays the rank's shortened lists instead.
``tests/test_pipeline_tape.py`` holds every rank's taped step equal to its full replay, op by
op, to the byte, for every schedule it takes.
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable, enabled
from planner.layouts.pipeline_machines import TraceMachine
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak
from planner.layouts.pipeline_orders import B_SLOT, F_SLOT
from planner.layouts.pipeline_records import _same, attach, forward_rest
from planner.layouts.pipeline_replays import first_highest, stage_roles
from planner.machine import cache
from planner.machine.deadline import check as check_work_limit
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, Val
from planner.step.ops import T

__all__ = ["NotTaped", "TAPED", "clear", "kind_roles", "loop", "record_list", "taped_rank", "tapes"]

TAPED = ("interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")
MIN_ACTIONS = 512  # shorter lists: their shortened replays cost about as little
_BIG = 1 << 62


class NotTaped(Exception):
    """An action of the rank is not composed from a verified record: replay the rank."""


def _rec(memo: ActionMemo, name: str, st: int, step: int):
    e = memo.entries.get((name, memo.roles.get(st, st), step))
    if e is None or not e.verified or e.bad:
        raise NotTaped((name, st, step))
    return e.rec


def _decoded(schedule, rank: int):
    """The rank's actions as arrays: kind (F 0, B 1, I 2, W 3), stage, micro-batch."""
    codes = np.asarray(schedule.orders[rank], dtype=np.int64)
    m = schedule.microbatches
    slot, rest = np.divmod(codes, schedule.num_stages * m)
    full = np.frombuffer(bytes(schedule.full_backward), dtype=np.uint8)[rest] != 0
    kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
    stage, mb = np.divmod(rest, m)
    return kind, stage, mb


def _as_keyed(kind, stage):
    """Kind + 4 x stage of each action as ``ActionMemo`` keys it (on the first stage an I does
    nothing, -1 here, and a W is a full backward, a B)."""
    kind = kind.copy()
    kind[(stage == 0) & (kind == 3)] = 1
    tok = kind + 4 * stage
    tok[(stage == 0) & (kind == 2)] = -1
    return tok


def _columns(prog):
    """(each action's kind + 4 x stage as ``ActionMemo`` keys it, the values present, their
    first actions, each action's index among them), kept with the program (both steps read
    them)."""
    got = prog.__dict__.get("_tape_columns")
    if got is None:
        kind, stage, _ = _decoded(prog.sched, prog.rank)
        tok = _as_keyed(kind, stage)
        tok = tok[tok >= 0]
        vals = np.nonzero(np.bincount(tok))[0] if len(tok) else np.zeros(0, dtype=np.int64)
        lut = np.zeros(int(vals[-1]) + 1 if len(vals) else 1, dtype=np.int64)
        lut[vals] = np.arange(len(vals))
        idx = lut[tok]
        first = np.full(len(vals), len(tok), dtype=np.int64)
        np.minimum.at(first, idx, np.arange(len(tok)))
        got = prog._tape_columns = (tok, vals.tolist(), first, idx)
    return got


_NAMES = ("F", "B", "I", "W")


def loop(prog) -> bool:
    """``PipelineRankProgram.step``'s action loop from its kinds' records (the module
    docstring); True once done. Raises ``NotTaped`` before it changes anything but the
    gradients a first backward makes."""
    m, memo, sched = prog.m, prog.memo, prog.sched
    S, on, rank, step = sched.num_stages, sched.stage_to_rank, prog.rank, prog.step_no
    check_work_limit()
    tok, vals, first_at, inv = _columns(prog)
    n = len(tok)
    if not n:
        return True
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
            outs.setdefault(t >> 2, set()).add(_forward(memo, prog, t >> 2, i & 1))
    # what the loop leaves to the step's end, (where, stage, category) -> bytes: storages sent
    # ("send"), input gradients kept as the receive buffer's .grad too ("send+grad"), made the
    # previous stage's gradient receive buffer on the rank ("local", "local+grad")
    left: dict[tuple, int] = {}
    chunks: list = []  # the last stage's outputs and losses, with their counts
    losses: list = []
    made = []
    for i in used:
        t = vals[i // 2]
        st, k, first, c = t >> 2, t & 3, i & 1, int(counts[i])
        rec = _rec(memo, _NAMES[k] + ("0" if first else ""), st, step)
        d = list(rec.net)
        if k == 0:
            if rec.sent:
                key = ("send", 0, rec.out.cat)
                left[key] = left.get(key, 0) + rec.out.nbytes * c
            if st == S - 1:
                chunks.append((rec.out, c))
                losses.append((rec.loss, c))
        else:
            if k == 1:  # what the schedule's bookkeeping still holds of the output
                held = outs.get(st)
                if held is None or len(held) != 1:
                    raise NotTaped(("B", st, "forwards unlike"))
                nbytes, cat = next(iter(held))
                if nbytes:
                    d[_INDEX[cat]] += nbytes
            if k in (1, 2) and st > 0:  # the input gradient, handed back
                if rec.grad is None or len(rec.grad) != 3:
                    raise NotTaped((_NAMES[k], st, "input gradient"))
                nbytes, cat, _ = rec.grad
                where = "local" if on[st - 1] == rank else "send"
                key = (where + ("+grad" if k == 2 else ""), st - 1, cat)
                left[key] = left.get(key, 0) + nbytes * c
            elif k in (1, 2) and rec.grad is not None:
                raise NotTaped((_NAMES[k], st, "input gradient"))
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
            raise NotTaped(("made", st, "gradients"))
    # the loop's rows: each drawing action's start plus its kind's row; only the first highest
    # can be its window's first highest (the others are lower, or as high and later)
    steps = net_tot[ids]
    live = np.cumsum(steps)
    live -= steps  # the live bytes (total) at each action's start, from the loop's
    if drawn.any():
        live += np.where(drawn, rel_tot, -_BIG)[ids]  # each action's row (none: far below)
        k = int(np.argmax(live))
        before = np.bincount(ids[:k], minlength=len(net)) @ net
        row = start + before + rel[ids[k]]
        m.rows.append(tuple(int(x) for x in row))
        op, phase = metas[ids[k]]
        m.meta.append((op, phase, m.window))
    end = start + counts @ net
    _leave(prog, left, chunks, losses)
    m.cur[:] = [int(x) for x in end]
    m.total = sum(m.cur)
    memo.composed += n
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
    if rec.sent != (0 if st == S - 1 or local else 1):
        raise NotTaped(("F", st, "sends"))
    if rec.out.graph_refs:  # a held output the graph references: not composed
        raise NotTaped(("F", st, "output held"))
    if not local and forward_rest(rec)[1]:
        raise NotTaped(("F", st, "rest"))
    return rec.out.nbytes, rec.out.cat


# ---- the kinds' records ------------------------------------------------------------------------
_RECORDS: dict = {}  # (setup, layout, micro-batch count) -> verified ActionMemo entries
_RECORDS_MAX = 64


def clear() -> None:
    _RECORDS.clear()


cache.on_clear(clear)


def record_list(schedule, rank: int, roles: dict | None = None) -> tuple[list, int]:
    """(actions, micro-batch count) of the rank's list kept to a few micro-batches that hold
    each of its kinds twice a step where the list does: per pattern of actions a micro-batch
    goes through (the kind and stage of each, in order), its first two; and the micro-batch of
    each kind's first action (the step's first backward of a stage is the one that makes its
    gradients). ``roles`` (stage -> role): the actions of each role's first stage alone (a
    stage's actions take nothing from the rank's other stages but its receive buffers, made
    with the program). The kept micro-batches are numbered in order; the actions keep
    theirs."""
    kind, stage, mb = _decoded(schedule, rank)
    if roles is not None:
        firsts: dict = {}
        for st in sorted(roles):
            firsts.setdefault(roles[st], st)
        mine = np.isin(stage, np.array(sorted(firsts.values()), dtype=np.int64))
        kind, stage, mb = kind[mine], stage[mine], mb[mine]
    tok = _as_keyed(kind, stage)
    vals, first = np.unique(tok[tok >= 0], return_index=True)
    keep = set(mb[tok >= 0][first].tolist())
    order = np.argsort(mb, kind="stable")  # each micro-batch's actions, in order
    bounds = np.flatnonzero(np.diff(mb[order])) + 1
    seq = tok[order]
    seen: dict[bytes, int] = {}
    for j, a, b in zip(mb[order][np.r_[0, bounds]].tolist(), np.r_[0, bounds].tolist(),
                       np.r_[bounds, len(seq)].tolist()):
        key = seq[a:b].tobytes()
        n = seen.get(key, 0)
        if n < 2:
            seen[key] = n + 1
            keep.add(j)
    kept = np.isin(mb, np.fromiter(keep, dtype=np.int64, count=len(keep)))
    new = {j: i for i, j in enumerate(sorted(keep))}
    return [(_NAMES[k], st, new[j], 0) for k, st, j in
            zip(kind[kept].tolist(), stage[kept].tolist(), mb[kept].tolist())], len(new)


def kind_roles(schedule, rank: int, model) -> dict[int, tuple]:
    """What a stage's actions depend on (``pipeline_replays.stage_roles``) with its place on
    the rank told only as first or not: a rank's later stages of one layer count and
    neighbours (the interleaved middle) share their kinds' records."""
    return {st: (role[0] == 0, *role[1:])
            for st, role in stage_roles(schedule, rank, model).items()}


def _records(model, training, schedule, device: str, rank: int) -> dict | None:
    """The kinds' records of the setup's ranks (the module docstring), those of ``rank``'s
    stage roles made now where no rank replayed before holds them (its own list kept to a few
    micro-batches replayed); None where a replay does not compose."""
    key = (model.model_dump_json(), training.model_dump_json(), device, schedule.name,
           schedule.num_stages, schedule.num_ranks, tuple(schedule.stage_to_rank),
           schedule.microbatches)
    got = _RECORDS.get(key, ())
    if got is None:
        return None
    roles = kind_roles(schedule, rank, model)
    if got and set(roles.values()) <= got[1]:
        return got[0]
    entries, covered = got or ({}, set())
    check_work_limit()
    items, mb = record_list(schedule, rank, roles)
    prog = PipelineRankProgram(model, training, schedule, rank, device=device,
                               machine=TraceMachine(), actions=items, microbatches=mb,
                               compress_blocks=True)
    prog.memo = ActionMemo(entries, roles)
    try:
        if not prog.memo.applies(prog):
            raise Unmemoizable("not composed")
        prog.step_windows()
    except Unmemoizable:
        entries = None
    if entries is not None:
        _verified_across_steps(entries)
    if len(_RECORDS) >= _RECORDS_MAX and key not in _RECORDS:
        _RECORDS.pop(next(iter(_RECORDS)), None)
    _RECORDS[key] = None if entries is None else (entries, covered | set(roles.values()))
    return entries


def _verified_across_steps(entries: dict) -> None:
    """A kind's record in the first step and in the second, alike, verify each other (two
    occurrences that agree, as ``ActionMemo`` verifies a kind within a step)."""
    for (name, role, step), e in list(entries.items()):
        if step != 1 or e.bad:
            continue
        e2 = entries.get((name, role, 2))
        if e2 is not None and not e2.bad and _same(e.rec, e2.rec):
            e.verified = e2.verified = True


def tapes(schedule, rank: int) -> bool:
    """Whether ``taped_rank`` takes the rank: a schedule it tapes, a list long enough that
    its shortened replays (or a template's compile) cost more."""
    return (schedule.name in TAPED and len(schedule.orders[rank]) >= MIN_ACTIONS
            and enabled())


def taped_rank(model, training, schedule, rank: int, device: str = "cuda"
               ) -> StagePeak | None:
    """The rank's replayed step (first and steady windows' peaks) with its action loop taped;
    None where the tape does not apply (the caller replays the rank's shortened lists)."""
    if not tapes(schedule, rank):
        return None
    entries = _records(model, training, schedule, device, rank)
    if entries is None:
        return None
    m = TraceMachine()
    # (no action list: the loop reads the rank's action columns)
    prog = PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                               actions=[], microbatches=schedule.microbatches,
                               compress_blocks=True, one_receive_buffer=True)
    prog.memo = ActionMemo(entries, kind_roles(schedule, rank, model))
    prog.tape = loop
    try:
        wanted = prog.step_windows()
    except (NotTaped, Unmemoizable):
        return None
    rows, meta = m.trace()
    return StagePeak(rank, prog.stages, *[first_highest(rows, meta, w) for w in wanted])
