"""A pipeline rank's replayed step without replaying every micro-batch.

``planner.pipeline_memory`` replays a rank's step action by action over the schedule's per-rank
action list. Those lists are periodic: a warm-up (forwards), a steady state (1F1B: F, B pairs;
interleaved: rounds; zero bubble: F, I, W triples; ZB-V: six actions) and a cool-down, each a
stretch where action ``i + P`` is action ``i`` with the micro-batch index ``c`` higher. Here
such stretches ("runs") are found in the list itself (``find_runs``), so whatever
``planner.pipeline_schedules`` builds is covered, and the replay stands in for their middle
periods:

- **Shortened lists.** A run of R periods keeps its first K1 and last K2 periods and drops the
  N = R - K1 - K2 between; every kept action's micro-batch is renumbered by its rank among the
  kept actions of its stream (forwards, input backwards, weight backwards of one stage), so the
  shortened list is the action list of a step with fewer micro-batches (checked:
  ``_valid``). Runs whose periods do not balance forwards against backwards per stage (a
  warm-up of forwards, a cool-down of backwards) are dropped in pairs that do balance, the
  same number of periods from each.
- **Why the full step is affine in N.** Every period of a run, from the one after each stage's
  first backward (which makes the gradients) on, runs the same ops on the same shapes, so
  it leaves the same bytes behind; whatever a dropped period leaves is live at a later instant
  of the step exactly when the corresponding bytes of a kept period are (sends until the action
  loop ends, losses until the step ends, outputs until the next step). So the live bytes, per
  category, at every instant outside the dropped periods are affine in the numbers of dropped
  periods: ``v0 + sum_k t_k·s_k``. Replays with one more period kept in the runs of one
  direction k measure each slope ``s_k``; a further replay with two more in every direction
  checks the affine form on every instant (otherwise the full list is replayed).
- **Peaks.** Inside a run the instants of consecutive periods differ by the period's net bytes,
  so over the run each instant is highest in its first or last period, both replayed (ties:
  the earlier one, as the simulator keeps the first instant reaching a new high). A window's
  peak is therefore the first highest among the extrapolated instants outside the dropped
  periods, with the breakdown of that instant: equal to the full replay, to the byte
  (``tests/test_pipeline_compression.py``).

The same rows, kept symbolic in the micro-batch size and the sequence length on the step
template's recording machine, give the rank's template (``compile_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.peak_candidates import candidates
from planner.step_template import RecordingMachine, WindowTemplate
from planner.stepsim import _INDEX, Buf, Machine, PeakSnap

HOLD_WARM_WORK = 1  # planner.pipeline_memory's flag (its import would be circular)

_SLOT = {"F": 0, "B": 1, "I": 1, "W": 2}
MIN_DROPPED = 2  # periods a run must stand in for to be worth a replay of its own
_MAX_PERIOD = 512


@dataclass
class Run:
    start: int  # index of the first action of its first period
    period: int  # actions per period
    shift: int  # micro-batch index added per period
    reps: int  # periods
    keep_before: int = 1
    keep_after: int = 1

    @property
    def dropped(self) -> int:
        return self.reps - self.keep_before - self.keep_after

    def span(self, extra: int = 0) -> tuple[int, int]:
        """Indices of the dropped actions, ``extra`` periods after the kept ones replayed."""
        return (self.start + (self.keep_before + extra) * self.period,
                self.start + (self.reps - self.keep_after) * self.period)


def find_runs(actions: list, max_period: int = _MAX_PERIOD, min_reps: int = 4) -> list[Run]:
    """Maximal periodic stretches (non-overlapping, the ones covering most actions first)."""
    n = len(actions)
    if n < 2 * min_reps:
        return []
    tok = np.array([_SLOT[a[0]] * 4 + (a[0] == "I") + 8 * a[1] for a in actions], dtype=np.int64)
    mb = np.array([a[2] for a in actions], dtype=np.int64)
    found = []
    for P in range(1, min(max_period, n // min_reps) + 1):
        good = tok[P:] == tok[:-P]  # action i + P repeats action i ...
        d = mb[P:] - mb[:-P]  # ... with this shift
        cont = good[1:] & good[:-1] & (d[1:] == d[:-1])
        first = good.copy()
        first[1:] &= ~cont
        last = good.copy()
        last[:-1] &= ~cont
        for i0, i1 in zip(np.nonzero(first)[0], np.nonzero(last)[0]):
            reps = (i1 - i0 + 1 + P) // P  # actions i0 .. i1 + P
            if reps >= min_reps and d[i0] > 0:
                found.append(Run(int(i0), P, int(d[i0]), int(reps)))
    found.sort(key=lambda r: (-(r.reps - 2) * r.period, r.period, r.start))
    taken: list[Run] = []
    for r in found:
        a, b = r.start, r.start + r.reps * r.period
        if all(b <= t.start or t.start + t.reps * t.period <= a for t in taken):
            taken.append(r)
    return sorted(taken, key=lambda r: r.start)


def _counts(actions: list, run: Run) -> dict:
    """Per stage, forwards minus input backwards and input minus weight backwards per period."""
    out: dict[int, list[int]] = {}
    for k, st, _, _ in actions[run.start:run.start + run.period]:
        c = out.setdefault(st, [0, 0])
        if k == "F":
            c[0] += 1
        elif k in ("B", "I"):
            c[0] -= 1
            c[1] += k == "I"
        else:
            c[1] -= 1
    return {st: c for st, c in out.items() if c != [0, 0]}


def _balanced(*cs: dict) -> bool:
    tot: dict[int, list[int]] = {}
    for c in cs:
        for st, (a, b) in c.items():
            t = tot.setdefault(st, [0, 0])
            t[0] += a
            t[1] += b
    return all(v == [0, 0] for v in tot.values())


def plan(actions: list) -> list[list[Run]]:
    """The runs to stand in for, grouped into directions (runs dropped by the same number of
    periods): a run that balances on its own, or two that balance together."""
    first_grad: dict[int, int] = {}
    pins = []
    for i, (k, st, _, flag) in enumerate(actions):
        if k in ("B", "W") and st not in first_grad:
            first_grad[st] = i
        if flag:
            pins.append(i)
    held = {(st, j) for k, st, j, flag in actions if flag == HOLD_WARM_WORK}
    pins += [i for i, (k, st, j, _) in enumerate(actions) if (st, j) in held]
    runs = []
    for r in find_runs(actions):
        end = r.start + r.reps * r.period
        # the periods before the gap must include every stage's first backward, and one more
        q = [(i - r.start) // r.period for i in first_grad.values() if r.start <= i < end]
        r.keep_before = max(q) + 2 if q else 1
        for i in pins:  # flagged actions are replayed
            if r.start <= i < end:
                p = (i - r.start) // r.period
                if r.keep_before <= p < r.reps - r.keep_after:
                    if p - r.keep_before < r.reps - r.keep_after - p:
                        r.keep_before = p + 1
                    else:
                        r.keep_after = r.reps - p
        if r.dropped >= MIN_DROPPED:
            runs.append(r)
    counts = [_counts(actions, r) for r in runs]
    groups: list[list[Run]] = []
    loose = []
    for r, c in zip(runs, counts):
        (groups.append([r]) if not c else loose.append((r, c)))
    while loose:
        r, c = loose.pop(0)
        best = None
        for i, (r2, c2) in enumerate(loose):
            if _balanced(c, c2) and (best is None or
                                     min(r2.dropped, r.dropped) > min(loose[best][0].dropped,
                                                                      r.dropped)):
                best = i
        if best is None:
            continue
        r2, _ = loose.pop(best)
        n = min(r.dropped, r2.dropped)
        for x in (r, r2):
            x.keep_before = x.reps - x.keep_after - n
        groups.append([r, r2])
    return groups


def shortened(actions: list, runs: list[Run], extra: dict[int, int]) -> tuple[list, int] | None:
    """The list with each run's dropped periods left out (``extra[id(run)]`` of them replayed
    after its kept ones, between two cut markers), micro-batches renumbered per stream; with
    the micro-batch count, or None when it is not a valid step."""
    cuts: dict[int, tuple[int, int]] = {}  # open position -> (close position, resume position)
    for r in runs:
        x = extra.get(id(r), 0)
        a, b = r.span(x)
        cuts[r.start + r.keep_before * r.period] = (a, b)
    res = []
    nxt: dict[tuple[int, int], int] = {}
    inputs: dict[int, list[int]] = {}
    mb_limit = len(actions)  # an impossible micro-batch: the list is refused
    i, n, close, resume = 0, len(actions), -1, -1
    while i < n:
        if i in cuts:
            close, resume = cuts[i]
            res.append(("|", -1, -1, 0))
        if i == close:
            res.append(("|", -1, -1, 0))
            i, close = resume, -1
            continue
        k, st, _, flag = actions[i]
        if k == "W":  # the k-th weight backward of a stage follows its k-th input backward
            n_w = nxt.get((2, st), 0)
            nxt[2, st] = n_w + 1
            ins = inputs.get(st, [])
            j = ins[n_w] if n_w < len(ins) else mb_limit
        else:
            key = (_SLOT[k], st)
            j = nxt.get(key, 0)
            nxt[key] = j + 1
            if k == "I":
                inputs.setdefault(st, []).append(j)
        res.append((k, st, j, flag))
        i += 1
    if close >= 0:
        res.append(("|", -1, -1, 0))
    mbs = {v for (slot, _), v in nxt.items() if slot < 2}
    if len(mbs) != 1:
        return None
    mb = mbs.pop()
    return (res, mb) if _valid(res, mb) else None


def _valid(items: list, mb: int) -> bool:
    seen: dict[tuple[int, int], str] = {}
    for k, st, j, _ in items:
        if k == "|":
            continue
        if j >= mb:
            return False
        done = seen.get((st, j), "")
        if (k == "F" and done) or (k in ("B", "I") and done != "F") or (k == "W" and done != "FI"):
            return False
        seen[st, j] = done + k
    return all(v in ("FB", "FIW") for v in seen.values())


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


def _recording_cut(m: RecordingMachine) -> None:
    m._flush()
    m.cuts.append(len(m.marks))


class _Recording(RecordingMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cuts: list[int] = []

    def cut(self) -> None:
        _recording_cut(self)

    def trace(self):
        self._flush()
        rows = self.marks_matrix()
        return rows, [(mk[1], mk[2], mk[3]) for mk in self.marks]


# ---- the replays and their extrapolation ------------------------------------------------------
def _outside(rows, meta, cuts: list[int], wanted: list[int]):
    """The rows of the ``wanted`` windows outside the replayed extra periods (between cut
    pairs)."""
    keep = np.isin(np.array([mk[2] for mk in meta], dtype=np.int64), wanted)
    for a, b in zip(cuts[::2], cuts[1::2]):
        keep[a:b] = False
    idx = np.nonzero(keep)[0]
    return rows[idx], [meta[i] for i in idx]


def extrapolated(make, actions: list, machine_type):
    """(rows, meta, window ids) of the full step's instants outside the dropped periods, from
    shortened replays; None when the list has no run to stand in for or the replays do not
    have the affine form (the caller replays the full list)."""
    groups = plan(actions)
    if not groups:
        return None
    runs = [r for g in groups for r in g]
    lists = [shortened(actions, runs, {})]
    for g in groups:
        lists.append(shortened(actions, runs, {id(r): 1 for r in g}))
    lists.append(shortened(actions, runs, {id(r): 2 for r in runs}))
    if any(x is None for x in lists):
        return None
    traces = []
    for items, mb in lists:
        m = machine_type()
        prog = make(m, items, mb)
        wanted = prog.step_windows()
        rows, meta = m.trace()
        traces.append(_outside(rows, meta, m.cuts, wanted) + (wanted,))
    base, base_meta, wanted = traces[0]
    if any(t[1] != base_meta or t[2] != wanted for t in traces[1:]):
        return None
    slopes = [t[0] - base for t in traces[1:-1]]
    if not np.array_equal(traces[-1][0], base + 2 * sum(slopes)):
        return None
    big = int(np.abs(base).max(initial=0)) + sum(int(np.abs(s).max(initial=0)) * g[0].dropped
                                                  for s, g in zip(slopes, groups))
    obj = big >= 1 << 62
    full = base.astype(object) if obj else base.copy()
    for s, g in zip(slopes, groups):
        full = full + (s.astype(object) if obj else s) * g[0].dropped
    return full, base_meta, wanted


def first_highest(rows, meta, window: int) -> PeakSnap:
    best, bi = None, -1
    for i, (_, _, w) in enumerate(meta):
        if w != window:
            continue
        t = int(sum(int(x) for x in rows[i]))
        if best is None or t > best:
            best, bi = t, i
    if bi < 0:
        return PeakSnap()
    return PeakSnap(best, [int(x) for x in rows[bi]], meta[bi][0], meta[bi][1])


def rank_windows(make, actions: list) -> list[PeakSnap] | None:
    """The step windows' peaks (first step, steady step) of a rank from shortened replays;
    ``make(machine, items, microbatches)`` builds the rank's program. None: no run found or
    the affine form failed (replay the full list)."""
    got = extrapolated(make, actions, TraceMachine)
    if got is None:
        return None
    rows, meta, wanted = got
    return [first_highest(rows, meta, w) for w in wanted]


def rank_template(make, actions: list, domain) -> WindowTemplate | None:
    """The same with the micro-batch size and sequence length symbolic over ``domain``."""
    from planner.symbolic import Poly

    def machine():
        return _Recording()

    def build(m, items, mb):
        B = domain[0] if domain[0] is not None else Poly({(0, 0): 2, (1, 0): 1})
        T = domain[1] if domain[1] is not None else Poly({(0, 0): 2, (0, 1): 1})
        return make(m, items, mb, (B, T))

    got = extrapolated(build, actions, machine)
    if got is None:
        return None
    full, meta, wanted = got
    full = np.asarray(full)
    n = len(meta)
    cats = full.reshape(n, 5, -1)
    used = np.nonzero(np.abs(cats).reshape(-1, cats.shape[2]).max(0))[0]
    used = np.union1d(used, [0])
    deg = int(round(cats.shape[2] ** 0.5))
    exps = tuple((int(u) // deg, int(u) % deg) for u in used)
    cats = cats[:, :, used]
    total = cats.sum(1)
    ops = [mk[0] for mk in meta]
    phases = [mk[1] for mk in meta]
    windows = np.array([mk[2] for mk in meta])
    out = []
    for w in wanted:
        sel = np.nonzero(windows == w)[0]
        out.append(candidates(total[sel], cats[sel], exps, [ops[i] for i in sel],
                              [phases[i] for i in sel]))
    return WindowTemplate(domain, exps, out)


__all__ = ["Run", "TraceMachine", "extrapolated", "find_runs", "plan", "rank_template",
           "rank_windows", "shortened"]
