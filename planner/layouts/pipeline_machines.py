"""The machines a pipeline rank's shortened lists are replayed on, and what a composed action
draws on them.

``TraceMachine`` keeps the live bytes per category at every allocation (concrete sizes);
``_Recording`` is the step template's recording machine (planner/machine/recording.py: sizes as
polynomials) with cut markers. Both give a composed action (planner/layouts/pipeline_actions.py)
what it needs: the rows an action recorded relative to its start (``memo_rows``), the rows a
composed action draws (``memo_plan``, ``memo_emit``: on the trace machine the first highest
alone, which is the same at any start; on the recording machine every mark that can be the
first highest for some sizes, ``undominated``), and bytes made live without a row
(``memo_silent``).
"""

from __future__ import annotations

from operator import add

import numpy as np

from planner.machine.recording import RecordingMachine, add_changes
from planner.machine.stepsim import _INDEX, CATEGORIES, Buf, Machine
from planner.machine.symbolic import MPoly, _Exact

__all__ = ["TraceMachine", "undominated"]


# ---- recording ---------------------------------------------------------------------------------
class TraceMachine(Machine):
    """The step simulator keeping every allocation's live bytes per category (and each window
    start's), with cut markers; ``peak`` is the current window's id."""

    def __init__(self) -> None:
        super().__init__()
        self.window = -1
        self.rows: list[tuple] = []
        self.meta: list[tuple[str, str, int]] = []
        self.cuts: list[int] = []

    def alloc(self, nbytes, name: str, cat: str | None = None) -> Buf:
        b = Buf(int(nbytes), cat or self.default_cat(), name)
        b.refs = 1
        if self.on_alloc is not None:
            self.on_alloc(b)
        self.cur[_INDEX[b.cat]] += b.nbytes
        if self.window >= 0:  # (before the first window, building the model: no row is read)
            self.rows.append(tuple(self.cur))
            self.meta.append((name, self.phase, self.window))
        return b

    def reset_peak(self) -> None:
        self.window += 1
        self.rows.append(tuple(self.cur))
        self.meta.append(("(window start)", self.phase, self.window))

    def cut(self) -> None:
        self.cuts.append(len(self.rows))

    @property
    def peak(self):
        return self.window

    @peak.setter
    def peak(self, value) -> None:
        pass

    def trace(self):
        return np.array(self.rows, dtype=np.int64).reshape(len(self.rows), -1), self.meta

    # ---- what a composed action needs (planner/layouts/pipeline_actions.py) -------------------
    def memo_start(self) -> int:
        return len(self.rows)

    def memo_rows(self, token: int, start: list) -> tuple[tuple, tuple]:
        """The rows since ``token`` relative to ``start``, and their (op, phase)."""
        rows = tuple(tuple(a - b for a, b in zip(r, start)) for r in self.rows[token:])
        return rows, tuple((mk[0], mk[1]) for mk in self.meta[token:])

    def memo_net(self, token: int, start: list) -> tuple:
        """The live bytes' change since ``token`` (``start``: the live bytes there)."""
        return tuple(a - b for a, b in zip(self.cur, start))

    def memo_recorded(self, token: int, start: list, like=None) -> tuple:
        """(``memo_rows``, ``memo_net``) of an action just replayed (``like``: unused here)."""
        return (*self.memo_rows(token, start), self.memo_net(token, start))

    def memo_replace(self, token: int, rows: tuple, names: tuple, start: list,
                     plan: int | None = -1, net=None) -> None:
        """The rows since ``token`` as a composed action leaves them."""
        del self.rows[token:], self.meta[token:]
        self.memo_emit(rows, names, start, plan)

    @staticmethod
    def memo_plan(rows: tuple, names: tuple) -> int | None:
        """Which row ``memo_emit`` draws: the first highest. Every row of one action is the
        start plus the recorded relative row, so the others are never a window's first highest,
        at any start; the extrapolation sees the same rows in every list."""
        if not rows:
            return None
        tot = [sum(r) for r in rows]
        return tot.index(max(tot))

    def memo_emit(self, rows: tuple, names: tuple, start: list | None = None,
                  plan: int | None = -1) -> None:
        """An action's rows from ``start`` (its live bytes at the action's start): only its
        first highest one."""
        i = self.memo_plan(rows, names) if plan == -1 else plan
        if i is not None:
            self.rows.append(tuple(map(add, self.cur if start is None else start, rows[i])))
            op, phase = names[i]
            self.meta.append((op, phase, self.window))

    def memo_silent(self, nbytes: int, cat: str) -> None:
        """Bytes made live without a row (they were in the recorded rows already)."""
        self.cur[_INDEX[cat]] += nbytes


class _Recording(RecordingMachine):
    """The step template's recording machine with cut markers (a cut ends a run of merged
    allocation marks, so the rows between cuts correspond between replays)."""

    def __init__(self) -> None:
        super().__init__()
        self.cuts: list[int] = []
        self._since_last: tuple | None = None

    def cut(self) -> None:
        self._flush()
        self.cuts.append(len(self.marks))

    def trace(self):
        self._flush()
        rows = self.marks_matrix()
        return rows, [(mk[1], mk[2], mk[3]) for mk in self.marks]

    # ---- what a composed action needs (planner/layouts/pipeline_actions.py): the rows are the
    # marks' live bytes (polynomials), every one kept (which is highest depends on the sizes)
    def memo_start(self) -> tuple[int, int]:
        self._flush()  # an action's marks are its own (a merged run never spans two actions)
        return len(self.log), len(self.marks)

    def _since(self, token: tuple[int, int]) -> tuple[list, list]:
        """(each mark's live bytes since ``token`` relative to it, the change to now); the
        answer is kept while the log and the marks stay as they are (a recorded action asks
        for its rows, then for its net change to replace them: ``memo_replace`` drops it)."""
        self._flush()
        at_now = (token, len(self.log), len(self.marks))
        last = self._since_last
        if last is not None and last[0] == at_now:
            return list(last[1]), list(last[2])
        rel, rows, at = [0] * len(CATEGORIES), [], token[0]
        for mk in self.marks[token[1]:]:
            add_changes(rel, self.log[at:mk[0]])
            at = mk[0]
            rows.append(tuple(rel))
        net = add_changes(rel, self.log[at:])
        self._since_last = (at_now, tuple(rows), tuple(net))
        return rows, net

    def memo_rows(self, token: tuple[int, int], start: list) -> tuple[tuple, tuple]:
        """The marks since ``token`` relative to the live bytes there, and their (op, phase,
        after an allocation)."""
        rows, _ = self._since(token)
        return tuple(rows), tuple((mk[1], mk[2], mk[4]) for mk in self.marks[token[1]:])

    def memo_net(self, token: tuple[int, int], start: list) -> tuple:
        """The live bytes' change since ``token``: the changes logged since, summed (what the
        live bytes now less ``start``, the live bytes there, come to)."""
        return tuple(self._since(token)[1])

    def memo_recorded(self, token: tuple[int, int], start: list, like=None) -> tuple:
        """(``memo_rows``, ``memo_net``) of an action just replayed; where its log and marks
        since ``token`` are, term by term, those ``like`` (an earlier record) was made from,
        its rows are that record's (the rows are a function of them), without summing them
        again. The log is kept for ``pipeline_records.plain`` to attach to the new record."""
        self._flush()
        a, k = token
        log = self.log[a:]
        marks = tuple((mk[0] - a, mk[1], mk[2], mk[4]) for mk in self.marks[k:])
        self.recorded_log = (log, marks)
        got = getattr(like, "_log", None)
        if got is not None and got[1] == marks and _alike(got[0], log):
            return like.rows, like.names, tuple(add_changes([0] * len(CATEGORIES), log))
        return (*self.memo_rows(token, start), self.memo_net(token, start))

    def memo_replace(self, token: tuple[int, int], rows: tuple, names: tuple,
                     start: list, plan: tuple | None = None, net=None) -> None:
        """The log since ``token`` as a composed action leaves it: its marks, then the net
        change per category without a mark (what stays live is freed later by its buffers)."""
        if net is None:
            _, net = self._since(token)
        self._flush()
        self._since_last = None  # the log changes below
        del self.log[token[0]:], self.marks[token[1]:]
        self._cur_at = (token[0], list(start))
        self.memo_emit(rows, names, plan=plan)
        for i, d in enumerate(net):
            self.memo_silent(d, CATEGORIES[i])

    @staticmethod
    def memo_plan(rows: tuple, names: tuple) -> tuple[list, list]:
        """What ``memo_emit`` logs: the marks that can be the action's first highest for some
        sizes (``undominated``), each as its changes from the previous one, then the changes
        back to the start."""
        marks, prev = [], [0] * len(CATEGORIES)
        for i in undominated(list(rows)):  # each mark's total: its categories summed
            row = rows[i]
            marks.append(([(c + 1, a - b) for c, (a, b) in enumerate(zip(row, prev))
                           if _nonzero(a - b)], names[i]))
            prev = row
        return marks, [(-(c + 1), b) for c, b in enumerate(prev) if _nonzero(b)]

    def memo_emit(self, rows: tuple, names: tuple, start: list | None = None,
                  plan: tuple | None = None) -> None:
        """An action's marks from the live bytes now, which it leaves as they were."""
        marks, back = self.memo_plan(rows, names) if plan is None else plan
        self._flush()
        log, out = self.log, self.marks
        n, cur = self._cur_at
        before = len(log)
        for changes, (op, phase, alloc) in marks:
            log.extend(changes)
            out.append((len(log), op, phase, self.window, alloc))
        log.extend(back)
        if n == before:  # the live bytes as they were: nothing to sum again
            self._cur_at = (len(log), cur)

    def memo_silent(self, nbytes, cat: str) -> None:
        if _nonzero(nbytes):
            self.log.append((_INDEX[cat] + 1, nbytes))


def _alike(a: list, b: list) -> bool:
    """Two logs' changes equal term by term (ints, or polynomials of one space)."""
    if len(a) != len(b):
        return False
    for (s1, x1), (s2, x2) in zip(a, b):
        if s1 != s2:
            return False
        if x1 is not x2:
            t = x1.__class__
            if t is not x2.__class__ or (x1 != x2 if t is int else t is not MPoly or x1.t != x2.t):
                return False
    return True


def _nonzero(d) -> bool:
    """A size not 0 as written (a polynomial that is 0 comes back as the int 0)."""
    return isinstance(d, _Exact) or d != 0


def _shifted_matrix(totals: list) -> np.ndarray:
    """The totals' coefficients over variables that are at least 0, one row each, the constant
    first: polynomials in sizes (``MPoly``) through their space's shift, natural coefficients
    times the shift of each monomial, in one product; ``Poly`` terms are over b = B - 2,
    t = T - 2 already. A total may be given as a tuple of parts (a mark's live bytes per
    category), summed coefficient by coefficient here. Exact: in int64 where a bound on every
    entry fits, else Python ints."""
    rows = [t if type(t) is tuple else (t,) for t in totals]
    sp = next((p.sp for r in rows for p in r if isinstance(p, MPoly)), None)
    zero = (0,) * sp.n if sp is not None else (0, 0)
    cols: dict[tuple, int] = {zero: 0}
    for r in rows:
        for p in r:
            if not isinstance(p, int):
                for k in p.t:
                    cols.setdefault(k, len(cols))
    width = len(cols)
    lists = []
    for r in rows:
        row = [0] * width
        for p in r:
            if isinstance(p, int):
                row[0] += p
            else:
                for k, c in p.t.items():
                    row[cols[k]] += c
        lists.append(row)
    a = _ints(lists)
    if sp is None:
        return a
    shifted: dict[tuple, int] = {zero: 0}
    parts = [sp.shifted_monomial(k) for k in cols]
    for part in parts:
        for k, _ in part:
            shifted.setdefault(k, len(shifted))
    m = np.zeros((width, len(shifted)), dtype=np.int64)
    for r, part in enumerate(parts):
        for k, c in part:
            m[r, shifted[k]] += c
    if a.dtype != object and (np.abs(a).astype(float) @ np.abs(m).astype(float)).max(
            initial=0.0) < 2.0 ** 61:  # every partial sum fits
        return a @ m
    return a.astype(object).dot(m.astype(object))


def _ints(lists: list[list[int]]) -> np.ndarray:
    """The rows as int64, or as Python ints where one does not fit."""
    try:
        return np.array(lists, dtype=np.int64).reshape(len(lists), -1)
    except OverflowError:
        return np.array(lists, dtype=object).reshape(len(lists), -1)


def undominated(totals: list) -> list[int]:
    """The indices of the totals (polynomials in sizes at least their domain's lows, or tuples
    of parts that sum to them) that can be the first highest for some sizes: a total is left
    out when an earlier one is at least it, or a later one above it, everywhere (every shifted
    coefficient of the difference at least 0; above: and its constant above 0)."""
    n = len(totals)
    if n < 2:
        return list(range(n))
    a = _shifted_matrix(totals)
    if a.dtype == object and np.abs(a).max() < 1 << 61:
        a = a.astype(np.int64)
    out = np.ones(n, dtype=bool)
    order = np.arange(n)
    step = max(1, (1 << 22) // (n * a.shape[1]))  # totals i per block: a few MB of comparisons
    for lo in range(0, n, step):
        i = order[lo:lo + step]
        ge = (a[None, :, :] >= a[i, None, :]).all(axis=2)  # [i, j]: total j >= total i
        earlier = order[None, :] < i[:, None]
        above = a[None, :, 0] > a[i, None, 0]
        out[i] = ~(ge & (earlier | above)).any(axis=1)
    return [int(i) for i in np.nonzero(out)[0]]
