"""The reference step's peaks on one device (or one data-parallel rank), memoised.

``simulate`` answers from the setup's step template (``planner/step/template.py``) when it is
compiled, else from its structure's template (``planner/step/structures.py``: any model of the
structure; a data-parallel rank's, ``planner/step/rank_structure.py``) when that is compiled,
else replays op by op (``planner/step/program.py``), through the per-setup caches of ``planner/machine/cache.py``.
"""

from __future__ import annotations

from planner.catalog.specs import ParallelSpec, ResolvedModel, TrainingSpec
from planner.machine import cache
from planner.machine.cache import clear, replay_only, setup_key, setup_memo
from planner.step.structures import structure_mode, wait_for_structures
from planner.machine.recording import domain_of
from planner.step import structures
from planner.step.peaks import StepPeaks
from planner.step.program import ReferenceProgram
from planner.step.template import StepTemplate, compile_template

__all__ = ["clear", "compiled_step", "compiled_template", "replay_only", "setup_key", "setup_memo",
           "simulate", "structure_mode", "wait_for_structures"]


def simulate(model: ResolvedModel, tr: TrainingSpec, device: str,
             checkpointed: frozenset[int], par: ParallelSpec | None = None,
             rank: int = 0, program=None) -> StepPeaks:
    """The reference step's peaks (a pure function of the inputs), on one device or for one
    data-parallel rank: from the setup's template when it has one, else replayed op by op.
    ``program(model, tr, par, rank, device=..., checkpointed=..., **kw)`` builds a data-parallel
    rank's program (``planner/layouts/data_parallel.py: ParallelProgram``); it is needed with
    ``par``."""
    skey = setup_key(model, _replayed_as(tr), device, checkpointed, par, rank)
    try:  # the hot path first: a compiled setup
        tpl = cache._TEMPLATES.get(skey) if cache.USE_TEMPLATES else None
    except TypeError:  # a list inside the specs: cache.cached keys it by JSON
        tpl = None
    if tpl is not None:
        return tpl.evaluate(tr.micro_batch_size, tr.sequence_length)

    def build(**kw):
        if par is None:
            return ReferenceProgram(model, tr, device=device, checkpointed=set(checkpointed), **kw)
        return program(model, tr, par, rank, device=device, checkpointed=set(checkpointed), **kw)

    def compile_(domain):
        def make(machine, sizes):
            return build(machine=machine, sizes=sizes)
        return compile_template(model, tr, device, set(checkpointed), domain, make)
    def replay():
        if structures.enabled():  # a never-seen model of a known structure (or rank)
            hit = structures.estimate(skey, model, tr, device, checkpointed, par, rank, program)
            if hit is not None:
                return hit
        return build().run()
    if cache.compiling_first() and structures.enabled():
        # a compiled structure answers first, as replay() would (the micro-batch search that
        # follows evaluates it too: compiled_template), instead of the setup's own compile
        hit = structures.estimate(skey, model, tr, device, checkpointed, par, rank, program)
        if hit is not None:
            return hit
    return cache.cached(skey, tr, replay, compile_, lambda tpl, b, t: tpl.evaluate(b, t))


def compiled_step(model: ResolvedModel, tr: TrainingSpec, device: str,
                  checkpointed: frozenset[int], par: ParallelSpec | None = None,
                  rank: int = 0) -> StepTemplate | None:
    """The setup's own template (one device, or a data-parallel rank) for tr's size domain,
    as ``simulate`` finds it first (None: not compiled, templates off, or a key that does not
    hash): a caller that keeps it evaluates it as ``simulate`` would, without the look-up."""
    return cache.template(setup_key(model, _replayed_as(tr), device, checkpointed, par, rank))


def _replayed_as(tr: TrainingSpec) -> TrainingSpec:
    """The training spec the step's replay is keyed by: a step replays its first two
    micro-batches (micro-batch 2+ all look alike, ``ReferenceProgram.run_windows``), so every
    gradient accumulation count from 2 up replays the same and shares one memo and template."""
    if tr.gradient_accumulation_steps <= 2:
        return tr
    return tr.model_copy(update={"gradient_accumulation_steps": 2})


def compiled_template(model: ResolvedModel, tr: TrainingSpec, device: str,
                      checkpointed: frozenset[int], batch: int) -> StepTemplate | None:
    """The setup's template for micro-batch ``batch`` (at ``tr``'s sequence length) when it is
    compiled, else its structure's when that is compiled and admits the model; None otherwise
    (nothing is compiled here)."""
    key = setup_key(model, _replayed_as(tr), device, checkpointed)
    key = (*key[:-1], domain_of(batch, tr.sequence_length))
    tpl = cache.template(key)
    if tpl is None and cache.USE_TEMPLATES:  # the structure's, bound to this model
        return structures.model_template(key, model, tr, batch)
    return tpl
