"""A pipeline rank's actions replayed once per kind and composed in integer arithmetic.

Every forward of a stage runs the same op program on the same shapes, and so does every
backward once the stage's parameters have their ``.grad`` (the first backward of each step
makes them). So the live bytes at each allocation inside an action, relative to the live bytes
when it starts, are the same for every action of one kind; what the action leaves behind (its
net bytes per category) too. ``ActionMemo`` replays a kind op by op until two occurrences agree
on all of that (rows, op names, phases, net bytes, and the storages the action hands on; one of
them may be the last step's), and from then on composes each further occurrence:

- the rows the trace machine (``planner/layouts/pipeline_replays.py``: ``TraceMachine``) would
  record are the start's live bytes plus the recorded relative rows, with the recorded op names
  and phases;
- what the action leaves behind stands in as a few storages of the recorded sizes: a
  forward's output and loss (which the schedule's bookkeeping holds and frees on its own:
  ``latest``, the 1F1B warm-up's ``send_work``, ``output_chunks``, ``_internal_losses``), the
  references its autograd graph keeps to them and to the receive buffer, and the rest of what
  the graph saves, one storage per category; a composed backward frees them, hands on an input
  gradient of the recorded size, and must come to the recorded net bytes (else ``Unmemoizable``
  and the caller replays op by op).

Kinds are ``(forward or backward, stage role, step)`` (``pipeline_replays.stage_roles``: place
on the rank, first or last stage, layer count, neighbours), and a composed forward's backward is
composed too. The step's first action of each kind is a kind of its own (``F0``, ``B0``, ``I0``,
``W0``): a first backward makes the stage's gradients and the phantom blocks', which its record
lists by name within the stage and a composed one makes as recorded (pipeline_records.py); it
occurs once per step and list, so its occurrences in the two steps, two lists, or two ranks
holding a stage of that role verify it. Schedule1F1B, ScheduleGPipe, interleaved 1F1B (a
forward's send work keeps its output until the action loop ends, as the composed one does),
ZB-H1, ZB-H2, ZB-V and DualPipeV are composed; at the V's turn a forward's output becomes the
next stage's input buffer on the rank, and a backward's input gradient the previous stage's
gradient receive buffer, which a composed one does alike. A split backward's halves are kinds of
their own: a composed forward's I draws its candidate row, drops the graph's stand-ins, hands
on an input gradient of the recorded size (kept as the receive buffer's ``.grad`` too) and
leaves what the recorded I left until W (kept gradients, retained saved tensors) as one storage
per category; its W frees them and must come to the recorded W's net bytes. A forward is
composed only where the backward kinds that take its micro-batch back are verified or will be by
the time they come (``backs_ready``; DualPipeV takes some micro-batches of a stage back by B and
others by I and W: there, by the occurrences replayed before its own, ``_in_time``, a
prediction that raises ``Unmemoizable`` where the records disagree). A setup's rank classes
share the records (``pipeline_replays._KINDS``). The machine draws a composed action's rows
(pipeline_machines.py): the trace machine its first highest row, a structure compile's
recording machine (sizes as polynomials; a layout's compiles share a record per kind:
pipeline_kind_records) every mark that can be the highest for some sizes. DualPipe replays
every action. ``op_by_op()`` turns composing off (tests/test_pipeline_actions.py and
tests/test_pipeline_compose_compile.py hold both to the full replay to the byte).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from planner.layouts.pipeline_machines import _nonzero, _Recording
from planner.layouts.pipeline_records import (
    _differ,
    _Entry,
    _handed,
    _maybe_negative,
    _Rec,
    _same,
    attach,
    backs_ready,
    forward_rest,
    made_since,
    plain,
    replayed_forward,
    silent as _silent,
    snapshot,
)
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, Val
from planner.step.ops import T

__all__ = ["ActionMemo", "Unmemoizable", "enabled", "op_by_op"]

_ENABLED = True
_COMPOSED = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")


class Unmemoizable(Exception):
    """A composed action missed its recorded net bytes (or its pairing broke): op by op."""


@contextlib.contextmanager
def op_by_op():
    """Inside, every action is replayed op by op (not thread-safe: a module setting)."""
    global _ENABLED
    was, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = was


def enabled() -> bool:
    return _ENABLED


@dataclass
class _Proxy:  # a composed forward's pending micro-batch
    out: T
    inp: T | None
    loss: T | None
    holds: list = field(default_factory=list)  # the graph's references and saved storages
    graph_out: int = 0  # of them, references to the output


class ActionMemo:
    """Per-kind records of one rank class's actions (see the module docstring)."""

    def __init__(self, entries: dict | None = None, roles: dict | None = None) -> None:
        """``entries``: records shared with the setup's other ranks, keyed by ``roles`` (stage
        -> what its actions depend on: pipeline_replays.stage_roles; else the stage's index)."""
        self.entries: dict[tuple, _Entry] = {} if entries is None else entries
        self.roles = roles or {}
        self.composed = 0  # actions composed rather than replayed
        self._plans: dict[int, tuple] = {}  # id(record) -> (record, what the machine draws)
        # a polynomial record's plan per (op, phase) names: [(rows, plan)], for records alike
        self._drawn: dict[tuple, list] = {}
        self._rests: dict[int, tuple] = {}  # id(record) -> (record, forward_rest(record))

    @staticmethod
    def applies(prog) -> bool:
        m = prog.m
        return (_ENABLED and prog.sched.name in _COMPOSED
                and getattr(m, "on_alloc", None) is None and hasattr(m, "memo_start"))

    # ---- the hooks --------------------------------------------------------------------------
    def forward(self, prog, st: int, j: int) -> None:
        role = self.roles.get(st, st)
        # the step's first of its kind on the stage: a kind of its own (counted per stage: two
        # stages of a rank may share a role, planner/layouts/pipeline_tape.py)
        first = prog.count(("F", st, prog.step_no)) == 0
        key = ("F0" if first else "F", role, prog.step_no)
        e = self.entries.get(key)
        if e is not None and e.verified and backs_ready(self.entries, prog, st, j, role):
            return self._compose_forward(prog, st, j, e.rec)
        replayed_forward(prog, st, j)
        self._note(key, self._record(prog, lambda: prog.real_forward(st, j), st, j, "F", key))

    def backward(self, prog, st: int, j: int) -> None:
        self._backward(prog, st, j, "B", prog.real_backward, self._compose_backward)

    def backward_input(self, prog, st: int, j: int) -> None:
        """I of a split backward (nothing on the first stage)."""
        if st == 0:
            return prog.real_backward_input(st, j)
        self._backward(prog, st, j, "I", prog.real_backward_input, self._compose_input)

    def backward_weight(self, prog, st: int, j: int) -> None:
        """W of a split backward (the whole backward on the first stage: a "B" kind)."""
        if st == 0:
            return prog.real_backward_weight(st, j)
        self._backward(prog, st, j, "W", prog.real_backward_weight, self._compose_weight)

    def _backward(self, prog, st: int, j: int, kind: str, real, compose) -> None:
        """A backward kind (B, I or W; the step's first of a stage a kind of its own, the one
        that makes the gradients): composed after a composed forward, else replayed and
        recorded."""
        key = (kind, self.roles.get(st, st), prog.step_no)
        if prog.count((kind, st, prog.step_no)) == 0:
            key = (kind + "0", *key[1:])
        e = self.entries.get(key)
        p = prog.pending[st, j]
        if isinstance(p, _Proxy):
            if e is None or not e.verified:
                raise Unmemoizable(key)
            return compose(prog, st, j, p, e.rec)
        self._note(key, self._record(prog, lambda: real(st, j), st, j, kind, key))

    def _note(self, key, rec: _Rec) -> None:
        e = self.entries.get(key)
        if e is None:  # verified at once where it equals the last step's (both verified)
            last = self.entries.get((*key[:2], key[2] - 1))
            ok = last is not None and not last.bad and _same(last.rec, rec)
            self.entries[key] = _Entry(rec, ok)
            if ok:
                last.verified = True
        elif not e.verified and not e.bad:
            e.verified, e.bad = (True, False) if _same(e.rec, rec) else (False, True)

    # ---- recording --------------------------------------------------------------------------
    def _record(self, prog, run, st: int, j: int, kind: str, key=None) -> _Rec:
        """Replay the action op by op and record it, its rows left as a composed one leaves
        them (the machine's draw kept for later compositions); the record of ``key`` it may
        equal (the kind's, the last step's) lends its rows to an alike log (memo_recorded)."""
        e = None if key is None else self.entries.get(key) or self.entries.get(
            (*key[:2], key[2] - 1))
        plans: list = []
        rec = plain(self._replayed(prog, run, st, j, kind, plans,
                                   None if e is None or e.bad else e.rec), prog.m)
        if plans:
            self._plans[id(rec)] = (rec, plans[0])
        return rec

    def _replayed(self, prog, run, st: int, j: int, kind: str, plans: list, like) -> _Rec:
        m = prog.m
        n0 = m.memo_start()
        start = list(m.cur)
        recv = prog.recv.get((st, j))
        recv_before = recv.refs if recv is not None else 0
        sends_before = len(prog.sends)
        out_buf = prog.pending[st, j].out.buf if kind == "B" else None
        snap = snapshot(prog) if kind != "F" else None
        on = prog.sched.stage_to_rank
        # V shape: the input gradient goes to the previous stage on the rank, the output to the
        # next (their receive buffers, kept until the next step replaces them)
        back_local = st > 0 and on[st - 1] == prog.rank
        given = prog.grad_recv.get((st - 1, j)) if back_local else None
        run()
        made = made_since(prog, st, snap) if snap is not None else ()
        rows, names, net = m.memo_recorded(n0, start, like)
        plans.append(self._plan(m, rows, names))  # as a composed action leaves them
        m.memo_replace(n0, rows, names, start, plans[0], net)
        if kind == "W":
            return _Rec(rows, names, net, made=made)
        if kind != "F":
            grad = None
            if back_local and prog.grad_recv.get((st - 1, j)) is not given:
                g = prog.grad_recv[st - 1, j]
                grad = (g.nbytes, g.cat, g.name) if len(prog.sends) == sends_before else ("?",)
            elif len(prog.sends) == sends_before + 1:
                g = prog.sends[-1]
                grad = (g.nbytes, g.cat, g.name)
            elif len(prog.sends) != sends_before:
                grad = ("?",)  # never composed: two records of it differ from any compose
            if out_buf is not None and out_buf.refs:  # held on (1F1B's warm-up send work): recorded as if freed
                net = list(net)
                net[_INDEX[out_buf.cat]] -= out_buf.nbytes
                net = tuple(net)
            return _Rec(rows, names, net, grad=grad, made=made)
        p = prog.pending[st, j]
        last = st == prog.sched.num_stages - 1
        own = 1 + (1 if last else 0)  # p.out (p.loss) and the output_chunks (losses) view
        sent = len(prog.sends) - sends_before  # the send work keeping the output (interleaved)
        local = st + 1 < len(on) and on[st + 1] == prog.rank
        out = _handed(p.out, own + sent + local)
        loss = _handed(p.loss, own) if p.loss is not None else None
        recv_refs = (recv.refs - recv_before - 1) if (recv is not None and p.inp is not None) else 0
        return _Rec(rows, names, net, out, loss, recv_refs, sent=sent, local=local)

    def _plan(self, m, rows: tuple, names: tuple):
        """``m.memo_plan(rows, names)``; on the recording machine (rows of polynomials, whose
        plan prunes them pairwise) the plan of an earlier record with equal rows and names."""
        if not isinstance(m, _Recording):
            return m.memo_plan(rows, names)
        alike = self._drawn.setdefault(names, [])
        for r, plan in alike:
            if _same(r, rows):
                return plan
        plan = m.memo_plan(rows, names)
        alike.append((rows, plan))
        return plan

    # ---- composing --------------------------------------------------------------------------
    def _rows(self, m, rec: _Rec) -> list:
        """The action's rows drawn from the live bytes now (the machine's ``memo_emit``: the
        trace machine keeps the first highest alone); the live bytes at the action's start."""
        got = self._plans.get(id(rec))
        if got is None or got[0] is not rec:
            got = self._plans[id(rec)] = (rec, m.memo_plan(rec.rows, rec.names))
        start = list(m.cur)
        m.memo_emit(rec.rows, rec.names, start, got[1])
        return start

    def _compose_forward(self, prog, st: int, j: int, rec: _Rec) -> None:
        m, o = prog.m, prog.ops
        m.phase = "forward"
        self.composed += 1
        start = self._rows(m, rec)
        holds: list = []
        out_b = _silent(m, rec.out.nbytes, rec.out.cat, rec.out.name)
        out = T(Val(out_b, None), rec.out.numel, rec.out.esz)
        holds += [m.hold(out_b) for _ in range(rec.out.graph_refs)]
        if rec.local:  # the next stage's input buffer on the rank (the last step's goes)
            old, prog.recv[st + 1, j] = prog.recv[st + 1, j], m.hold(out_b)
            m.drop(old)
        if rec.sent:
            if rec.sent != 1:
                raise Unmemoizable(("F", st, "sends"))
            prog.sends.append(m.hold(out_b))
        inp = None
        if st > 0:
            buf = prog.recv[st, j]
            inp = T(Val(m.hold(buf), None), rec.out.numel, rec.out.esz)
            holds += [m.hold(buf) for _ in range(rec.recv_refs)]
        loss = None
        if rec.loss is not None:
            lb = _silent(m, rec.loss.nbytes, rec.loss.cat, rec.loss.name)
            loss = T(Val(lb, None), rec.loss.numel, rec.loss.esz)
            holds += [m.hold(lb) for _ in range(rec.loss.graph_refs)]
        m.phase = "other"
        if st == prog.sched.num_stages - 1:
            prog.output_chunks.append(o.view(out))
            prog.losses.append(o.view(loss))
        if rec.local:
            rest = [n - (c - s) for n, c, s in zip(rec.net, m.cur, start)]
            if any(_maybe_negative(d) for d in rest):
                raise Unmemoizable(("F", st))
            rest = [(CATEGORIES[i], d) for i, d in enumerate(rest) if _nonzero(d)]
        else:  # the live bytes grew by the output and loss alone
            rest = self._rest(rec)
            if rest is None:
                raise Unmemoizable(("F", st))
        for cat, d in rest:
            holds.append(_silent(m, d, cat, "saved (composed)"))
        prog.pending[st, j] = _Proxy(out, inp, loss, holds, rec.out.graph_refs)
        prog.in_flight += 1

    def _rest(self, rec: _Rec) -> list | None:
        """(category, nonzero bytes) a forward of ``rec`` leaves beyond its output and loss
        (``forward_rest``); None where one may be negative."""
        got = self._rests.get(id(rec))
        if got is None or got[0] is not rec:
            rest, negative = forward_rest(rec)
            got = self._rests[id(rec)] = (rec, None if negative else [
                (CATEGORIES[i], d) for i, d in enumerate(rest) if _nonzero(d)])
        return got[1]

    def _begin_backward(self, prog, st: int, j: int, p: _Proxy, rec: _Rec, done: bool) -> list:
        """A composed backward kind's start: its candidate row drawn, the stand-ins the
        proxy holds dropped (``done``: its micro-batch's last backward action); the live bytes
        at the start."""
        m = prog.m
        m.phase = "backward"
        self.composed += 1
        start = self._rows(m, rec)
        if done:
            del prog.pending[st, j]
        m.drop(*p.holds)
        p.holds = []
        return start

    def _compose_backward(self, prog, st: int, j: int, p: _Proxy, rec: _Rec) -> None:
        m = prog.m
        start = self._begin_backward(prog, st, j, p, rec, done=True)
        _made(prog, st, rec, "B")
        gi = _input_grad(m, rec, ("B", st))
        prog._release(p)
        m.phase = "other"
        if gi is not None:  # (on the rank, V shape: the last step's goes)
            prog._hand_back(st, j, gi)
        want = list(rec.net)
        if p.out.buf.refs:
            # the schedule's bookkeeping holds this output (1F1B's warm-up send work) or not:
            # its bytes go later or sooner, at the action's end (after its last allocation,
            # when the graph kept no reference to it: the rows are the same)
            if p.graph_out:
                raise Unmemoizable(("B", st, "output held"))
            want[_INDEX[p.out.buf.cat]] += p.out.buf.nbytes
        if _differ([a - b for a, b in zip(m.cur, start)], want):
            raise Unmemoizable(("B", st))

    def _compose_input(self, prog, st: int, j: int, p: _Proxy, rec: _Rec) -> None:
        """I on a composed forward: the graph's references and saved storages give way to what
        the recorded I leaves until W (kept gradients, retained saved tensors), one storage per
        category; the input gradient is handed on; the output and loss are detached."""
        m = prog.m
        start = self._begin_backward(prog, st, j, p, rec, done=False)
        _made(prog, st, rec, "I")
        gi = _input_grad(m, rec, ("I", st))
        prog.ops.drop(p.out, p.loss)
        p.out = p.loss = None
        m.phase = "other"
        if gi is not None:
            prog.input_grads.append(gi)
            prog._hand_back(st, j, m.hold(gi))
        for i, d in enumerate(n - (c - s) for n, c, s in zip(rec.net, m.cur, start)):
            if _maybe_negative(d):
                raise Unmemoizable(("I", st))
            if _nonzero(d):
                p.holds.append(_silent(m, d, CATEGORIES[i], "kept for W (composed)"))

    def _compose_weight(self, prog, st: int, j: int, p: _Proxy, rec: _Rec) -> None:
        """W on a composed forward: what I left goes, with the receive buffer's reference; the
        live bytes must come to the recorded W's."""
        m = prog.m
        start = self._begin_backward(prog, st, j, p, rec, done=True)
        _made(prog, st, rec, "W")
        prog.ops.drop(p.inp)
        prog.in_flight -= 1
        m.phase = "other"
        if _differ([a - b for a, b in zip(m.cur, start)], rec.net):
            raise Unmemoizable(("W", st))


def _made(prog, st: int, rec: _Rec, kind: str) -> None:
    """A composed first backward's gradients, made where the recorded one made them."""
    if rec.made and not attach(prog, st, rec.made):
        raise Unmemoizable((kind, st, "gradients"))


def _input_grad(m, rec: _Rec, kind: tuple) -> Buf | None:
    """The input gradient a composed backward hands on, of the recorded size (None: none)."""
    if rec.grad is None:
        return None
    if len(rec.grad) != 3:  # the recorded backward handed on more than one
        raise Unmemoizable(kind)
    return _silent(m, *rec.grad)
