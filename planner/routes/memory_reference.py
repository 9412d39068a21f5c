"""The reference implementation's step in POST /v1/memory's answer, as each layout replays it.

On one device the breakdown is the step simulator's replay of the reference step
(``planner/step/program.py``) or its template evaluated at the request's sizes, equal to the
byte; with data parallelism or ZeRO every rank class is replayed (``compose.data_parallel``);
with pipeline parallelism every pipeline rank is replayed and the worst one reported
(``planner/layouts/pipelined.py``); any other layout is composed from the single-device step
(``compose.composed``). ``_reference`` picks among them.

The same choice says which compiled templates can answer a setup at any size: the
single-device step's, data-parallel rank 0's where it is the only candidate, or every pipeline
rank's (``_one_step``); ``memory`` keeps them with the setup per size domain (``_compiled``
finds them). The micro-batch search reads a probe's peak straight from the single-device
template when it is compiled (``_template_need``).
"""

from __future__ import annotations

from planner.catalog.presets import allocator_reserve
from planner.catalog.specs import (
    Assumption,
    MemoryRequest,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.compose import (
    composed,
    data_parallel,
    replayed_fields,
    single_device,
    single_rank_candidate,
    snap_breakdown,
)
from planner.layouts.parallel_ranks import unsupported_reason
from planner.layouts.pipelined import compiled_ranks, pipelined_estimate
from planner.step import simulate as step_cache


_PROFILE_REFERENCE = Assumption(name="profile", value="reference step, simulated op by op",
                                note="the step measured by validation jobs")


def _reference(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
               ckpt: set[int], assumptions: list[Assumption], notes: list[str], peaks=None,
               ranks=None):
    if single_device(par):
        if peaks is None:
            peaks = step_cache.simulate(model, tr, device, frozenset(ckpt))
        steady, first = peaks.steady, peaks.first
        assumptions.append(_PROFILE_REFERENCE)
        bd = snap_breakdown(steady)
        return (bd, snap_breakdown(first), f"{steady.phase}: {steady.op}",
                replayed_fields(peaks, bd))
    if (par.data_parallel > 1 or par.zero_stage > 0) and unsupported_reason(tr, par) is None:
        # ZeRO on one data-parallel rank included: DDP + ZeroRedundancyOptimizer, or FSDP2's
        # world-size-1 path, replayed (measured by tests/test_zero_one_rank.py)
        return data_parallel(model, tr, par, device, ckpt, assumptions, notes, peaks)
    if par.pipeline_parallel > 1 and not ckpt:
        pp = pipelined_estimate(model, tr, par, device, ranks, every_rank=False)
        if pp is not None:  # every pipeline rank replayed; the worst one reported
            worst, _, extra, pp_notes = pp
            assumptions.extend(extra)
            notes.extend(pp_notes)
            return (snap_breakdown(worst.steady), snap_breakdown(worst.first),
                    f"{worst.steady.phase}: {worst.steady.op} (rank {worst.rank})", {})
    return composed(model, tr, par, device, ckpt, assumptions, notes)


def _one_step(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec):
    """(how ``_reference`` answers the setup from templates: "step" (one device), "rank0"
    (data-parallel rank 0, the only candidate) or "pipeline" (every rank), {} to keep them in
    per size domain), or (None, None)."""
    if not model.architecture_known or tr.implementation != "reference":
        return None, None
    if single_device(par):
        return "step", {}
    if (par.data_parallel > 1 or par.zero_stage > 0) and unsupported_reason(tr, par) is None:
        return ("rank0", {}) if single_rank_candidate(par) else (None, None)
    return ("pipeline", {}) if par.pipeline_parallel > 1 else (None, None)


def _compiled(how: str, model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec, device: str,
              ckpt):
    """The templates a setup's answer at tr's size domain is evaluated from, as ``_reference``
    finds them (None: not compiled)."""
    if how == "pipeline":
        return compiled_ranks(model, tr, par, device) if not ckpt else None
    return step_cache.compiled_step(model, tr, device, ckpt, par if how == "rank0" else None)


def _template_need(req: MemoryRequest, model: ResolvedModel, device: str, ckpt):
    """For a single-device reference estimate: ``b -> peak + reserve`` straight from the setup's
    template when it is compiled for b's domain (None otherwise: the caller estimates), the
    same number ``memory._estimate`` gives without building a response."""
    tr, par = req.training, req.parallelism
    if not (model.architecture_known and tr.implementation == "reference"
            and single_device(par)):
        return None
    t, ck = tr.sequence_length, frozenset(ckpt)

    def need(b: int) -> int | None:
        tpl = step_cache.compiled_template(model, tr, device, ck, b)
        if tpl is None:
            return None
        total = tpl.evaluate(b, t).steady.total
        return total + allocator_reserve(total, device)
    return need
