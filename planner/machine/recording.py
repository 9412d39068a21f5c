"""Replaying a program with symbolic sizes, and the peaks it records as closed forms.

``RecordingMachine`` is the step simulator (``planner/machine/stepsim.py``) with sizes that may be
polynomials in the micro-batch size and the sequence length (``planner/machine/symbolic.py``): it
logs every change of the live bytes and marks the instants that could be a peak; one cumulative
sum gives the live bytes per category at every mark as polynomials, and
``planner/machine/peak_pruning.py`` keeps the rows that can be a window's first maximum for
some size. ``compile_windows`` turns any program (a pipeline rank's, for instance) into a
``WindowTemplate``; the single-device step's own template is ``planner/step/template.py``.

Domains: a size of 1 is its own domain (a batch of one broadcasts like an unbatched tensor), so a
template covers B = 1 or B >= 2 (``B = 2 + b``, b >= 0), and likewise T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.machine.peak_candidates import Candidates, candidates, fused_best
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, Machine, PeakSnap
from planner.machine.symbolic import MPoly, Poly, Undecided, strictly_positive

__all__ = ["RecordingMachine", "WindowTemplate", "add_changes", "compile_windows", "domain_of",
           "record", "window_candidates"]

_NCAT = len(CATEGORIES)


# ---- recording -----------------------------------------------------------------------------
_DEG = 4  # monomials b^i t^j with i, j < _DEG (the step has at most B·T²)
_NCOL = _NCAT * _DEG * _DEG


def add_changes(live: list, changes) -> list:
    """``live`` (bytes per category) after the logged ``changes`` ((±(category + 1), size)
    pairs), summed in place. A long run of changes is summed per category as plain integers
    and one dict of polynomial terms, one polynomial built at the end (integer sums in any
    order: the same result)."""
    if len(changes) < _BATCH:
        for sc, size in changes:
            if sc > 0:
                live[sc - 1] = live[sc - 1] + size
            else:
                live[-sc - 1] = live[-sc - 1] - size
        return live
    ints = [0] * len(live)
    terms: list[dict | None] = [None] * len(live)
    kinds: list = [None] * len(live)
    for sc, size in changes:
        i, sign = (sc - 1, 1) if sc > 0 else (-sc - 1, -1)
        if type(size) is int:
            ints[i] += sign * size
        elif type(size) is Poly or type(size) is MPoly:
            d = terms[i]
            if d is None:
                d = terms[i] = {}
                kinds[i] = size
            elif type(kinds[i]) is not type(size):  # pragma: no cover - one kind a machine
                raise TypeError("a category's sizes of two polynomial kinds")
            get = d.get
            for k, c in size.t.items():
                d[k] = get(k, 0) + sign * c
        else:  # anything else, as it comes
            live[i] = live[i] + size if sign > 0 else live[i] - size
    for i, d in enumerate(terms):
        total = live[i]
        if d is not None:
            k = kinds[i]
            total = total + (Poly.make(d) if type(k) is Poly else k._make(d))
        if ints[i]:
            total = total + ints[i]
        live[i] = total
    return live


_BATCH = 16  # changes from which add_changes sums per category first


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
        if not (p is not None and i >= 3 and p[2] == self.phase and strictly_positive(nbytes)):
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

    def resize(self, b: Buf, nbytes) -> None:
        if b.refs > 0:
            self._flush()
            self.log.append((-(_INDEX[b.cat] + 1), b.nbytes))
            self.log.append((_INDEX[b.cat] + 1, nbytes))
        b.nbytes = nbytes

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
        out = add_changes(list(out), self.log[n:])
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

    @property
    def act_max(self):
        return "act_max"

    @act_max.setter
    def act_max(self, value) -> None:
        pass

    def marks_matrix(self) -> np.ndarray:
        """(marks, category, b-degree, t-degree) coefficients of the live bytes at every mark:
        each logged change is summed into the segment of the first mark at or after it, and the
        segments are summed cumulatively (marks x columns, not log rows x columns)."""
        limit = 1 << 62
        n = len(self.log)
        if not n:
            return self.dense_marks_matrix()
        log = self.log
        scs = [a for a, _ in log]
        sizes = [b for _, b in log]
        polys = [e for e, size in enumerate(sizes) if size.__class__ is Poly]
        if polys:
            for e in polys:
                sizes[e] = 0
        try:
            v = np.array(sizes, dtype=np.int64)
        except (OverflowError, TypeError, ValueError):
            return self.dense_marks_matrix()
        sc = np.array(scs, dtype=np.int64)
        rows, cols, vals = [np.arange(1, n + 1)], [(np.abs(sc) - 1) * (_DEG * _DEG)], \
            [np.sign(sc) * v]
        if polys:  # per distinct polynomial (a step logs a few, many times each)
            # entries of one polynomial object together, then objects of equal terms (as
            # their terms are ordered: equal polynomials ordered apart make two groups, each
            # summed on its own alike)
            by_id: dict[int, list[int]] = {}
            for e in polys:
                by_id.setdefault(id(log[e][1]), []).append(e)
            by_poly: dict[tuple, list[int]] = {}
            for es in by_id.values():
                by_poly.setdefault(tuple(log[es[0]][1].t.items()), []).extend(es)
            for es in by_poly.values():
                size = log[es[0]][1]
                for (i, j), c in size.t.items():
                    if i >= _DEG or j >= _DEG or abs(c) >= limit:
                        raise Undecided(f"size {size} outside the template's range")
                k = len(size.t)
                offs = np.array([i * _DEG + j for i, j in size.t], dtype=np.int64)
                coef = np.array(list(size.t.values()), dtype=np.int64)
                e_arr = np.array(es, dtype=np.int64)
                s_arr = sc[e_arr]
                rows.append(np.repeat(e_arr + 1, k))
                cols.append(np.repeat((np.abs(s_arr) - 1) * (_DEG * _DEG), k)
                            + np.tile(offs, len(es)))
                vals.append(np.repeat(np.sign(s_arr), k) * np.tile(coef, len(es)))
        row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        # every partial sum is below the sum of the magnitudes: when that is in range, int64
        # cannot overflow in any order of summation (else the row-by-row sum decides)
        if float(np.abs(val.astype(np.float64)).sum()) >= limit / 2:
            return self.dense_marks_matrix()
        at = np.array([m[0] for m in self.marks], dtype=np.int64)
        seg = np.searchsorted(at, row, side="left")  # the first mark at or after each change
        keep = seg < len(at)
        sums = np.zeros((len(at), _NCOL), dtype=np.int64)
        np.add.at(sums, (seg[keep], col[keep]), val[keep])
        return np.cumsum(sums, axis=0).reshape(len(at), _NCAT, _DEG * _DEG)

    def dense_marks_matrix(self) -> np.ndarray:
        """``marks_matrix`` by a cumulative sum over every log row (the tests' oracle, and the
        way taken when the log's sizes are too large for the segment sums to be safe)."""
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



def domain_of(B: int, T: int) -> tuple[int | None, int | None]:
    """The template domain holding (B, T): a size of 1 is its own domain (broadcasts between a
    batch of one and an unbatched tensor, or one position, change what the step allocates)."""
    return (1 if B == 1 else None, 1 if T == 1 else None)


def record(make, domain: tuple[int | None, int | None]):
    """A recording machine and the program ``make(machine, sizes)`` builds on it, with the sizes
    of ``domain`` symbolic."""
    m = RecordingMachine()
    B = domain[0] if domain[0] is not None else Poly({(0, 0): 2, (1, 0): 1})
    T = domain[1] if domain[1] is not None else Poly({(0, 0): 2, (0, 1): 1})
    return m, make(m, (B, T))


def window_candidates(m: RecordingMachine, wanted: list[int], act: bool):
    """(exps, the candidates of each wanted window (total peak), the activation-peak candidates
    (activations + temporaries outside the optimizer, None unless ``act``), the activation-max
    candidates (live activation bytes outside the optimizer; None unless ``act``))."""
    m._flush()
    full = m.marks_matrix()  # marks × categories × (i, j) grid
    used = np.nonzero(np.abs(full).reshape(-1, _DEG * _DEG).max(0))[0]
    if not len(used) or used[0] != 0:  # the constant first (nonzero's indices are sorted)
        used = np.concatenate([[0], used])
    exps = tuple((int(u) // _DEG, int(u) % _DEG) for u in used)
    cats = full[:, :, used]
    ops = [mk[1] for mk in m.marks]
    phases = [mk[2] for mk in m.marks]

    def window(sel: np.ndarray, key: np.ndarray, zero: bool = False, cat=None) -> Candidates:
        w = np.nonzero(sel)[0]
        c = cats if cat is None else cats[:, cat:cat + 1]
        return Candidates(exps, [], [], [], [], zero) if not len(w) else candidates(
            key[w], c[w], exps, [ops[i] for i in w], [phases[i] for i in w], zero)

    total = cats.sum(1)
    windows = np.array([mk[3] for mk in m.marks])
    act_c = max_c = None
    if act:
        act_sel = np.array([mk[4] and mk[2] != "optimizer" for mk in m.marks])
        act_c = window(act_sel, cats[:, 3] + cats[:, 4], zero=True)
        # every mark after an allocation: a run merged into its last mark (RecordingMachine.alloc)
        # never lowers the live activations, and stays in one phase
        max_c = window(act_sel, cats[:, 3], zero=True, cat=3)
    return exps, [window(windows == w, total) for w in wanted], act_c, max_c


@dataclass
class WindowTemplate:
    """Any program's peak windows with B and T free over a domain (``run`` gave the window
    ids): ``evaluate(B, T)`` is the list of their peaks."""

    domain: tuple[int | None, int | None]
    exps: tuple[tuple[int, int], ...]
    windows: list[Candidates]

    def __post_init__(self) -> None:
        self._windows = fused_best([self.windows])  # one generated function for all windows

    def evaluate(self, B: int, T: int) -> list[PeakSnap]:
        return self._windows(B - 2, T - 2)[0]


def compile_windows(make, domain: tuple[int | None, int | None], run) -> WindowTemplate:
    """``run(program)`` replays the program built by ``make(machine, sizes)`` and returns the
    ids of the windows (``machine.peak`` after each) whose peaks the template gives."""
    m, prog = record(make, domain)
    wanted = run(prog)
    exps, cands, _, _ = window_candidates(m, wanted, act=False)
    return WindowTemplate(domain, exps, cands)
