"""Which recorded rows can be a window's peak, and their evaluation as generated Python.

A row is a vector of polynomial coefficients (constant first) over monomials ``b^i·t^j`` with
b, t >= 0. The peak at (b, t) is the *first* row reaching the largest value (the simulator keeps
the first allocation that reaches a new high). Rules that rule a row out everywhere:

- an earlier row is >= it in every coefficient, or a later one is >= everywhere and > in the
  constant (so > it everywhere: the monomials are >= 0, the constant one is 1);
- a mix λ·j + μ·k of two rows (λ, μ >= 0, λ + μ <= 1) is >= it in every coefficient and > in
  the constant, or (0 < λ = 1 - μ < 1) >= everywhere with one of j, k earlier: wherever i reaches
  the maximum, both tie with it (values are live bytes, >= 0).

``_screen`` applies them vectorised against anchors (rows that are the first maximum at some probe
point), deciding in floating point only where the margin exceeds the rounding error; what it
leaves goes through the exact integer passes ``_prune`` and ``_hull_prune``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

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
        else:
            self._best = _argmax_fn_n(self.names, self.exps, self.key) if self.key else None
            self._row = _rows_fn_n(self.names, self.exps, self.cats) if self.key else None

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
        x, k = self._best(*v)
        if self.zero and x <= 0:
            return PeakSnap()
        if self.names is not None:
            return PeakSnap(x, self._row(k, *v), self.ops[k], self.phases[k])
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


def _rows_fn_n(names, exps, rows: list[list[tuple[int, ...]]]):
    """``f(k, *sizes) -> list``: row k's polynomials (one compiled function for all rows)."""
    lines = [f"def f(k, {', '.join(names)}):"]
    for k, vecs in enumerate(rows):
        pro, name = _monomials_n(names, exps, vecs)
        lines += [f"    if k == {k}:", *("    " + p for p in pro), "        return ["
                  + ", ".join(_expr_n(exps, v, name) for v in vecs) + "]"]
    return _compiled("\n".join(lines + [""]))


def _argmax_fn_n(names, exps, vecs):
    """``f(*sizes) -> (largest value, index of the first row reaching it)``, rows over the sizes
    themselves; the monomials are computed once."""
    pro, name = _monomials_n(names, exps, vecs)
    lines = [f"def f({', '.join(names)}):", *pro, f"    bv = {_expr_n(exps, vecs[0], name)}",
             "    bk = 0"]
    for k, v in enumerate(vecs[1:], 1):
        lines += [f"    v = {_expr_n(exps, v, name)}", "    if v > bv:", f"        bv = v; bk = {k}"]
    return _compiled("\n".join(lines + ["    return bv, bk", ""]))


_PROBE_B = (0, 1, 3, 15, 63, 255, 1023, 4095)
_PROBE_T = (0, 1, 15, 127, 1023, 8191, 65535, 1 << 20)


def _prune(vecs: list[tuple[int, ...]]) -> list[int]:
    """Indices of the rows no single other row rules out (exact)."""
    kept: list[int] = []
    for i, vi in enumerate(vecs):
        dominated = False
        survivors = []
        for j in kept:
            vj = vecs[j]
            if not dominated and all(a >= b for a, b in zip(vj, vi)):
                dominated = True  # j is earlier: ties go to it
            if not dominated and all(a >= b for a, b in zip(vi, vj)) and vi[0] > vj[0]:
                continue  # i is later and strictly above j everywhere: j goes
            survivors.append(j)
        if dominated:
            continue
        kept = survivors + [i]
    return kept


def _between(vi, vj, vk, lam: Fraction) -> tuple[bool, bool]:
    """(λ·vj + (1-λ)·vk >= vi in every coefficient, and > in the constant one)."""
    p, q = lam.numerator, lam.denominator
    ge = all(p * j + (q - p) * k >= q * i for i, j, k in zip(vi, vj, vk))
    return ge, p * vj[0] + (q - p) * vk[0] > q * vi[0]


def _hull_prune(vecs: list[tuple[int, ...]]) -> list[int]:
    """Of rows (event order) no single row rules out, the ones no mix of two others does
    (screened in floating point, each removal verified in exact integers)."""
    n = len(vecs)
    if n <= 2:
        return list(range(n))
    a = np.array(vecs, dtype=float)
    try:
        ia = np.array(vecs, dtype=np.int64)
    except OverflowError:  # pragma: no cover - rows are int64 where they come from
        ia = np.array(vecs, dtype=object)
    full = np.packbits(np.ones(a.shape[1], dtype=bool))
    keep = []
    for i in range(n):
        # a mix of j and k is at most the larger of the two in each coefficient: only pairs
        # that together reach row i in every coefficient can rule it out
        cover = np.packbits(ia >= ia[i], axis=1)
        pair = ((cover[:, None, :] | cover[None, :, :]) == full).all(-1)
        pair[i, :] = pair[:, i] = False
        np.fill_diagonal(pair, False)
        jj, kk = np.nonzero(pair)
        d = a[jj] - a[kk]  # j - k
        r = a[i][None, :] - a[kk]  # i - k
        with np.errstate(divide="ignore", invalid="ignore"):
            q = r / d
        lo = np.maximum(np.where(d > 0, q, -np.inf).max(-1, initial=-np.inf), 0.0)
        hi = np.minimum(np.where(d < 0, q, np.inf).min(-1, initial=np.inf), 1.0)
        bad = ((d == 0) & (r > 0)).any(-1)
        ok = ~bad & (lo <= hi + 1e-9)
        removed = False
        for j, k in zip(jj[ok], kk[ok]):
            j, k = int(j), int(k)
            vi, vj, vk = vecs[i], vecs[j], vecs[k]
            lo_f, hi_f = Fraction(0), Fraction(1)
            for x, y, z in zip(vi, vj, vk):
                dd, rr = y - z, x - z
                if dd > 0:
                    lo_f = max(lo_f, Fraction(rr, dd))
                elif dd < 0:
                    hi_f = min(hi_f, Fraction(rr, dd))
            if lo_f > hi_f:
                continue
            lam = (lo_f + hi_f) / 2
            ge, strict = _between(vi, vj, vk, lam)
            if ge and (strict or (0 < lam < 1 and min(j, k) < i)):
                removed = True
                break
        if not removed:
            keep.append(i)
    return keep


# random corners the screen probes rows with sizes of many variables (besides the 8 points of
# every variable alike): anchors only direct the screen (every row it drops is ruled out
# exactly), and over the rows of the structure compiles 512 corners leave as few rows as 4,096
# did at an eighth of the product (tests/test_peak_candidates.py holds the screen sound)
_RANDOM_PROBES = 512


@functools.lru_cache(maxsize=64)
def _probe_monomials(exps: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Each monomial of ``exps`` (columns) at the screen's probe points (rows); a compile's
    windows share a few exponent sets, so each is computed once (read-only)."""
    if len(exps[0]) == 2:
        pb, pt = np.meshgrid(np.array(_PROBE_B, float), np.array(_PROBE_T, float))
        pts = np.stack([pb.ravel(), pt.ravel()])
    else:  # every variable alike, then random corners of growing spread (deterministic)
        rng = np.random.default_rng(0)
        scale = np.array(_PROBE_B, float)
        pts = np.concatenate([np.tile(scale, (len(exps[0]), 1)),
                              scale[rng.integers(0, len(scale),
                                                 (len(exps[0]), _RANDOM_PROBES))]], 1)
    mono = np.ascontiguousarray(
        np.stack([np.prod(pts ** np.array(e, float)[:, None], 0) for e in exps]).T)
    mono.flags.writeable = False
    return mono


def _screen(k: np.ndarray, exps) -> np.ndarray:
    """Rows (of ``k``: rows × coefficients, int64, constant first) the vectorised pass cannot
    rule out; sound: a row it drops is ruled out by the rules above."""
    n = len(k)
    if n <= 8:
        return np.arange(n)
    kf = k.astype(float)
    # probes × rows (each probe's values contiguous: its first maximum found along a row)
    vals = _probe_monomials(tuple(tuple(e) for e in exps)) @ kf.T
    top = vals.max(1)
    anchors = np.unique(np.argmax(vals >= (top - 1e-9 * np.abs(top))[:, None], axis=1))
    idx = np.arange(n)
    ka = k[anchors]
    # single-row rule, exact (comparisons of integers)
    ge = (ka[:, None, :] >= k[None, :, :]).all(-1)
    strict = ge & (ka[:, None, 0] > k[None, :, 0])
    out = ((ge & (anchors[:, None] < idx[None, :])) | strict).any(0)
    out[anchors] = False
    # mixes of two anchors, strict, where the float margin is beyond rounding error
    rest = np.nonzero(~out)[0]
    rest = rest[~np.isin(rest, anchors)]
    if len(rest) and len(anchors) >= 2:
        fa = kf[anchors]
        fr = kf[rest]
        mag = np.abs(fa)
        for x in range(len(anchors)):
            for y in range(x + 1, len(anchors)):
                dj, dk = fa[x], fa[y]
                dd = dj - dk  # λ·dd >= i - dk
                rr = fr - dk
                with np.errstate(divide="ignore", invalid="ignore"):
                    q = rr / dd
                lo = np.maximum(np.where(dd > 0, q, -np.inf).max(-1), 0.0)
                hi = np.minimum(np.where(dd < 0, q, np.inf).min(-1), 1.0)
                lam = np.clip((lo + hi) / 2, 0.0, 1.0)[:, None]
                mu = (1.0 - lam) * (1.0 - 2.0 ** -40)
                slack = lam * dj + mu * dk - fr
                err = 2.0 ** -45 * (mag[x] + mag[y] + np.abs(fr)) + 1.0
                good = (lo <= hi) & (slack >= err).all(-1) & (slack[:, 0] > err[:, 0])
                out[rest[good]] = True
                keep = ~good
                rest, fr = rest[keep], fr[keep]
                if not len(rest):
                    break
            if not len(rest):
                break
    return np.nonzero(~out)[0]


def candidates(k: np.ndarray, cats: np.ndarray, exps, ops: list[str], phases: list[str],
               zero: bool = False, natural=None) -> Candidates:
    """``k``: rows × coefficients of the maximised quantity; ``cats``: rows × categories ×
    coefficients; both in event order. ``natural`` = (names, exponents, key rows, category
    rows): the same rows over the sizes themselves, which the candidates evaluate (``k`` and
    ``exps`` are then over the shifted variables, where the pruning rules hold)."""
    idx = _screen(k, exps)
    vecs = [tuple(int(x) for x in k[i]) for i in idx]
    sub = _prune(vecs)
    sub2 = _hull_prune([vecs[s] for s in sub])
    rows = [int(idx[sub[s]]) for s in sub2]
    names = None
    if natural is not None:
        names, exps, k, cats = natural
    return Candidates(exps, [tuple(int(x) for x in k[i]) for i in rows],
                      [[tuple(int(x) for x in c) for c in cats[i]] for i in rows],
                      [ops[i] for i in rows], [phases[i] for i in rows], zero, names)
