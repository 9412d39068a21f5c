"""Shortened replays of a pipeline rank, and the full step's peaks extrapolated from them.

``planner.layouts.pipeline_periods`` gives the lists: the rank's action list with the middle periods of
its periodic runs left out, and the same with one more period in one direction, and with two
more in all. Each is replayed on a machine that keeps the live bytes per category at every
allocation (``TraceMachine``; on the step template's recording machine, as polynomials in the
micro-batch size and the sequence length). The instants outside the replayed extra periods
correspond one to one between the replays; their live bytes are ``v0 + sum_k x_k·s_k`` with
``x_k`` the periods added in direction k (checked exactly on the replay with two more in all),
so the full step's are ``v0 + sum_k N_k·s_k`` with ``N_k`` the periods the shortest list left
out. Each window's peak is the first highest of those instants (the dropped periods' own
instants never are: see ``planner.layouts.pipeline_periods``).

Ranks whose lists are alike up to their stages' names (same roles: first or last stage, layer
count, neighbours on the rank) replay the same steps: the replays are shared (``_CLASSES``), so
the middle ranks of a 1F1B pipeline cost one set of replays, and so do most ranks of a deep ZB-V
pipeline (their runs split alike: ``pipeline_periods``). The planner passes each rank's lists as
``planner.layouts.pipeline_structure.rank_lists`` keeps them (searched once per schedule and
rank, or derived from other ranks' or counts'), shared with the structure templates. Within
those replays, the repeated forwards and backwards of 1F1B, GPipe, interleaved 1F1B and the
zero-bubble schedules (I and W as kinds of their own) are composed per kind rather than
replayed op by op (``planner.layouts.pipeline_actions``; the kinds' records shared by a
setup's classes in ``_KINDS``, on the trace machine and, per size domain, on the recording
machine of the ranks' templates, so a setup's ranks compile from one record per kind and role:
ZB-V pp 8 with 96 blocks, its middle ranks' templates 32-38 ms from 127-167 ms; ``Unmemoizable``
falls back to replaying every action).
"""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_actions import ActionMemo, Unmemoizable
from planner.layouts.pipeline_machines import TraceMachine, _Recording
from planner.layouts.pipeline_memory import PipelineRankProgram, StagePeak, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_schedules import rank_stages
from planner.layouts.sharding import stage_layers
from planner.machine import cache
from planner.machine.peak_candidates import candidates
from planner.machine.recording import _DEG, WindowTemplate, compile_windows
from planner.machine.stepsim import PeakSnap
from planner.machine.symbolic import Poly


def _outside(rows, meta, cuts: list[int], wanted: list[int]):
    """The rows of the ``wanted`` windows outside the replayed extra periods (between cut
    pairs)."""
    keep = np.isin(np.array([mk[2] for mk in meta], dtype=np.int64), wanted)
    for a, b in zip(cuts[::2], cuts[1::2]):
        keep[a:b] = False
    idx = np.nonzero(keep)[0]
    return rows[idx], [meta[i] for i in idx]


# ---- the replays and their extrapolation ------------------------------------------------------
_CLASSES: dict = {}  # (setup, shortened lists with stage roles) -> measured rows
_CLASSES_MAX = 64
_KINDS: dict = {}  # setup (and domain) -> ActionMemo entries, shared by the ranks (keyed by roles)


def clear_classes() -> None:
    _CLASSES.clear()
    _KINDS.clear()


cache.on_clear(clear_classes)  # the shared rank replays go with the per-setup caches


def _replays(make, lists: list, machine_type, memo):
    """Each list's rows outside the extra periods, with the window ids; the actions composed
    per kind where ``memo`` applies (planner/layouts/pipeline_actions.py)."""
    traces = []
    for items, mb in lists:
        m = machine_type()
        prog = make(m, items, mb)
        if memo is not None and memo.applies(prog):
            prog.memo = memo
        wanted = prog.step_windows()
        rows, meta = m.trace()
        traces.append(_outside(rows, meta, m.cuts, wanted) + (wanted,))
    return traces


def _measure(make, lists: list, machine_type, memo=None):
    """(base rows, slopes, meta, window ids) of the shortened replays, or None when they do
    not have the affine form."""
    try:
        traces = _replays(make, lists, machine_type, memo or ActionMemo())
    except Unmemoizable:  # a composed action did not add up: every action op by op
        traces = _replays(make, lists, machine_type, None)
    base, base_meta, wanted = traces[0]
    if any(t[1] != base_meta or t[2] != wanted for t in traces[1:]):
        return None
    slopes = [t[0] - base for t in traces[1:-1]]
    if not np.array_equal(traces[-1][0], base + 2 * sum(slopes)):
        return None
    return base, slopes, base_meta, wanted


def extrapolated(make, actions: list, machine_type, roles: dict | None = None, setup=None,
                 given=None):
    """(rows, meta, window ids) of the full step's instants outside the dropped periods, from
    shortened replays; None when the list has no run to stand in for or the replays do not
    have the affine form (the caller replays the full list). ``roles`` (stage -> what its
    replay depends on) and ``setup`` (a key of everything else) share the replays between
    ranks whose shortened lists are alike up to the stages' names (ranks in classes): they
    differ only in how many periods each direction stands in for. ``given``: the rank's lists
    as ``pipeline_structure.rank_lists`` keeps them (memoised per schedule and rank, shared
    with the structure templates; a whole list stands for itself), instead of searched here."""
    if given is not None:
        dropped, lists, sig = given.dropped, given.lists, given.signature
    else:
        groups, lists = shortened_lists(actions)
        if not groups:
            return None
        dropped, sig = tuple(g[0].dropped for g in groups), None
    key = None
    if roles is not None:
        if sig is None:  # (the same tuple as rank_lists' signature)
            sig = tuple((mb, tuple((k, roles.get(st), j, f) for k, st, j, f in items))
                        for items, mb in lists)
        key = (setup, machine_type, sig)
        got = _CLASSES.get(key)
    if key is None or got is None:
        memo = None
        if roles is not None:  # kinds shared by the classes (and the ranks of a setup)
            entries = _KINDS.get(setup)
            if entries is None:
                if len(_KINDS) >= _CLASSES_MAX:
                    _KINDS.pop(next(iter(_KINDS)), None)
                entries = _KINDS[setup] = {}
            memo = ActionMemo(entries, roles)
        got = _measure(make, lists, machine_type, memo)
        if key is not None:
            if len(_CLASSES) >= _CLASSES_MAX:
                _CLASSES.pop(next(iter(_CLASSES)), None)
            _CLASSES[key] = got if got is not None else False
    if not got:
        return None
    base, slopes, base_meta, wanted = got
    big = int(np.abs(base).max(initial=0)) + sum(int(np.abs(s).max(initial=0)) * n
                                                  for s, n in zip(slopes, dropped))
    obj = big >= 1 << 62
    full = base.astype(object) if obj else base.copy()
    for s, n in zip(slopes, dropped):
        full = full + (s.astype(object) if obj else s) * n
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


def rank_windows(make, actions: list, roles=None, setup=None, given=None
                 ) -> list[PeakSnap] | None:
    """The step windows' peaks (first step, steady step) of a rank from shortened replays;
    ``make(machine, items, microbatches)`` builds the rank's program. None: no run found or
    the affine form failed (replay the full list)."""
    got = extrapolated(make, actions, TraceMachine, roles, setup, given)
    if got is None:
        return None
    rows, meta, wanted = got
    return [first_highest(rows, meta, w) for w in wanted]


def rank_template(make, actions: list, domain, roles=None, setup=None, given=None
                  ) -> WindowTemplate | None:
    """The same with the micro-batch size and sequence length symbolic over ``domain``."""

    def build(m, items, mb):
        B = domain[0] if domain[0] is not None else Poly({(0, 0): 2, (1, 0): 1})
        T = domain[1] if domain[1] is not None else Poly({(0, 0): 2, (0, 1): 1})
        return make(m, items, mb, (B, T))

    got = extrapolated(build, actions, _Recording, roles, (setup, domain), given)
    if got is None:
        return None
    full, meta, wanted = got
    full = np.asarray(full)
    n = len(meta)
    cats = full.reshape(n, 5, -1)
    used = np.nonzero(np.abs(cats).reshape(-1, cats.shape[2]).max(0))[0]
    used = np.union1d(used, [0])
    deg = _DEG
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


# ---- a rank's step -------------------------------------------------------------------------------
def stage_roles(schedule, rank: int, model) -> dict[int, tuple]:
    """What a stage's replay depends on besides the setup: its place on the rank, first or last
    of the pipeline, its layer count, and whether its neighbours are on the same rank."""

    S, on = schedule.num_stages, schedule.stage_to_rank
    layers = stage_layers(model.num_layers, S)
    mine = rank_stages(schedule)[rank]
    return {s: (i, s == 0, s == S - 1, layers[s], s + 1 < S and on[s + 1] == rank,
                s > 0 and on[s - 1] == rank) for i, s in enumerate(mine)}


def _setup(model, training, schedule, device: str) -> tuple:
    return (model.model_dump_json(), training.model_dump_json(), device, schedule.name,
            schedule.num_stages, schedule.num_ranks)


def rank_step(model, training, schedule, rank: int, device: str = "cuda", given=None):
    """The rank's replayed step (``StagePeak``) from shortened replays (``given``: its lists as
    ``pipeline_structure.rank_lists`` keeps them, else searched here); the full list is
    replayed where no run is found or the affine form fails."""
    def make(m, items, mb):
        return PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                                   actions=items, microbatches=mb, compress_blocks=True)
    got = rank_windows(make, None if given is not None else rank_actions(schedule, rank),
                       stage_roles(schedule, rank, model),
                       _setup(model, training, schedule, device), given)
    if got is None:
        return PipelineRankProgram(model, training, schedule, rank, device=device,
                                   compress_blocks=True).run_steps()
    stages = [s for s in range(schedule.num_stages) if schedule.stage_to_rank[s] == rank]
    return StagePeak(rank, stages, *got)


def compile_rank(model, training, schedule, rank: int, device: str, domain, given=None):
    """The rank's ``WindowTemplate`` over ``domain`` (planner/step/simulate.py), from shortened
    replays on the recording machine (``given`` as for ``rank_step``); the full list where
    they do not apply."""
    def make(m, items, mb, sizes):
        return PipelineRankProgram(model, training, schedule, rank, device=device, machine=m,
                                   sizes=sizes, actions=items, microbatches=mb,
                                   compress_blocks=True)
    tpl = rank_template(make, None if given is not None else rank_actions(schedule, rank),
                        domain, stage_roles(schedule, rank, model),
                        _setup(model, training, schedule, device), given)
    if tpl is not None:
        return tpl
    return compile_windows(
        lambda m, sizes: PipelineRankProgram(model, training, schedule, rank, device=device,
                                             machine=m, sizes=sizes, compress_blocks=True),
        domain, lambda prog: prog.step_windows())


__all__ = ["TraceMachine", "clear_classes", "compile_rank", "extrapolated", "rank_step", "rank_template",
           "rank_windows", "stage_roles"]
