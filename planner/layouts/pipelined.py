"""POST /v1/memory for a pipelined layout: every pipeline rank's step replayed
(``planner/layouts/pipeline_memory.py``), on its shortened action list where the schedule's
steady state repeats (``planner/layouts/pipeline_replays.py``), templated and memoised per setup
like the single-device step (``planner/machine/cache.py``); the worst rank is reported.

A caller that asks only whether the setup fits (``stop_above``: POST /v1/memory's suggestions)
stops at the first rank whose own peak plus its allocator reserve is over the memory: the
reported peak is the worst rank's, at least that rank's, so the setup cannot fit, and the other
ranks are not replayed. The ranks are then taken last first: the fewest micro-batches in flight
make the shortest replays."""

from __future__ import annotations

import contextlib
import contextvars
import functools

from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import Assumption, ResolvedModel, TrainingSpec
from planner.layouts.pipeline_memory import (
    _SINGLE,
    PipelineRankProgram,
    StagePeak,
    unsupported_reason,
)
from planner.layouts import pipeline_structure, pipeline_structures
from planner.layouts.pipeline_fused import worst_rank_fn
from planner.layouts.pipeline_replays import compile_rank, rank_step
from planner.layouts.pipeline_schedules import ScheduleConstraintError, rank_stages, schedule_of
from planner.layouts import pipeline_tape_templates
from planner.layouts.pipeline_tape import taped_rank, takes, tapes
from planner.machine import cache
from planner.machine.cache import _put, setup_key
from planner.machine.peak_candidates import fused_best
from planner.machine.recording import WindowTemplate
from planner.machine.deadline import check as check_work_limit
from planner.step import structures

__all__ = ["Overflows", "compiled_ranks", "pipeline_rank", "pipeline_rank_peaks", "pipelined_estimate",
           "stop_above"]

_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("fit_limit", default=None)


class Overflows(Exception):
    """A rank's peak plus its allocator reserve (``need``: at most the setup's) is over
    ``stop_above``'s memory."""

    def __init__(self, rank: int, need: int) -> None:
        super().__init__(rank, need)
        self.rank, self.need = rank, need


@contextlib.contextmanager
def stop_above(mem_bytes: int):
    """Inside, a pipelined estimate raises ``Overflows`` at the first rank that cannot fit in
    ``mem_bytes`` (its steady peak plus the allocator reserve), instead of replaying the rest."""
    token = _LIMIT.set(mem_bytes)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def pipelined_estimate(model: ResolvedModel, training: TrainingSpec, parallel, device: str,
                       compiled=None, every_rank: bool = True):
    """Every rank replayed; (worst rank's StagePeak, every rank's, assumptions, notes) for
    planner.routes.memory, or None when the setup is outside the replay (the caller then
    composes an approximation). ``compiled``: ``compiled_ranks``'s answer for the setup, kept by
    the caller. ``every_rank=False``: a caller that reads only the worst rank's StagePeak (and
    the note) gets ``[worst]`` for the ranks' list, evaluated from the setup's templates
    without the other ranks' categories (planner/layouts/pipeline_fused.py) when they are
    compiled."""
    limit = _LIMIT.get()  # (``stop_above``: with every rank compiled, nothing to stop early)
    if compiled is not None:
        plan, compiled = compiled
    else:
        plan = _plan(model, training, parallel)
        if plan is None:
            return None
        compiled = _compiled_ranks(model, training, plan, device)
    name = parallel.pipeline_schedule
    if compiled is not None and not every_rank and compiled[2] is not None:
        # the worst rank's snapshots and every rank's steady total: one generated function
        ranks = compiled[0]
        w, per, first, steady = compiled[2](training.micro_batch_size - 2,
                                            training.sequence_length - 2)
        worst = StagePeak(ranks[w][0], ranks[w][1], first, steady)
        return (worst, [worst],
                list(_assumptions(name, worst.rank, tuple(worst.stages), plan.num_stages)),
                [f"per-rank steady-state peaks: {per}"])
    if compiled is not None:  # every rank's template compiled: evaluated at once
        ranks, windows, _ = compiled
        snaps = windows()(training.micro_batch_size - 2, training.sequence_length - 2)
        peaks = [StagePeak(r, stages, *w) for (r, stages, _), w in zip(ranks, snaps)]
        per = "; ".join(f"{head}{pk.steady.total} B at {pk.steady.phase} {pk.steady.op}"
                        for (_, _, head), pk in zip(ranks, peaks))
    else:
        def rank(model, training, plan, device, r):
            pk = pipeline_rank(model, training, plan, device, r)
            need = pk.steady.total + allocator_reserve(pk.steady.total, device)
            if limit is not None and need > limit:
                raise Overflows(r, need)
            return pk
        # stopping at the first rank over the limit: the last ranks first, the cheapest to
        # replay (fewest micro-batches in flight, so the shortest lists)
        order = None if limit is None else list(range(plan.num_ranks))[::-1]
        peaks = pipeline_rank_peaks(model, training, plan, device, ranks=order,
                                    simulate=pipeline_rank if limit is None else rank)
        if order is not None:
            peaks.reverse()
        per = "; ".join(f"{_rank_head(pk.rank, pk.stages)}{pk.steady.total} B at "
                        f"{pk.steady.phase} {pk.steady.op}" for pk in peaks)
    worst = max(peaks, key=lambda pk: (pk.steady.total, -pk.rank))
    assumptions = list(_assumptions(name, worst.rank, tuple(worst.stages), plan.num_stages))
    notes = [f"per-rank steady-state peaks: {per}"]
    return worst, peaks, assumptions, notes


def _plan(model: ResolvedModel, training: TrainingSpec, parallel):
    """The setup's schedule, or None when the setup is outside the replay."""
    if unsupported_reason(training, parallel) is not None or not model.architecture_known:
        return None
    name = parallel.pipeline_schedule
    v = 1 if name in _SINGLE else parallel.virtual_pipeline_stages
    try:
        plan = schedule_of(name, parallel.pipeline_parallel,
                           training.gradient_accumulation_steps, v)
    except ScheduleConstraintError:
        return None
    return None if plan.num_stages > model.num_layers else plan


def compiled_ranks(model: ResolvedModel, training: TrainingSpec, parallel, device: str):
    """(the schedule, every rank's templates of a pipelined setup at tr's size domain,
    evaluated at once) as ``pipelined_estimate`` finds them (None: outside the replay, or not
    all compiled): a caller that keeps them per setup and domain passes them back
    (``compiled``)."""
    plan = _plan(model, training, parallel)
    hit = None if plan is None else _compiled_ranks(model, training, plan, device)
    return None if hit is None else (plan, hit)


def _rank_head(rank: int, stages: list[int]) -> str:
    return f"rank {rank} (stages {','.join(map(str, stages))}): "


@functools.lru_cache(maxsize=4096)
def _assumptions(name: str, worst: int, stages: tuple[int, ...], num_stages: int
                 ) -> tuple[Assumption, Assumption]:
    """What a pipelined estimate states: how it was derived, and the worst rank (one pair per
    schedule and worst rank, shared between estimates: the specs are frozen)."""
    return (
        Assumption(name="profile", value="pipelined reference step per rank, simulated op by op",
                   note=f"{name}: every rank's actions replayed (planner.layouts.pipeline_memory); the "
                        "step measured by pipelined validation jobs"),
        Assumption(name="worst_rank", value=str(worst),
                   note=f"the bottleneck: stages {','.join(map(str, stages))} of "
                        f"{num_stages}, the highest steady-state peak"),
    )


# a setup's rank-0 key -> (every rank's (rank, stages, note head), their windows' evaluation,
# the worst rank's: planner/layouts/pipeline_fused.py)
_RANKS: dict[tuple, tuple] = {}
_RANKS_MAX = 1024
_RANKS_AT_ONCE = 64  # deeper pipelines go rank by rank (their templates outnumber the cache's)


def _rank_key(base: tuple, plan_key: tuple, rank: int) -> tuple:
    """``pipeline_rank``'s cache key of ``rank`` from the setup's key (``setup_key``, rank 0)."""
    return (*base[:-2], rank, plan_key, base[-1])


def _plan_key(schedule) -> tuple:
    return (schedule.name, schedule.num_ranks, schedule.num_stages, schedule.microbatches)


def _compiled_ranks(model: ResolvedModel, tr: TrainingSpec, schedule, device: str):
    """(every rank's (rank, stages, the head of its note), ``() -> f(b, t)``: every rank's
    windows evaluated by one generated function, ``fused_best``, generated when a caller
    first asks for every rank (POST /v1/memory reads the worst alone); the worst rank's answer,
    ``worst_rank_fn``, None where it does not apply) when every rank's template of the
    setup is compiled; None otherwise (templates off, one rank not compiled yet, a key that
    does not hash). Evaluating them is what ``pipeline_rank`` does for each rank then, without
    its per-rank lookups."""
    if not cache.USE_TEMPLATES or schedule.num_ranks > _RANKS_AT_ONCE:
        return None
    base = setup_key(model, tr, device, frozenset(), None, 0)
    plan_key = _plan_key(schedule)
    key = _rank_key(base, plan_key, 0)
    try:
        hit = _RANKS.get(key)
    except TypeError:  # a list inside the specs
        return None
    if hit is not None:
        return hit
    tpls = [cache.template(_rank_key(base, plan_key, r)) for r in range(schedule.num_ranks)]
    if any(not isinstance(tpl, WindowTemplate) for tpl in tpls):  # None: not compiled
        return None
    stages = rank_stages(schedule)
    heads = [_rank_head(r, stages[r]) for r in range(schedule.num_ranks)]
    groups = [tpl.windows for tpl in tpls]
    hit = ([(r, stages[r], heads[r]) for r in range(schedule.num_ranks)],
           functools.cache(lambda: fused_best(groups)), worst_rank_fn(groups, heads))
    _put(_RANKS, key, hit, _RANKS_MAX)
    return hit


cache.on_clear(_RANKS.clear)


def pipeline_rank(model: ResolvedModel, tr: TrainingSpec, schedule, device: str, rank: int):
    """One pipeline rank's replayed step (StagePeak), templated and memoised per setup
    (planner/machine/cache.py) like the single-device step; a setup not compiled is answered
    from its structure's template when that is compiled (planner/layouts/pipeline_structures.py)."""

    def lists():  # the rank's shortened lists, memoised per schedule and rank (also the
        return pipeline_structure.rank_lists(schedule, rank, model)  # structures' key)

    def compile_(domain):
        return compile_rank(model, tr, schedule, rank, device, domain, lists())

    stages = rank_stages(schedule)[rank]
    key = _rank_key(setup_key(model, tr, device, frozenset(), None, 0), _plan_key(schedule), rank)
    if tapes(schedule, rank):  # a long list, evaluated at once: no search; a known layout's
        # new model from its taped template (planner/layouts/pipeline_tape_templates.py)
        return cache.cached(key, tr,
                            lambda: (pipeline_tape_templates.estimate(model, tr, schedule,
                                                                      device, rank)
                                     or taped_rank(model, tr, schedule, rank, device)
                                     or rank_step(model, tr, schedule, rank, device, lists())),
                            lambda domain: None, None)
    if structures.enabled() and cache.template(key) is None:
        # a never-seen model (or micro-batch count) of a known structure: evaluated
        # (planner/layouts/pipeline_structures.py); its compile queued otherwise
        # (a long GPipe or 1F1B rank of a known layout: its taped template first)
        hit = ((takes(schedule, rank)
                and pipeline_tape_templates.estimate(model, tr, schedule, device, rank))
               or pipeline_structures.estimate(model, tr, schedule, device, rank))
        if hit is not None:
            return hit
    return cache.cached(key, tr,
                        lambda: rank_step(model, tr, schedule, rank, device, lists()), compile_,
                        lambda tpl, b, t: StagePeak(rank, stages, *tpl.evaluate(b, t)))


def pipeline_rank_peaks(model: ResolvedModel, training: TrainingSpec, schedule,
                        device: str = "cuda", ranks: list[int] | None = None,
                        simulate=None) -> list[StagePeak]:
    """The replayed step of every rank (or of ``ranks``); ``simulate(model, training, schedule,
    device, rank)`` replaces the plain replay (the planner passes its memoised, templated one)."""
    out = []
    for r in ranks if ranks is not None else range(schedule.num_ranks):
        check_work_limit()
        if simulate is not None:
            out.append(simulate(model, training, schedule, device, r))
        else:
            out.append(PipelineRankProgram(model, training, schedule, r, device=device).run_steps())
    return out
