"""The verified action records of a pipeline layout's rank compiles, shared between them.

A rank structure's compile (planner/layouts/pipeline_structure.py) composes the repeated
actions of its shortened lists per kind (planner/layouts/pipeline_actions.py): a kind's actions
are replayed op by op and recorded until two agree, and then composed. A kind is (forward,
backward, I or W; the stage's role; the step), and the ranks of one layout hold stages of the
same roles (pp 8 1F1B: six ranks of middle stages), as do the compiles of one rank for other
micro-batch counts: the concrete replay
shares the kinds' records between the rank classes of a setup (``pipeline_replays._KINDS``) on
the same argument, and so do the compiles here: a compile composes every action of a kind a
compile of the layout verified before. The step's first action of a kind (a kind of its own,
the one that makes the gradients) occurs once per step and list: its record goes to the store
unverified, and the next compile whose own record equals it verifies it (then composed by the
compiles after), so a layout's later compiles replay no action op by op.

A record's sizes are polynomials in the model's dimensions over its compile's ``Space``; they
are kept here over the dimensions alone (the compiles differ in their period variables, which
no action's sizes contain) and bound to the importing compile's space; a record is kept with
the marks a composed action draws (its plan), without the rows they were chosen from. What a
compile decided at its witness that the domain leaves open (its guards) travels with its
records: a compile whose witness answers every one of those decisions alike imports them and
takes them as its own guards (the template then admits only models that decide them alike
too; a superset of what the records' own replays decided, so never a wrong answer), else it
replays as before. A guard is evaluated here as ``Space.guess`` evaluates it at its witness.
``tests/test_pipeline_kind_records.py`` holds templates compiled with shared records equal to
ones compiled alone and to the replay.
"""

from __future__ import annotations

import dataclasses

from planner.layouts.pipeline_actions import ActionMemo
from planner.layouts.pipeline_records import _Entry, _Handed, _Rec
from planner.machine import cache
from planner.machine.cache import _put
from planner.machine.symbolic import MPoly, Space

__all__ = ["SharedKinds", "clear"]

_STORE: dict[tuple, dict] = {}  # layout key -> kind -> (record, plan, guards, verified)
_MAX = 64  # layouts (a layout's kinds: a few hundred KiB)
COUNTS = {"imported": 0, "exported": 0}


_NAMES = frozenset({"names", "cat", "name"})  # a record's fields of names only: kept as they are


class _Terms(tuple):
    """A polynomial's terms over the dimensions alone, detached from any space."""


class _Foreign(Exception):
    """A record or guard that is not over the dimensions alone: not shared."""


def _detach(x, nb: int):
    if isinstance(x, MPoly):
        items = []
        for e, c in x.t.items():
            if any(e[nb:]):
                raise _Foreign
            items.append((e[:nb], c))
        return _Terms(items)
    if type(x) is tuple or type(x) is list:
        return type(x)(_detach(v, nb) for v in x)
    if isinstance(x, (_Rec, _Handed)):
        return dataclasses.replace(x, **{f: _detach(getattr(x, f), nb)
                                         for f in x.__dataclass_fields__ if f not in _NAMES})
    return x


def _bind(x, sp: Space, pad: tuple):
    if isinstance(x, _Terms):
        return MPoly({e + pad: c for e, c in x}, sp)
    if type(x) is tuple or type(x) is list:
        return type(x)(_bind(v, sp, pad) for v in x)
    if isinstance(x, (_Rec, _Handed)):
        return dataclasses.replace(x, **{f: _bind(getattr(x, f), sp, pad)
                                         for f in x.__dataclass_fields__ if f not in _NAMES})
    return x


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _at(terms, values: tuple) -> int:
    v = 0
    for e, c in terms:
        for x, p in zip(values, e):
            if p:
                c *= x ** p
        v += c
    return v


class SharedKinds:
    """One compile's view of its layout's shared records: ``into(memo)`` before its replays,
    ``keep(memo)`` after them (its verified kinds, with its guards)."""

    def __init__(self, layout: tuple, sp: Space, nb: int) -> None:
        self.layout, self.sp, self.nb = layout, sp, nb
        self.imported: dict = {}  # kind -> whether it came verified

    def into(self, memo: ActionMemo) -> None:
        kinds = _STORE.get(self.layout)
        if not kinds:
            return
        sp, nb = self.sp, self.nb
        wit = tuple(sp.witness[:nb])
        pad = (0,) * (sp.n - nb)
        roles = set(memo.roles.values())
        held: dict[int, bool] = {}  # id(guards) -> whether the witness decides them alike
        for kind, (rec, plan, guards, verified) in list(kinds.items()):
            if kind[1] not in roles:  # a stage this rank does not hold
                continue
            ok = held.get(id(guards))
            if ok is None:
                ok = held[id(guards)] = all(_sign(_at(t, wit)) == s for t, s in guards)
                if ok:
                    for t, sign in guards:
                        terms = {e + pad: c for e, c in t}
                        sp.guards[frozenset(terms.items())] = (terms, sign)
            if not ok:
                continue
            bound = _bind(rec, sp, pad)
            if plan is not None:  # a composed action draws its plan (the rows were not kept)
                memo._plans[id(bound)] = (bound, _bind(plan, sp, pad))
            memo.entries[kind] = _Entry(bound, verified=verified)
            self.imported[kind] = verified
            COUNTS["imported"] += 1

    def keep(self, memo: ActionMemo) -> None:
        nb = self.nb
        def wanted(kind, e) -> bool:
            if e.bad:
                return False
            if kind in self.imported:  # verified here where it came unverified
                return e.verified and not self.imported[kind]
            # a step's first action of a kind occurs once per step and list: recorded once,
            # it goes as it is, for a compile of another rank or count to verify
            return e.verified or kind[0][-1:] == "0"
        new = [(kind, e) for kind, e in memo.entries.items() if wanted(kind, e)]
        if not new:
            return
        try:
            guards = tuple((_detach(MPoly(t, self.sp), nb), sign)
                           for t, sign in self.sp.guards.values())
        except _Foreign:
            return
        kinds = _STORE.get(self.layout)
        for kind, e in new:
            got = memo._plans.get(id(e.rec))
            plan = got[1] if got is not None and got[0] is e.rec else None
            try:  # with its plan, a verified record's rows are not read again: not kept (a
                # record to verify is compared row by row)
                rec = _detach(e.rec if plan is None or not e.verified
                              else dataclasses.replace(e.rec, rows=()), nb)
                plan = None if plan is None else _detach(plan, nb)
            except _Foreign:
                continue
            if kinds is None:
                kinds = {}
                _put(_STORE, self.layout, kinds, _MAX)
            if not e.verified and kind in kinds:  # never in place of one kept before
                continue
            kinds[kind] = (rec, plan, guards, e.verified)
            COUNTS["exported"] += 1


def clear() -> None:
    _STORE.clear()


cache.on_clear(clear)
