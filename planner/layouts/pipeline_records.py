"""A pipeline action's record: what composing it needs, and the gradients a first backward makes.

A composed action (planner/layouts/pipeline_actions.py) stands in for an action by its record
(``_Rec``): the rows it drew relative to its start, their op names and phases, its net bytes per
category, and what it hands on (``_Handed``: a forward's output and loss, a backward's input
gradient). Two records are alike when ``_same`` says so, polynomial sizes term by term.

The step's first backward of each stage (B, or a split backward's I and W) is also what makes the
stage's parameter gradients (AccumulateGrad steals the first incoming gradient of each ``.grad``
that is None: planner/machine/stepsim.py) and the stood-in blocks' gradients
(``ReferenceProgram._phantom_forward``), which live on to ``zero_grad``. Its record lists them
(``made``): per gradient, where it goes (a parameter by its name, a block's index counted from
the stage's first block; or a phantom's window within the stage) and its size, category and
name. A composed first backward makes each of them as a storage of the recorded size, attached
where the replay attached it, without a row (the recorded rows hold its bytes already); the
caller then checks that the live bytes come to the record's net, as for every composed action.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.layouts.pipeline_machines import _nonzero, _Recording
from planner.machine.stepsim import _INDEX, Buf
from planner.machine.symbolic import MPoly, _Exact
from planner.step.ops import T

__all__ = ["attach", "backs_ready", "forward_rest", "made_since", "plain", "silent", "snapshot"]


# Sizes may be polynomials (a structure's compile, planner/layouts/pipeline_structure.py): the
# checks below hold for every size or fail (never a decision at the witness, never a guard).
def _maybe_negative(d) -> bool:
    return not d._cmp(0)[1] if isinstance(d, _Exact) else d < 0


def _differ(a, b) -> bool:
    for x, y in zip(a, b):
        d = x - y
        if d if d.__class__ is int else _nonzero(d):
            return True
    return False


def _same(x, y) -> bool:
    """Two records' values equal as written (polynomials term by term, a polynomial never
    equal to a number)."""
    if x is y:
        return True
    if isinstance(x, _Exact) or isinstance(y, _Exact):
        return type(x) is type(y) and x.t == y.t
    if isinstance(x, tuple):
        if not isinstance(y, tuple) or len(x) != len(y):
            return False
        for a, b in zip(x, y):  # (rows: tuples of ints and polynomials, compared in place)
            if a is b:
                continue
            ta = a.__class__
            if ta is not b.__class__:
                if not _same(a, b):
                    return False
            elif ta is int:
                if a != b:
                    return False
            elif ta is MPoly:
                if a.t != b.t:
                    return False
            elif not _same(a, b):
                return False
        return True
    if isinstance(x, (_Handed, _Rec)):
        if "_plain" in x.__dict__ and "_plain" in getattr(y, "__dict__", ()):
            return type(x) is type(y) and x == y  # (ints and names alone: as tuples)
        return type(x) is type(y) and all(_same(getattr(x, f), getattr(y, f))
                                          for f in x.__dataclass_fields__)
    return type(x) is type(y) and x == y


@dataclass(frozen=True)
class _Handed:
    """A storage an action hands on: size, category, name, element count, element size and the
    references its autograd graph keeps beyond the program's own."""

    nbytes: int
    cat: str
    name: str
    numel: int
    esz: int
    graph_refs: int


@dataclass(frozen=True)
class _Rec:
    rows: tuple
    names: tuple
    net: tuple
    out: _Handed | None = None
    loss: _Handed | None = None
    recv_refs: int = 0
    grad: tuple | None = None  # the backward's input gradient: (nbytes, cat, name)
    sent: int = 0  # the forward's output kept by a send work until the action loop ends
    made: tuple = ()  # a first backward's gradients (below)
    local: bool = False  # a forward's output is the next stage's input on the rank (V shape)


def plain(rec: _Rec, m) -> _Rec:
    """``rec``, marked where ``m`` is not the recording machine (every size an int, every name
    a string): ``_same`` compares two such records as tuples (at C speed, the same answer);
    on the recording machine, with the log it was made from (``memo_recorded``)."""
    if not isinstance(m, _Recording):
        object.__setattr__(rec, "_plain", True)
    else:
        object.__setattr__(rec, "_log", m.recorded_log)
    return rec


@dataclass
class _Entry:
    rec: _Rec
    verified: bool = False
    bad: bool = False


def _handed(t: T, own: int) -> _Handed:
    return _Handed(t.buf.nbytes, t.buf.cat, t.buf.name, t.numel, t.esz, t.buf.refs - own)


def _backward_kinds(actions: list) -> tuple[dict, set, dict]:
    """Per (stage, micro-batch) of a list, the kinds of the backward actions that take it back,
    as ``ActionMemo`` keys them (a stage's first of a kind in a step ``0``-suffixed; on the
    first stage a W runs a B and an I nothing); the stages taking micro-batches back by B
    and by I; and per (stage, kind) the micro-batches of its later occurrences (not the
    first), in list order."""
    seen: dict = {}
    out: dict = {}
    by: dict = {}
    later: dict = {}
    for kind, st, j, _ in actions:
        if kind in ("F", "|") or (st == 0 and kind == "I"):
            continue
        if st == 0 and kind == "W":
            kind = "B"
        c = seen.get((kind, st), 0)
        seen[kind, st] = c + 1
        out.setdefault((st, j), []).append(kind if c else kind + "0")
        by.setdefault(st, set()).add(kind)
        if c:
            later.setdefault((st, kind), []).append(j)
    return out, {st for st, ks in by.items() if "B" in ks and "I" in ks}, later


def replayed_forward(prog, st: int, j: int) -> None:
    """Note that this step's forward of micro-batch ``j`` of stage ``st`` ran op by op (its
    backward is then replayed and recorded too: ``backs_ready``)."""
    got = prog.__dict__.get("_fwd")
    if got is None or got[0] != prog.step_no:
        got = prog._fwd = (prog.step_no, set())
    got[1].add((st, j))


def _in_time(entries: dict, prog, st: int, j: int, kind: str, role, later: dict) -> bool:
    """Whether kind ``kind`` (not a step's first) of stage ``st`` is verified by the time it
    takes micro-batch ``j`` back: its occurrences before that one whose forwards ran op by op
    this step (those backwards are replayed and recorded) are two, or one where the last step
    verified the kind (the first agreeing occurrence then verifies it). A prediction: where
    the records disagree, the composed backward raises ``Unmemoizable`` and the caller replays
    op by op."""
    e = entries.get((kind, role, prog.step_no))
    if e is not None and e.bad:
        return False
    last = entries.get((kind, role, prog.step_no - 1))
    need = 1 if last is not None and last.verified else 2
    got = prog.__dict__.get("_fwd")
    ran = got[1] if got is not None and got[0] == prog.step_no else ()
    for jj in later.get((st, kind), ()):
        if jj == j:
            return False
        if (st, jj) in ran:
            need -= 1
            if need <= 0:
                return True
    return False


def backs_ready(entries: dict, prog, st: int, j: int, role) -> bool:
    """Whether to compose a forward of micro-batch ``j`` of stage ``st`` whose kind is verified
    (``entries``: an ``ActionMemo``'s): its backward is composed too, so the kinds that take it
    back must be verified by then. A step's first backward of a stage (``B0``, ``I0``, ``W0``)
    and the backwards of a stage that takes some micro-batches back by B and others by I and W
    (DualPipeV) must be verified already; the others are, by the two replayed before them (else
    ``Unmemoizable``: every action op by op); where stages of the rank share a role, every
    kind must be verified already."""
    got = prog.__dict__.get("_backs")
    if got is None:
        roles = prog.memo.roles if prog.memo is not None else {}
        # stages of the rank sharing a role (planner/layouts/pipeline_tape.py): another stage's
        # backwards may be the kind's first, so every kind must be verified already
        shared = len(set(roles.values())) < len(roles)
        got = prog._backs = (*_backward_kinds(prog.actions), shared)
    need, mixed, later, shared = got
    kinds = need.get((st, j), ())
    if st not in mixed and not shared and not any(k[-1] == "0" for k in kinds):
        return True
    for k in kinds:
        e = entries.get((k, role, prog.step_no))
        if e is not None and e.verified:
            continue
        # a mixed stage's later kinds: verified in time by the occurrences replayed before
        if shared or k[-1] == "0" or not _in_time(entries, prog, st, j, k, role, later):
            return False
    return True


def forward_rest(rec: _Rec) -> tuple[tuple, bool]:
    """What a composed forward leaves beyond its output and loss, per category (its graph's
    saved tensors: one stand-in each; the live bytes grew by the output and loss alone), and
    whether any of it may be negative."""
    net = list(rec.net)
    for h in (rec.out, rec.loss):
        if h is not None:
            net[_INDEX[h.cat]] -= h.nbytes
    return tuple(net), any(_maybe_negative(d) for d in net)


def silent(m, nbytes, cat: str, name: str) -> Buf:
    """A storage made live without a row (the bytes were in the recorded rows already)."""
    b = Buf(nbytes, cat, name)
    b.refs = 1
    m.memo_silent(nbytes, cat)
    return b


def _leaves(prog) -> list:
    """The rank's parameters that take a gradient, in order (kept with the program)."""
    got = prog.__dict__.get("_first_leaves")
    if got is None:
        got = prog._first_leaves = [t.val.fn for t in prog.trainable()]
    return got


def snapshot(prog) -> tuple:
    """What ``made_since`` compares against: the parameters without a gradient and the
    phantoms' gradients, now."""
    return ({id(leaf) for leaf in _leaves(prog) if leaf.grad is None},
            set(prog._phantom_grads))


def _block_moved(name: str, by: int) -> str:
    """A block's parameter name with its block index moved by ``by`` (others as they are): a
    stage's first block is 0 in a record (``by`` minus the stage's first block), and back."""
    if name[:1] == "b" and name[1:2].isdigit():
        i, rest = name[1:].split(".", 1)
        return f"b{int(i) + by}.{rest}"
    return name


def made_since(prog, st: int, snap: tuple) -> tuple:
    """The gradients made since ``snap`` (``snapshot``), as a record lists them."""
    none, phantoms = snap
    made = [("g", _block_moved(leaf.name, -prog.bounds[st]), leaf.grad.nbytes, leaf.grad.cat,
             leaf.grad.name)
            for leaf in _leaves(prog) if id(leaf) in none and leaf.grad is not None]
    for key, b in prog._phantom_grads.items():
        if key not in phantoms:
            if type(key) is not tuple or key[0] != st:
                made.append(("?", key, b.nbytes, b.cat, b.name))  # never composed
            else:
                made.append(("p", key[1:], b.nbytes, b.cat, b.name))
    return tuple(made)


def attach(prog, st: int, made: tuple) -> bool:
    """Make the recorded gradients on stage ``st`` (False: one has nowhere to go, or its place
    holds one already; nothing is made then)."""
    by = prog.__dict__.get("_first_by_name")
    if by is None:
        by = prog._first_by_name = {leaf.name: leaf for leaf in _leaves(prog)}
    places = []
    for where, key, nbytes, cat, name in made:
        if where == "g":
            leaf = by.get(_block_moved(key, prog.bounds[st]))
            if leaf is None or leaf.grad is not None:
                return False
            places.append((leaf, None))
        elif where == "p":
            k = (st, *key)
            if k in prog._phantom_grads:
                return False
            places.append((None, k))
        else:
            return False
        if cat not in _INDEX:
            return False
    m = prog.m
    for (leaf, k), (_, _, nbytes, cat, name) in zip(places, made):
        b = silent(m, nbytes, cat, name)
        if leaf is not None:
            leaf.grad = b
        else:
            prog._phantom_grads[k] = b
    return True
