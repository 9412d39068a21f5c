"""Which recorded rows can be a window's peak, and their evaluation as generated Python.

A row is a vector of polynomial coefficients (constant first) over monomials ``b^i·t^j`` with
b, t >= 0 (or over a structure's sizes). The peak at (b, t) is the *first* row reaching the
largest value (the simulator keeps the first allocation that reaches a new high); which rows can
be it is decided by ``planner/machine/peak_pruning.py`` (``select``), and the rows left are
evaluated by generated Python: a handful of integer multiplications per row, exact at any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.machine.peak_pruning import select
from planner.machine.stepsim import PeakSnap

_LATER = object()  # a function compiled when first needed


@dataclass
class Candidates:
    """The rows of one window that can be its peak for some B, T, in event order."""

    exps: tuple[tuple[int, int], ...]
    key: list[tuple[int, ...]]  # coefficients of the maximised quantity, per row
    cats: list[list[tuple[int, ...]]]  # per row, per category: coefficients
    ops: list[str]
    phases: list[str]
    zero: bool = False  # an all-zero snapshot precedes the rows (act peak's initial value)
    # None: rows over (b, t) = (B - 2, T - 2); else the names of the sizes the rows are
    # polynomials in (over the sizes themselves: planner/machine/symbolic.py, MPoly)
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # The rows' polynomials as Python expressions in b and t, compiled once: evaluating a
        # template is then a handful of integer multiplications (exact, any size). Over (b, t)
        # when first asked: a step template reads most windows through ``fused_best`` alone.
        if self.names is None:
            self._best = _LATER
        else:  # one function: the largest row's value, index and categories
            self._best = _best_row_fn_n(self.names, self.exps, self.key, self.cats) \
                if self.key else None

    def ready(self) -> Candidates:
        """The window's own functions compiled now (a caller that will read it with ``best``,
        off the request path)."""
        if self._best is _LATER:  # (the categories first: another thread may read them)
            self._cats = [_poly_fn(self.exps, cats) for cats in self.cats]
            self._best = _argmax_fn(self.exps, self.key) if self.key else None
        return self

    def best(self, *v: int) -> PeakSnap:
        if self._best is _LATER:
            self.ready()
        if self._best is None:
            return PeakSnap()
        if self.names is not None:
            x, k, cats = self._best(*v)
            if self.zero and x <= 0:
                return PeakSnap()
            return PeakSnap(x, cats, self.ops[k], self.phases[k])
        x, k = self._best(*v)
        if self.zero and x <= 0:
            return PeakSnap()
        return PeakSnap(x, self._cats[k](*v), self.ops[k], self.phases[k])


def _expr(exps, vec) -> str:
    parts = [str(c) + "".join("*b" * i + "*t" * j) for c, (i, j) in zip(vec, exps) if c]
    return " + ".join(parts) or "0"


def _compiled(src: str):
    ns: dict = {}
    exec(compile(src, "<step template>", "exec"), ns)  # noqa: S102 - generated from integers
    return ns["f"]


def _poly_fn(exps, vecs: list[tuple[int, ...]]):
    """``f(b, t) -> list`` of the polynomials with coefficient vectors ``vecs`` over ``exps``."""
    return _compiled("def f(b, t):\n    return [" + ", ".join(_expr(exps, v) for v in vecs)
                     + "]\n")


def _argmax_fn(exps, vecs: list[tuple[int, ...]]):
    """``f(b, t) -> (largest value, index of the first row reaching it)``."""
    lines = ["def f(b, t):", f"    bv = {_expr(exps, vecs[0])}", "    bk = 0"]
    for k, v in enumerate(vecs[1:], 1):
        lines += [f"    v = {_expr(exps, v)}", "    if v > bv:", f"        bv = v; bk = {k}"]
    return _compiled("\n".join(lines + ["    return bv, bk", ""]))


def bt_monomials(cands: list[Candidates]):
    """(lines computing every monomial b^i·t^j the windows' rows use, once, as ``m0``,
    ``m1``, ...; ``expr(exps, vec)``: a row as a Python expression over them, b and t as they
    are), for the generated functions over (b, t)."""
    used = sorted({e for c in cands for v in [*c.key, *(x for cs in c.cats for x in cs)]
                   for k, e in zip(v, c.exps) if k and e[0] + e[1] > 1})
    mono = {(1, 0): "b", (0, 1): "t"}
    pro = []
    for n, (i, j) in enumerate(used):
        mono[(i, j)] = f"m{n}"
        pro.append(f"    m{n} = " + "*".join(["b"] * i + ["t"] * j))

    def expr(exps, vec) -> str:
        parts = [str(k) if e == (0, 0) else f"{k}*{mono[e]}" for k, e in zip(vec, exps) if k]
        return " + ".join(parts) or "0"
    return pro, expr


def fused_best(groups: list[list[Candidates]]):
    """``f(b, t) -> [[c.best(b, t) for c in group] for group in groups]`` as one generated
    function: every window's rows and its peak's categories inline, no call per window (a
    template answer evaluates a handful of windows; their calls were most of its cost). Rows
    over the sizes themselves (``names``) keep their own ``best``."""
    return _fused(groups, lambda w, k, cats: f"P(bv, [{', '.join(cats)}], o{w}[{k}], p{w}[{k}])",
                  "P()", lambda s: s)


def fused_totals(cands: list[Candidates]):
    """``f(b, t) -> [(total, op, phase) of c.best(b, t) for c in cands]``: as ``fused_best``
    without the categories (for a caller that reads a peak's total and instant alone)."""
    return _fused([cands], lambda w, k, cats: f"(bv, o{w}[{k}], p{w}[{k}])", "(0, '', '')",
                  lambda s: (s.total, s.op, s.phase), flat=True)


def _fused(groups, snap, empty: str, plain, flat: bool = False):
    """The generated function of ``fused_best`` (``snap(w, k, cats)``: the expression of window
    w's peak at its row k, ``cats`` the row's categories; ``empty``: a window without
    rows), or the windows' own ``best`` through ``plain`` where rows are over named sizes."""
    cands = [c for g in groups for c in g]
    if any(c.names is not None for c in cands):
        if flat:
            return lambda b, t: [plain(c.best(b, t)) for c in cands]
        return lambda b, t: [[plain(c.best(b, t)) for c in g] for g in groups]
    ns: dict = {"P": PeakSnap}
    pro, expr = bt_monomials(cands)
    lines = ["def f(b, t):", *pro]
    for w, c in enumerate(cands):
        if not c.key:
            lines.append(f"    s{w} = {empty}")
            continue
        ns[f"o{w}"], ns[f"p{w}"] = c.ops, c.phases
        lines += [f"    bv = {expr(c.exps, c.key[0])}", "    bk = 0"]
        for k, v in enumerate(c.key[1:], 1):
            lines += [f"    v = {expr(c.exps, v)}", "    if v > bv:", f"        bv = v; bk = {k}"]
        branches = []
        if c.zero:
            branches.append(("bv <= 0", empty))
        for k, cats in enumerate(c.cats):
            branches.append((f"bk == {k}", snap(w, k, [expr(c.exps, v) for v in cats])))
        if len(branches) == 1:
            lines.append(f"    s{w} = {branches[0][1]}")
            continue
        for i, (cond, one) in enumerate(branches):
            lines += [f"    {'if' if i == 0 else 'elif'} {cond}:" if i < len(branches) - 1
                      else "    else:", f"        s{w} = {one}"]
    out, w = [], 0
    for g in groups:
        out.append(", ".join(f"s{w + i}" for i in range(len(g))))
        w += len(g)
    lines.append("    return " + (f"[{out[0]}]" if flat else
                                  "[" + ", ".join(f"[{o}]" for o in out) + "]"))
    exec(compile("\n".join(lines) + "\n", "<fused windows>", "exec"), ns)  # noqa: S102
    return ns["f"]


def _monomials_n(names, exps, rows) -> tuple[list[str], dict]:
    """Lines computing every non-constant monomial the rows use, once, and their names."""
    used = sorted({e for v in rows for c, e in zip(v, exps) if c and any(e)})
    lines, name = [], {}
    for k, e in enumerate(used):
        name[e] = f"m{k}"
        lines.append(f"    m{k} = " + "*".join(n for n, p in zip(names, e) for _ in range(p)))
    return lines, name


def _expr_n(exps, vec, name) -> str:
    parts = [str(c) + (f"*{name[e]}" if any(e) else "") for c, e in zip(vec, exps) if c]
    return " + ".join(parts) or "0"


def _poly_fn_n(names, exps, vecs):
    pro, name = _monomials_n(names, exps, vecs)
    return _compiled("\n".join([f"def f({', '.join(names)}):", *pro, "    return ["
                                + ", ".join(_expr_n(exps, v, name) for v in vecs) + "]", ""]))


def _best_row_fn_n(names, exps, vecs, rows: list[list[tuple[int, ...]]]):
    """``f(*sizes) -> (largest value, index of the first row reaching it, that row's
    polynomials)``, rows over the sizes themselves: every monomial the rows use computed once,
    then the rows' values, then the largest row's categories (one compiled function: its
    source a third smaller than an argmax and a per-row function, each with its monomials)."""
    pro, name = _monomials_n(names, exps, [*vecs, *(c for cats in rows for c in cats)])
    lines = [f"def f({', '.join(names)}):", *pro, f"    bv = {_expr_n(exps, vecs[0], name)}",
             "    bk = 0"]
    for k, v in enumerate(vecs[1:], 1):
        lines += [f"    v = {_expr_n(exps, v, name)}", "    if v > bv:", f"        bv = v; bk = {k}"]
    for k, cats in enumerate(rows):
        ret = f"return bv, {k}, [" + ", ".join(_expr_n(exps, c, name) for c in cats) + "]"
        lines += [f"    if bk == {k}:", f"        {ret}"] if k < len(rows) - 1 else [f"    {ret}"]
    return _compiled("\n".join(lines + [""]))


def candidates(k: np.ndarray, cats: np.ndarray, exps, ops: list[str], phases: list[str],
               zero: bool = False, natural=None) -> Candidates:
    """``k``: rows × coefficients of the maximised quantity; ``cats``: rows × categories ×
    coefficients; both in event order. ``natural`` = (names, exponents, key rows, category
    rows): the same rows over the sizes themselves, which the candidates evaluate (``k`` and
    ``exps`` are then over the shifted variables, where the pruning rules hold)."""
    rows = select(k, exps)
    names = None
    if natural is not None:
        names, exps, k, cats = natural
    sel = list(rows)
    return Candidates(exps, list(map(tuple, k[sel].tolist())),
                      [list(map(tuple, c)) for c in cats[sel].tolist()],
                      [ops[i] for i in rows], [phases[i] for i in rows], zero, names)
