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
from itertools import combinations

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
    for r in found:  # each trimmed to its longest stretch of whole periods not yet taken
        a, b = r.start, r.start + r.reps * r.period
        free = [(a, b)]
        for t in taken:
            ta, tb = t.start, t.start + t.reps * t.period
            free = [piece for x, y in free for piece in ((x, min(y, ta)), (max(x, tb), y))
                    if piece[0] < piece[1]]
        best = None
        for x, y in free:
            x = a + -(-(x - a) // r.period) * r.period
            reps = (y - x) // r.period
            if reps >= min_reps and (best is None or reps > best.reps):
                best = Run(x, r.period, r.shift, reps)
        if best is not None:
            taken.append(best)
    return sorted(taken, key=lambda r: r.start)


def _counts(actions: list, run: Run) -> dict[int, list[int]]:
    """Per stage: forwards, input backwards (B or I), I's and W's in one period."""
    out: dict[int, list[int]] = {}
    for k, st, _, _ in actions[run.start:run.start + run.period]:
        c = out.setdefault(st, [0, 0, 0, 0])
        c[_SLOT[k] + (k == "W")] += 1
        c[2] += k == "I"
    return out


def _uniform(stages: list[int], cs: list[dict]) -> bool:
    """Dropping one period of each run in ``cs`` keeps a valid step: every stage of the rank
    loses as many forwards as input backwards, the same number for every stage, and as many
    W's as I's."""
    tot = {st: [0, 0, 0, 0] for st in stages}
    for c in cs:
        for st, v in c.items():
            if st not in tot:
                return False
            tot[st] = [a + b for a, b in zip(tot[st], v)]
    per = {f for f, b, i, w in tot.values()}
    return len(per) == 1 and all(f == b and i == w for f, b, i, w in tot.values())


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
    for whole in find_runs(actions):
        # periods holding a flagged action (or an action of the micro-batch a flag holds) are
        # replayed: the run is split around them
        special = {(i - whole.start) // whole.period for i in pins
                   if whole.start <= i < whole.start + whole.reps * whole.period}
        a = 0
        for b in sorted(special) + [whole.reps]:
            if b > a:
                runs.append(Run(whole.start + a * whole.period, whole.period, whole.shift, b - a))
            a = b + 1
    kept = []
    for r in runs:
        end = r.start + r.reps * r.period
        # the periods before the gap include every stage's first backward, and one more
        q = [(i - r.start) // r.period for i in first_grad.values() if r.start <= i < end]
        r.keep_before = max(q) + 2 if q else 1
        if r.dropped >= MIN_DROPPED:
            kept.append(r)
    runs = kept
    stages = sorted({st for _, st, _, _ in actions})
    loose = sorted(((r, _counts(actions, r)) for r in runs), key=lambda rc: -rc[0].dropped)
    groups: list[list[Run]] = []
    while loose:
        (r, c), rest = loose[0], loose[1:]
        best = None
        for size in range(0, 4):  # the smallest group with the first run, most periods dropped
            for combo in combinations(range(min(len(rest), 12)), size):
                cs = [c] + [rest[i][1] for i in combo]
                if _uniform(stages, cs):
                    n = min([r.dropped] + [rest[i][0].dropped for i in combo])
                    if best is None or n > best[0]:
                        best = (n, combo)
            if best is not None:
                break
        if best is None:
            loose = rest
            continue
        n, combo = best
        g = [r] + [rest[i][0] for i in combo]
        for x in g:
            x.keep_before = x.reps - x.keep_after - n
        groups.append(g)
        loose = [rest[i] for i in range(len(rest)) if i not in combo]
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
    new_j: dict[int, int] = {}  # original index -> renumbered micro-batch
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
        new_j[i] = j
        i += 1
    if close >= 0:
        res.append(("|", -1, -1, 0))
    mbs = {v for (slot, _), v in nxt.items() if slot < 2}
    if len(mbs) != 1:
        return None
    mb = mbs.pop()
    return (res, mb) if _valid(res, mb) and _held_paired(actions, new_j) else None


def _held_paired(actions: list, new_j: dict[int, int]) -> bool:
    """The micro-batch whose output the 1F1B warm-up holds (its backward does not free it)
    keeps its forward and backward under one number."""
    held = [(i, st, j) for i, (k, st, j, flag) in enumerate(actions) if flag == HOLD_WARM_WORK]
    for i, st, j in held:
        b = next(x for x, (k, s2, j2, _) in enumerate(actions)
                 if k in ("B", "I") and s2 == st and j2 == j)
        if new_j.get(i, -1) != new_j.get(b, -2):
            return False
    return True


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


def _lists(actions: list) -> tuple[list[list[Run]], list]:
    """The directions kept and the lists to replay: none of the dropped periods, one more in
    one direction, two more in all. Directions are added one by one while every list stays a
    valid step; one that does not is tried merged with a later one (both then drop the same
    number of periods: the 1F1B warm-up's held micro-batch keeps its forward and backward
    paired only when the periods dropped before each are as many)."""
    groups: list[list[Run]] = []
    lists: list = []
    todo = plan(actions)

    def attempt(trial):
        runs = [r for x in trial for r in x]
        cand = [shortened(actions, runs, {})]
        cand += [shortened(actions, runs, {id(r): 1 for r in x}) for x in trial]
        cand.append(shortened(actions, runs, {id(r): 2 for r in runs}))
        return cand if all(c is not None for c in cand) else None

    while todo:
        g = todo.pop(0)
        cand = attempt(groups + [g])
        if cand is not None:
            groups, lists = groups + [g], cand
            continue
        for i, h in enumerate(todo):
            merged = g + h
            was = [r.keep_before for r in merged]
            n = min(r.dropped for r in merged)
            for r in merged:
                r.keep_before = r.reps - r.keep_after - n
            cand = attempt(groups + [merged])
            if cand is not None:
                groups, lists = groups + [merged], cand
                todo.pop(i)
                break
            for r, kb in zip(merged, was):
                r.keep_before = kb
    return groups, lists


_CLASSES: dict = {}  # (setup, shortened lists with stage roles) -> measured rows
_CLASSES_MAX = 64


def _measure(make, lists: list, machine_type):
    """(base rows, slopes, meta, window ids) of the shortened replays, or None when they do
    not have the affine form."""
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
    return base, slopes, base_meta, wanted


def extrapolated(make, actions: list, machine_type, roles: dict | None = None, setup=None):
    """(rows, meta, window ids) of the full step's instants outside the dropped periods, from
    shortened replays; None when the list has no run to stand in for or the replays do not
    have the affine form (the caller replays the full list). ``roles`` (stage -> what its
    replay depends on) and ``setup`` (a key of everything else) share the replays between
    ranks whose shortened lists are alike up to the stages' names (ranks in classes): they
    differ only in how many periods each direction stands in for."""
    groups, lists = _lists(actions)
    if not groups:
        return None
    key = None
    if roles is not None:
        key = (setup, machine_type, tuple(
            (mb, tuple((k, roles.get(st), j, f) for k, st, j, f in items)) for items, mb in lists))
        got = _CLASSES.get(key)
    if key is None or got is None:
        got = _measure(make, lists, machine_type)
        if key is not None:
            if len(_CLASSES) >= _CLASSES_MAX:
                _CLASSES.pop(next(iter(_CLASSES)), None)
            _CLASSES[key] = got if got is not None else False
    if not got:
        return None
    base, slopes, base_meta, wanted = got
    big = int(np.abs(base).max(initial=0)) + sum(int(np.abs(s).max(initial=0)) * g[0].dropped
                                                  for s, g in zip(slopes, groups))
    obj = big >= 1 << 62
    full = base.astype(object) if obj else base.copy()
    for s, g in zip(slopes, groups):
        full = full + (s.astype(object) if obj else s) * g[0].dropped
    return full, base_meta, wanted


def first_highest(rows, meta, window: int) -> PeakSnap:
    """The window's peak: its first row with the highest total."""
    sel = np.nonzero(np.array([mk[2] for mk in meta]) == window)[0]
    if not len(sel):
        return PeakSnap()
    tot = rows[sel].sum(1)
    i = int(sel[int(np.argmax(tot))])
    row = [int(x) for x in rows[i]]
    return PeakSnap(sum(row), row, meta[i][0], meta[i][1])


def rank_windows(make, actions: list, roles=None, setup=None) -> list[PeakSnap] | None:
    """The step windows' peaks (first step, steady step) of a rank from shortened replays;
    ``make(machine, items, microbatches)`` builds the rank's program. None: no run found or
    the affine form failed (replay the full list)."""
    got = extrapolated(make, actions, TraceMachine, roles, setup)
    if got is None:
        return None
    rows, meta, wanted = got
    return [first_highest(rows, meta, w) for w in wanted]


def rank_template(make, actions: list, domain, roles=None, setup=None) -> WindowTemplate | None:
    """The same with the micro-batch size and sequence length symbolic over ``domain``."""
    from planner.symbolic import Poly

    def build(m, items, mb):
        B = domain[0] if domain[0] is not None else Poly({(0, 0): 2, (1, 0): 1})
        T = domain[1] if domain[1] is not None else Poly({(0, 0): 2, (0, 1): 1})
        return make(m, items, mb, (B, T))

    got = extrapolated(build, actions, _Recording, roles, (setup, domain))
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


# ---- a rank's step -------------------------------------------------------------------------------
def stage_roles(schedule, rank: int, model) -> dict[int, tuple]:
    """What a stage's replay depends on besides the setup: its place on the rank, first or last
    of the pipeline, its layer count, and whether its neighbours are on the same rank."""
    from planner.zero import pipeline_stage_layers

    S, on = schedule.num_stages, schedule.stage_to_rank
    layers = pipeline_stage_layers(model.num_layers, S)
    mine = [s for s in range(S) if on[s] == rank]
    return {s: (i, s == 0, s == S - 1, layers[s], s + 1 < S and on[s + 1] == rank,
                s > 0 and on[s - 1] == rank) for i, s in enumerate(mine)}


def _setup(model, training, schedule, device: str) -> tuple:
    return (model.model_dump_json(), training.model_dump_json(), device, schedule.name,
            schedule.num_stages, schedule.num_ranks)


def rank_step(model, training, schedule, rank: int, device: str = "cuda"):
    """The rank's replayed step (``StagePeak``) from shortened replays; the full list is replayed
    where no run is found or the affine form fails."""
    from planner.pipeline_memory import PipelineRankProgram, StagePeak, rank_actions

    def make(m, items, mb):
        return PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                                   actions=items, microbatches=mb)
    got = rank_windows(make, rank_actions(schedule, rank), stage_roles(schedule, rank, model),
                       _setup(model, training, schedule, device))
    if got is None:
        return PipelineRankProgram(model, training, schedule, rank, device=device).run_steps()
    stages = [s for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == rank]
    return StagePeak(rank, stages, *got)


def compile_rank(model, training, schedule, rank: int, device: str, domain):
    """The rank's ``WindowTemplate`` over ``domain`` (planner/step_cache.py), from shortened
    replays on the recording machine; the full list where they do not apply."""
    from planner.pipeline_memory import PipelineRankProgram, rank_actions
    from planner.step_template import compile_windows

    def make(m, items, mb, sizes):
        return PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                                   sizes=sizes, actions=items, microbatches=mb)
    tpl = rank_template(make, rank_actions(schedule, rank), domain,
                        stage_roles(schedule, rank, model), _setup(model, training, schedule, device))
    if tpl is not None:
        return tpl
    return compile_windows(
        lambda m, sizes: PipelineRankProgram(model, training, schedule, rank, device=device,
                                             machine=m, sizes=sizes),
        domain, lambda prog: prog.step_windows())
