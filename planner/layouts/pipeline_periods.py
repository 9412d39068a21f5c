"""The periodic runs of a pipeline rank's action list, and the shortened lists that stand in for
them.

``planner.layouts.pipeline_memory`` replays a rank's step action by action over the schedule's
per-rank action list. Those lists are periodic: a warm-up (forwards), a steady state (1F1B: F, B
pairs; interleaved: rounds; zero bubble: F, I, W triples; ZB-V: six actions) and a cool-down,
each a stretch where action ``i + P`` is action ``i`` with the micro-batch index ``c`` higher.
They are found in the list itself (``planner.layouts.pipeline_runs.find_runs``: kinds and stages
equal, micro-batches shifted by one constant), so whatever ``planner.layouts.pipeline_schedules``
builds is covered.

- **Shortened lists.** A run of R periods keeps its first K1 and last K2 periods and leaves out
  the N = R - K1 - K2 between. Every kept action's micro-batch is renumbered by its rank among
  the kept actions of its stream (a stage's forwards, input backwards; the k-th W follows the
  k-th I), so a shortened list is the action list of a step with fewer micro-batches (checked
  while ``shortened`` renumbers). Runs are left out in directions: a run, or a few runs
  together, whose periods take as many forwards as input backwards from every stage of the rank
  (a warm-up of forwards goes with a cool-down of backwards), all by the same number of periods.
  A run of a direction with periods to spare (a warm-up longer than the cool-down it balances)
  is split: the rest is a run of its own, which another direction may leave out, so the kept
  periods do not depend on how long the run is (ranks whose warm-ups differ in length replay
  alike lists, and share them: ``planner.layouts.pipeline_replays``). Each direction costs one
  more replay of the list: where the lists are long (a deep interleaved pipeline's rounds), a
  direction after the first is kept only where the lists' actions in all come to fewer with it
  (``worth``).
- **Why the step is affine in N.** From the period after each stage's first backward (which
  makes the gradients) on, every period of a run runs the same ops on the same shapes, so it
  leaves the same bytes behind, and what a left-out period leaves is live at a later instant
  exactly when the like bytes of a kept one are (sends until the action loop ends, losses until
  the step ends, outputs until the next step, batch and receive buffers per micro-batch). So
  the live bytes per category at every instant outside the left-out periods are affine in the
  numbers of periods left out (``planner.layouts.pipeline_replays`` measures the slopes and
  checks the form). Periods that are not alike are replayed: those with a flagged action
  (1F1B's warm-up holds one micro-batch's output until its 1B1F loop ends: that micro-batch's
  forward and backward, and the backward that frees it) split their run; a list where the held
  micro-batch's forward and backward would get different numbers is refused.
- **Peaks.** Inside a run the instants of consecutive periods differ by the period's net bytes,
  so over the run each instant is highest in its first or last period, both replayed (ties go
  to the earlier one, which the simulator keeps). A window's peak is therefore the first highest
  among the instants outside the left-out periods, with that instant's breakdown: equal to the
  full replay to the byte (``tests/test_pipeline_compression.py``).
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

from planner.layouts.pipeline_checks import all_valid, balanced_group, built
from planner.layouts.pipeline_runs import _SLOT, Actions, Run, find_runs

HOLD_WARM_WORK = 1  # planner.layouts.pipeline_memory's flag (its import would be circular)

MIN_DROPPED = 2  # periods a run must stand in for to be worth a replay of its own
MAX_DIRECTIONS = 6  # each costs one more replay
_MAX_RUNS = 24  # the runs standing in for most actions are grouped into directions
# a run split in two keeps two more periods: short periods only, and as many to spare as its
# rest can leave out (ZB-V pp 64 m 512: its 64 ranks in 14 classes, 6,260 actions replayed in
# all, against 17 and 7,892 from 8 to spare and 64 and 81,728 unsplit)
SPLIT_MAX_PERIOD = 8
SPLIT_MIN_SPARE = MIN_DROPPED + 2
LONG_LIST = 1024  # a shortened list this long keeps a direction only where it pays (``worth``)
BATCH_ACTIONS = 384  # a trial's lists checked as arrays (pipeline_checks) from this many actions


def _counts(actions: list, run: Run) -> dict[int, list[int]]:
    """Per stage: forwards, input backwards (B or I), I's and W's in one period."""
    out: dict[int, list[int]] = {}
    for k, st, _, _ in actions[run.start:run.start + run.period]:
        c = out.setdefault(st, [0, 0, 0, 0])
        c[_SLOT[k] + (k == "W")] += 1
        c[2] += k == "I"
    return out


def plan(actions) -> list[list[Run]]:
    """The runs to stand in for, grouped into directions (runs dropped by the same number of
    periods): a run that balances on its own, or two that balance together."""
    actions = Actions.of(actions)
    kind, stage, mb, flag = actions.kind, actions.stage, actions.mb, actions.flag
    grads = np.flatnonzero((kind == 1) | (kind == 3))  # B and W: per stage, the first
    sts, at = np.unique(stage[grads], return_index=True)
    first_grad = dict(zip(sts.tolist(), grads[at].tolist()))
    pins: list[int] = []
    if flag is not None:
        pins = np.flatnonzero(flag).tolist()
        for i in np.flatnonzero(flag == HOLD_WARM_WORK).tolist():  # the held micro-batch's
            pins += np.flatnonzero((stage == stage[i]) & (mb == mb[i])).tolist()
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
        r.keep_before = r.first_keep = max(q) + 2 if q else 1
        if r.dropped >= MIN_DROPPED:
            kept.append(r)
    return worth(len(actions),
                 grouped(actions, sorted(kept, key=lambda r: -r.dropped * r.period)[:_MAX_RUNS]))


def worth(n: int, groups: list[list[Run]]) -> list[list[Run]]:
    """The directions, each after the first kept only where the lists come to fewer actions
    with it or stay short (below ``LONG_LIST`` actions): a direction costs one more replay of
    the list (k directions: the shortest list, one with a period more in each direction, one
    with two more in all), which a long list (a deep interleaved pipeline's rounds) pays in
    thousands of actions, while a short list's direction is what makes alike ranks' lists
    alike (their replays shared: ``pipeline_replays``)."""
    kept: list[list[Run]] = []
    left, extra = n, 0  # the shortest list's actions, and one period of each kept direction
    for g in groups:
        d = sum(r.dropped * r.period for r in g)
        p = sum(r.period for r in g)
        k = len(kept)
        cost = (k + 3) * (left - d) + 3 * (extra + p)
        if not k or left - d < LONG_LIST or cost < (k + 2) * left + 3 * extra:
            kept.append(g)
            left, extra = left - d, extra + p
    return kept


def grouped(actions, runs: list[Run]) -> list[list[Run]]:
    """``plan``'s directions: each run, most periods dropped first, with the smallest group of
    the runs after it (up to 3 of the next 12) that balances with it (``balanced_group``:
    every stage loses as many forwards as input backwards, the same number for every stage,
    and as many W's as I's), the group dropping the most periods; a run that balances with
    none is left out. A run of the group with periods to spare is split (``_split``)."""
    stages = np.unique(Actions.of(actions).stage).tolist()
    col = {st: i for i, st in enumerate(stages)}

    def counts(r):  # flat: 4 per stage
        v = [0] * (4 * len(stages))
        for st, c in _counts(actions, r).items():
            v[4 * col[st]:4 * col[st] + 4] = c
        return tuple(v)
    loose = sorted(((r, counts(r)) for r in runs), key=lambda rc: -rc[0].dropped)
    groups: list[list[Run]] = []
    while loose:
        (r, c), rest = loose[0], loose[1:]
        near = rest[:12]
        best = balanced_group(c, r.dropped, [x[1] for x in near], [x[0].dropped for x in near])
        if best is None:
            loose = rest
            continue
        n, combo = best
        g = [r] + [rest[i][0] for i in combo]
        loose = [rest[i] for i in range(len(rest)) if i not in combo]
        for k, x in enumerate(g):
            if x.dropped - n >= SPLIT_MIN_SPARE and x.period <= SPLIT_MAX_PERIOD:
                # the rest of the run goes on by itself
                x, more = _split(x, n)
                g[k] = x
                loose.append((more, counts(more)))
            x.keep_before = x.reps - x.keep_after - n
        groups.append(g)
        loose.sort(key=lambda rc: -rc[0].dropped)
    return groups


def _split(run: Run, n: int) -> tuple[Run, Run]:
    """The run's first periods, as many as leave out ``n`` after its kept ones, and a run of the
    rest (after every stage's first backward: one period kept at each end). A run left out by
    as many periods as the group allows keeps its spare periods as a run of their own, which
    another group may leave out: the kept periods then do not depend on the run's length
    (ranks whose warm-ups differ in length replay alike lists: a class)."""
    head = run.first_keep + n + run.keep_after
    origin = (*run.origin, run.dropped)  # (what the search compared: kept with the pieces)
    a = Run(run.start, run.period, run.shift, head, run.first_keep, run.keep_after,
            run.first_keep, origin)
    b = Run(run.start + head * run.period, run.period, run.shift, run.reps - head,
            origin=origin)
    return a, b


class Prepared:
    """A list's actions as per-action columns (stream key: a stage's forwards, its input
    backwards (B or I), its W's; whether I or W; the stage) and the (forward, backward) index
    pairs of the micro-batches the 1F1B warm-up holds: built once per list, for the many
    shortenings ``shortened_lists`` tries."""

    def __init__(self, actions) -> None:
        self.actions = a = Actions.of(actions)
        self.nst = int(a.stage.max()) + 1 if len(a) else 1
        self.key = (_STREAM[a.kind] * self.nst + a.stage).tolist()
        self.kind = a.kind.tolist()
        self.held = []
        if a.flag is not None:
            back = (a.kind == 1) | (a.kind == 2)
            for i in np.flatnonzero(a.flag == HOLD_WARM_WORK).tolist():
                b = np.flatnonzero(back & (a.stage == a.stage[i]) & (a.mb == a.mb[i]))
                self.held.append((i, int(b[0])))


_STREAM = np.array([_SLOT[k] for k in "FBIW"], dtype=np.int64)  # kind code -> stream slot
_MARK = ("|", -1, -1, 0)


def _kept(n: int, runs: list[Run], extra: dict[int, int]) -> list:
    """The kept index ranges, in order, with None where a cut marker goes."""
    cuts: dict[int, tuple[int, int]] = {}
    for r in runs:
        a, b = r.span(extra.get(id(r), 0))
        cuts[r.start + r.keep_before * r.period] = (a, b)
    opens = sorted(cuts)
    out: list = []
    i, close, resume = 0, -1, -1
    while i < n:
        c = bisect_left(opens, i)
        nxt = opens[c] if c < len(opens) else n
        if close >= i:
            nxt = min(nxt, close)
        if nxt >= n:
            out.append(range(i, n))
            break
        if nxt > i:
            out.append(range(i, nxt))
        i = nxt
        if i in cuts:
            close, resume = cuts[i]
            out.append(None)
        if i == close:
            out.append(None)
            i, close = resume, -1
            continue
        out.append(range(i, i + 1))
        i += 1
    if close >= 0:
        out.append(None)
    return out


def shortened(actions: list, runs: list[Run], extra: dict[int, int],
              prep: Prepared | None = None) -> tuple[list, int] | None:
    """The list with each run's dropped periods left out (``extra[id(run)]`` of them replayed
    after its kept ones, between two cut markers), micro-batches renumbered per stream; with
    the micro-batch count, or None when it is not a valid step: one micro-batch count for every
    stream, and each (stage, micro-batch)'s actions in order exactly F, B or F, I, W."""
    if prep is None:
        prep = Prepared(actions)
    n, nst = len(actions), prep.nst
    keys, kinds = prep.key, prep.kind
    nxt = [0] * (3 * nst)  # per stream: the next micro-batch number
    inputs: list[list[int]] = [[] for _ in range(nst)]
    state: dict[int, int] = {}  # per (stage, micro-batch) begun: 1 F, 2 FB, 3 FI, 4 FIW
    started = []
    new_j = {}
    res = []
    top = 0
    for seg in _kept(n, runs, extra):
        if seg is None:
            res.append(_MARK)
            continue
        for i in seg:
            key, kind = keys[i], kinds[i]
            a = actions[i]
            st = a[1]
            if kind == 3:  # the k-th weight backward of a stage follows its k-th input backward
                n_w = nxt[key]
                nxt[key] = n_w + 1
                ins = inputs[st]
                j = ins[n_w] if n_w < len(ins) else n  # past the inputs: refused
            else:
                j = nxt[key]
                nxt[key] = j + 1
                if kind == 2:
                    inputs[st].append(j)
            c = st * (n + 1) + j
            now = _STEP[kind].get(state.get(c, 0))
            if now is None:
                return None
            if now == 1:
                started.append(c)
            state[c] = now
            top = max(top, j)
            res.append((a[0], st, j, a[3]))
            new_j[i] = j
    mbs = {v for v in nxt[:2 * nst] if v}
    if len(mbs) != 1:
        return None
    mb = mbs.pop()
    if top >= mb or any(state[c] not in (2, 4) for c in started):
        return None
    for i, b in prep.held:
        if new_j.get(i, -1) != new_j.get(b, -2):
            return None
    return res, mb


# per kind (F, B, I, W): a (stage, micro-batch)'s state before -> after
_STEP = ({0: 1}, {1: 2}, {1: 3}, {3: 4})


def shortened_lists(actions: list) -> tuple[list[list[Run]], list]:
    """The directions kept and the lists to replay: none of the dropped periods, one more in
    one direction, two more in all. Directions are added one by one while every list stays a
    valid step; one that does not is tried merged with a later one (both then drop the same
    number of periods: the 1F1B warm-up's held micro-batch keeps its forward and backward
    paired only when the periods dropped before each are as many)."""
    actions = Actions.of(actions)
    todo = plan(actions)
    prep = Prepared(actions) if todo else None

    def extras(trial):
        runs = [r for x in trial for r in x]
        return runs, [{}] + [{id(r): 1 for r in x} for x in trial] + [{id(r): 2 for r in runs}]

    def build(trial):
        runs, es = extras(trial)
        cand = []
        for e in es:  # (the first list that is not a valid step ends the trial)
            c = shortened(actions, runs, e, prep)
            if c is None:
                return None
            cand.append(c)
        return cand

    def attempt(trial):
        # the verdict alone where the batch check applies (pipeline_checks) and the lists are
        # long enough for it to pay: only the last trial kept has its lists built, below (I and
        # W actions, or short lists: built and checked by ``shortened``)
        if (len(trial) + 2) * len(actions) < BATCH_ACTIONS:
            return build(trial)
        ok = all_valid(prep, *extras(trial))
        if ok is None:
            return build(trial)
        return _CHECKED if ok else None

    groups, lists = choose_directions(todo, attempt)
    if lists is _CHECKED:  # checked valid: built from the same arrays
        lists = built(prep, *extras(groups))
    return groups, lists


_CHECKED = ["(checked, not built)"]


def choose_directions(todo: list[list[Run]], attempt) -> tuple[list[list[Run]], list]:
    """Every direction at once where ``attempt(directions)`` (the lists to replay, or None when
    one is not a valid step) succeeds; otherwise directions added one by one while it does, one
    that fails tried merged with a later one, both then dropping the same number of periods."""
    groups: list[list[Run]] = []
    lists: list = []
    if len(todo) > 1:  # every direction at once: one trial where all its lists are steps
        every = todo[:MAX_DIRECTIONS]
        cand = attempt(every)
        if cand is not None:
            return every, cand
    while todo and len(groups) < MAX_DIRECTIONS:
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


__all__ = ["Prepared", "grouped", "plan", "shortened", "shortened_lists"]
