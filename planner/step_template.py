"""The reference step's peaks as closed forms in the micro-batch size and the sequence length.

The step simulator (``planner/stepsim.py``) replays the reference step with concrete sizes. Every
size it sees is a polynomial in the micro-batch ``B`` and the sequence length ``T`` (``B·T·h``,
``B·nh·T²`` of eager attention, ``T·hd`` of the rotary tables, ...), with the model's shape and
dtypes fixed. So one replay with ``B`` and ``T`` kept symbolic records, at every allocation, the
live bytes per category as polynomials; the peak of a window is the largest of those rows, and a
new ``(B, T)`` needs only the rows that can be the largest somewhere. That is the template.

Soundness: every decision the program takes on sizes (``max`` of two gradient sizes, a broadcast
test, ``if retained:``) goes through :class:`Poly`'s comparisons, which answer only when the answer
holds for *every* ``B, T >= 1``; otherwise they raise :class:`Undecided` and the configuration is
simulated concretely instead. A comparison is decided from the coefficients after substituting
``B = 1 + b``, ``T = 1 + t`` (``b, t >= 0``): all of one sign means one sign everywhere. Row pruning
uses the same test, and keeps torch's tie rule (the first allocation reaching the peak wins), so a
template's answer equals the concrete replay's exactly (tests/test_step_template.py holds them
equal over random sizes and every setting the replay has).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from planner.reference_step import ReferenceProgram, StepPeaks, combine_peaks
from planner.stepsim import _INDEX, CATEGORIES, Buf, Machine, PeakSnap

_NCAT = len(CATEGORIES)


class Undecided(Exception):
    """A decision on sizes that depends on the values of B and T: simulate concretely."""


class Poly:
    """An integer polynomial in two variables b, t >= 0: ``{(i, j): c}`` for ``c·b^i·t^j``, where
    the sizes are B = B0 + b and T = T0 + t over a domain's lower bounds. Arithmetic returns a
    plain int when the result is constant."""

    __slots__ = ("t",)

    def __init__(self, terms: dict[tuple[int, int], int]) -> None:
        self.t = terms

    @staticmethod
    def make(terms: dict[tuple[int, int], int]) -> "Poly | int":
        terms = {k: c for k, c in terms.items() if c}
        if not terms:
            return 0
        if len(terms) == 1 and (0, 0) in terms:
            return terms[(0, 0)]
        return Poly(terms)

    # ---- arithmetic -----------------------------------------------------------------------
    def __add__(self, o):
        if isinstance(o, Poly):
            d = dict(self.t)
            for k, c in o.t.items():
                d[k] = d.get(k, 0) + c
            return Poly.make(d)
        if isinstance(o, int):
            d = dict(self.t)
            d[(0, 0)] = d.get((0, 0), 0) + o
            return Poly.make(d)
        return NotImplemented

    __radd__ = __add__

    def __neg__(self):
        return Poly({k: -c for k, c in self.t.items()})

    def __sub__(self, o):
        if isinstance(o, (Poly, int)):
            return self + (-o)
        return NotImplemented

    def __rsub__(self, o):
        if isinstance(o, int):
            return (-self) + o
        return NotImplemented

    def __mul__(self, o):
        if isinstance(o, Poly):
            d: dict[tuple[int, int], int] = {}
            for (i, j), c in self.t.items():
                for (k, l), e in o.t.items():
                    key = (i + k, j + l)
                    d[key] = d.get(key, 0) + c * e
            return Poly.make(d)
        if isinstance(o, int) and not isinstance(o, bool):
            return Poly.make({k: c * o for k, c in self.t.items()})
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, int) and o > 0 and all(c % o == 0 for c in self.t.values()):
            return Poly.make({k: c // o for k, c in self.t.items()})
        raise Undecided(f"({self}) // {o}")

    # ---- decisions (b, t >= 0: coefficients of one sign give that sign everywhere) ----------
    def sign(self) -> int | None:
        """+1 (> 0 for all b, t >= 0), -1 (< 0), or None (undecided; zero is never a Poly)."""
        s = self.t
        if all(c >= 0 for c in s.values()) and s.get((0, 0), 0) > 0:
            return 1
        if all(c <= 0 for c in s.values()) and s.get((0, 0), 0) < 0:
            return -1
        return None

    def nonneg(self) -> bool:
        return all(c >= 0 for c in self.t.values())

    def _cmp(self, o) -> tuple[int | None, bool, bool]:
        d = self - o
        if isinstance(d, int):
            return (d > 0) - (d < 0), d >= 0, d <= 0
        return d.sign(), d.nonneg(), (-d).nonneg()

    def __gt__(self, o):
        s, _, le = self._cmp(o)
        if s == 1:
            return True
        if le:
            return False
        raise Undecided(f"{self} > {o}")

    def __ge__(self, o):
        s, ge, _ = self._cmp(o)
        if ge:
            return True
        if s == -1:
            return False
        raise Undecided(f"{self} >= {o}")

    def __lt__(self, o):
        return (-self).__gt__(-o) if isinstance(o, (int, Poly)) else NotImplemented

    def __le__(self, o):
        return (-self).__ge__(-o) if isinstance(o, (int, Poly)) else NotImplemented

    def __eq__(self, o):
        if not isinstance(o, (int, Poly)):
            return NotImplemented
        s, ge, le = self._cmp(o)
        if ge and le:
            return True
        if s is not None:
            return False
        raise Undecided(f"{self} == {o}")

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    def __bool__(self):
        return self != 0

    def __hash__(self):
        return hash(frozenset(self.t.items()))

    def __int__(self):
        raise Undecided(f"int({self})")

    __index__ = __int__

    def __float__(self):
        raise Undecided(f"float({self})")

    def __repr__(self) -> str:
        return " + ".join(f"{c}·B^{i}·T^{j}" for (i, j), c in sorted(self.t.items()))


def _strictly_positive(x) -> bool:
    if isinstance(x, Poly):
        return x.sign() == 1
    return x > 0


# ---- recording -----------------------------------------------------------------------------
_DEG = 4  # monomials b^i t^j with i, j < _DEG (the step has at most B·T²)
_NCOL = _NCAT * _DEG * _DEG


class RecordingMachine(Machine):
    """The step simulator with symbolic sizes. Instead of keeping live totals and the peak it
    logs every change of the live bytes (category, signed size) and marks the instants that
    could be a peak: after an allocation (a run of allocations with nothing freed in between
    keeps only its last mark when each later one strictly adds activations or temporaries) and
    at each window start. The live bytes per category at every mark come out of one cumulative
    sum over the log (``marks_matrix``)."""

    def __init__(self) -> None:
        super().__init__()
        self.window = -1
        self.log: list[tuple[int, object]] = []  # (±(category + 1), size)
        self.marks: list[tuple[int, str, str, int, bool]] = []  # (log length, op, phase, window, alloc)
        self._pending: tuple | None = None
        self._cur_at: tuple[int, list] = (0, [0] * _NCAT)

    def _flush(self) -> None:
        if self._pending is not None:
            self.marks.append(self._pending)
            self._pending = None

    def alloc(self, nbytes, name: str, cat: str | None = None) -> Buf:
        b = Buf(nbytes, cat or self.default_cat(), name)
        b.refs = 1
        if self.on_alloc is not None:
            self.on_alloc(b)
        i = _INDEX[b.cat]
        self.log.append((i + 1, nbytes))
        p = self._pending
        if not (p is not None and i >= 3 and p[2] == self.phase and _strictly_positive(nbytes)):
            self._flush()
        self._pending = (len(self.log), name, self.phase, self.window, True)
        return b

    def _free(self, b: Buf) -> None:
        if not (isinstance(b.nbytes, int) and b.nbytes == 0):
            self._flush()
            self.log.append((-(_INDEX[b.cat] + 1), b.nbytes))

    def drop(self, *bufs) -> None:
        for b in bufs:
            if b is None:
                continue
            b = getattr(b, "buf", b)
            b.refs -= 1
            if b.refs == 0:
                self._free(b)
            elif b.refs < 0:  # pragma: no cover - a program bug
                raise AssertionError(f"double free of {b.name}")

    def set_refs(self, b: Buf, refs: int) -> None:
        if b.refs > 0 and refs == 0:
            self._free(b)
        b.refs = refs

    def recategorize(self, b: Buf, cat: str) -> None:
        if b.refs > 0:
            self._flush()
            self.log.append((-(_INDEX[b.cat] + 1), b.nbytes))
            self.log.append((_INDEX[cat] + 1, b.nbytes))
        b.cat = cat

    def reset_peak(self) -> None:
        self._flush()
        self.window += 1
        self.marks.append((len(self.log), "(window start)", self.phase, self.window, False))

    @property
    def cur(self) -> list:
        """Live bytes per category now (int | Poly); the program reads it rarely, so it is summed
        from the log on demand (continuing from the previous read)."""
        n, out = self._cur_at
        out = list(out)
        for sc, size in self.log[n:]:
            if sc > 0:
                out[sc - 1] = out[sc - 1] + size
            else:
                out[-sc - 1] = out[-sc - 1] - size
        self._cur_at = (len(self.log), out)
        return list(out)

    @cur.setter
    def cur(self, value) -> None:  # Machine.__init__ sets it
        pass

    @property
    def total(self):
        return sum(self.cur[1:], self.cur[0])

    @total.setter
    def total(self, value) -> None:
        pass

    @property
    def peak(self):  # the current window (read by ReferenceProgram.run_windows)
        return self.window

    @peak.setter
    def peak(self, value) -> None:
        pass

    @property
    def act_peak(self):
        return "act"

    @act_peak.setter
    def act_peak(self, value) -> None:
        pass

    def marks_matrix(self) -> np.ndarray:
        """(marks, category, b-degree, t-degree) coefficients of the live bytes at every mark."""
        idx: list[int] = []
        col: list[int] = []
        val: list[int] = []
        limit = 1 << 62
        for e, (sc, size) in enumerate(self.log):
            base = (abs(sc) - 1) * _DEG * _DEG
            sign = 1 if sc > 0 else -1
            if isinstance(size, Poly):
                for (i, j), c in size.t.items():
                    if i >= _DEG or j >= _DEG or abs(c) >= limit:
                        raise Undecided(f"size {size} outside the template's range")
                    idx.append(e + 1)
                    col.append(base + i * _DEG + j)
                    val.append(sign * c)
            elif size:
                if abs(size) >= limit:
                    raise Undecided(f"size {size} outside the template's range")
                idx.append(e + 1)
                col.append(base)
                val.append(sign * size)
        d = np.zeros((len(self.log) + 1, _NCOL), dtype=np.int64)
        np.add.at(d, (np.array(idx, dtype=np.int64), np.array(col, dtype=np.int64)),
                  np.array(val, dtype=np.int64))
        c = np.cumsum(d, axis=0)
        if np.abs(c).max(initial=0) >= limit:
            raise Undecided("live bytes outside the template's range")
        at = np.array([m[0] for m in self.marks], dtype=np.int64)
        return c[at].reshape(len(self.marks), _NCAT, _DEG * _DEG)


# ---- candidates and evaluation ---------------------------------------------------------------
@dataclass
class _Cands:
    """The rows of one window that can be its peak for some B, T, in event order."""

    exps: tuple[tuple[int, int], ...]
    key: list[tuple[int, ...]]  # coefficients of the maximised quantity, per row
    cats: list[list[tuple[int, ...]]]  # per row, per category: coefficients
    ops: list[str]
    phases: list[str]
    zero: bool = False  # an all-zero snapshot precedes the rows (act peak's initial value)

    def __post_init__(self) -> None:
        # The rows' polynomials as Python expressions in b and t, compiled once: evaluating a
        # template is then a handful of integer multiplications (exact, any size).
        self._best = _argmax_fn(self.exps, self.key) if self.key else None
        self._cats = [_poly_fn(self.exps, cats) for cats in self.cats]

    def best(self, b: int, t: int) -> PeakSnap:
        if self._best is None:
            return PeakSnap()
        v, k = self._best(b, t)
        if self.zero and v <= 0:
            return PeakSnap()
        return PeakSnap(v, self._cats[k](b, t), self.ops[k], self.phases[k])


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


# ---- which rows can be a peak -----------------------------------------------------------------
# Row i (a coefficient vector, constant first) can go when, for every b, t >= 0, it is not the
# first row reaching the maximum. Two sufficient rules, each checked against any other rows:
# - an earlier row is >= it in every coefficient, or a later one is >= everywhere and > in the
#   constant (so > it everywhere: the monomials are >= 0, the constant one is 1);
# - a mix λ·j + μ·k of two rows (λ, μ >= 0, λ + μ <= 1) is >= it in every coefficient and >
#   in the constant, or (0 < λ = 1 - μ < 1) >= everywhere with one of j, k earlier: wherever i
#   reaches the maximum, both tie with it (values are live bytes, >= 0).
# The vectorised pass decides with anchors (rows that are the first maximum at some probe
# point) and floating point only where the float margin exceeds its rounding error; what it
# leaves goes through the exact integer passes (_prune, _hull_prune).
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
    d = a[:, None, :] - a[None, :, :]  # j - k
    keep = []
    for i in range(n):
        r = a[i][None, None, :] - a[None, :, :]  # i - k
        with np.errstate(divide="ignore", invalid="ignore"):
            q = r / d
        lo = np.maximum(np.where(d > 0, q, -np.inf).max(-1), 0.0)
        hi = np.minimum(np.where(d < 0, q, np.inf).min(-1), 1.0)
        bad = ((d == 0) & (r > 0)).any(-1)
        ok = ~bad & (lo <= hi + 1e-9)
        ok[i, :] = ok[:, i] = False
        np.fill_diagonal(ok, False)
        removed = False
        for j, k in zip(*np.nonzero(ok)):
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


def _screen(k: np.ndarray, exps) -> np.ndarray:
    """Rows (of ``k``: rows × coefficients, int64, constant first) the vectorised pass cannot
    rule out; sound: a row it drops is ruled out by the rules above."""
    n = len(k)
    if n <= 8:
        return np.arange(n)
    kf = k.astype(float)
    pb, pt = np.meshgrid(np.array(_PROBE_B, float), np.array(_PROBE_T, float))
    mono = np.stack([pb.ravel() ** i * pt.ravel() ** j for i, j in exps])  # coefficients × probes
    vals = kf @ mono
    top = vals.max(0)
    anchors = np.unique(np.argmax(vals >= top - 1e-9 * np.abs(top), axis=0))
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


def _cands(k: np.ndarray, cats: np.ndarray, exps, ops: list[str], phases: list[str],
           zero: bool = False) -> _Cands:
    """``k``: rows × coefficients of the maximised quantity; ``cats``: rows × categories ×
    coefficients; both in event order."""
    idx = _screen(k, exps)
    vecs = [tuple(int(x) for x in k[i]) for i in idx]
    sub = _prune(vecs)
    sub2 = _hull_prune([vecs[s] for s in sub])
    rows = [int(idx[sub[s]]) for s in sub2]
    return _Cands(exps, [tuple(int(x) for x in k[i]) for i in rows],
                  [[tuple(int(x) for x in c) for c in cats[i]] for i in rows],
                  [ops[i] for i in rows], [phases[i] for i in rows], zero)


@dataclass
class StepTemplate:
    """One configuration's step with B and T free over a domain; ``evaluate(B, T)`` equals
    ``ReferenceProgram.run()`` at those sizes."""

    domain: tuple["int | None", "int | None"]  # per size: None (>= 2) or the fixed value 1
    exps: tuple[tuple[int, int], ...]
    fb: list[_Cands]
    step: _Cands
    act: _Cands
    combine: dict

    def covers(self, B: int, T: int) -> bool:
        return all(d is None and v >= 2 or d == v for d, v in zip(self.domain, (B, T)))

    def evaluate(self, B: int, T: int) -> StepPeaks:
        b, t = B - 2, T - 2
        return combine_peaks([c.best(b, t) for c in self.fb], self.step.best(b, t),
                             lambda: self.act.best(b, t), **self.combine)


def domain_of(B: int, T: int) -> tuple["int | None", "int | None"]:
    """The template domain holding (B, T): a size of 1 is its own domain (broadcasts between a
    batch of one and an unbatched tensor, or one position, change what the step allocates)."""
    return (1 if B == 1 else None, 1 if T == 1 else None)


def compile_template(model, training, device: str, checkpointed: set[int],
                     domain: tuple["int | None", "int | None"]) -> StepTemplate:
    """Replay the step once with the sizes of ``domain`` symbolic; raises Undecided (or
    TypeError, from a size the program cannot take symbolically) when the replay depends on
    their values."""
    m = RecordingMachine()
    B = domain[0] if domain[0] is not None else Poly({(0, 0): 2, (1, 0): 1})
    T = domain[1] if domain[1] is not None else Poly({(0, 0): 2, (0, 1): 1})
    prog = ReferenceProgram(model, training, device=device, checkpointed=checkpointed,
                            machine=m, sizes=(B, T))
    fb, step, _, combine = prog.run_windows()
    m._flush()
    if isinstance(combine["states"], Poly):
        raise Undecided("optimizer states depend on the sizes")
    full = m.marks_matrix()  # marks × categories × (i, j) grid
    used = np.nonzero(np.abs(full).reshape(-1, _DEG * _DEG).max(0))[0]
    used = np.union1d(used, [0])  # the constant first
    exps = tuple((int(u) // _DEG, int(u) % _DEG) for u in used)
    cats = full[:, :, used]
    total = cats.sum(1)
    act = cats[:, 3] + cats[:, 4]
    windows = np.array([mk[3] for mk in m.marks])
    ops = [mk[1] for mk in m.marks]
    phases = [mk[2] for mk in m.marks]

    def window(sel: np.ndarray, key: np.ndarray, zero: bool = False) -> _Cands:
        w = np.nonzero(sel)[0]
        return _Cands(exps, [], [], [], [], zero) if not len(w) else _cands(
            key[w], cats[w], exps, [ops[i] for i in w], [phases[i] for i in w], zero)

    act_sel = np.array([mk[4] and mk[2] != "optimizer" for mk in m.marks])
    return StepTemplate(domain, exps, [window(windows == w, total) for w in fb],
                        window(windows == step, total), window(act_sel, act, zero=True), combine)
