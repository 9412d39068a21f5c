"""A known setup's answer at a new size: what ``memory._estimate`` gives, built from the
setup's step template without the general path's branches.

A setup known to pass every rule (``memory._SETUPS``) and answered from one step template (one
device, or data-parallel rank 0 where it is the only worst-rank candidate: DDP, ZeRO 2-3),
asked without ``hardware`` (no fit, no micro-batch search, no allocator replay), has an answer
that differs between sizes only in its figures: the breakdowns, the phases, the activation
peak, the reserve and the notes that read them. Its assumptions are the same for every size;
they are built once per setup and kept with its templates. ``step_answer`` builds
the rest from the template's windows, in the order ``_estimate`` builds them, with the same
note functions: tests/test_known_answers.py holds it equal to ``_estimate`` over every setting
and random sizes.
"""

from __future__ import annotations

from planner.catalog.presets import allocator_reserve
from planner.catalog.result_specs import unvalidated
from planner.catalog.specs import (
    Assumption,
    MemoryRequest,
    MemoryResult,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.compose import dp_assumptions, snap_breakdown
from planner.routes import memory_notes
from planner.routes.checkpoint_blocks import ckpt_assumption
from planner.routes.fused_variant import kept_variant
from planner.routes.loss_rules import loss_assumption
from planner.routes.memory_allocator import _RESERVE_CPU, _RESERVE_CUDA
from planner.routes.memory_reference import _PROFILE_REFERENCE

__all__ = ["ZERO_GRAD", "result_of", "step_answer", "step_frame"]

# stated by every estimate (the specs are frozen: one instance serves all)
ZERO_GRAD = Assumption(name="zero_grad", value="set_to_none=True",
                       note="gradients are freed after each optimizer step")

_RESULT_FIELDS = dict.fromkeys(MemoryResult.model_fields)  # declaration order, each None


def result_of(**values) -> MemoryResult:
    """``MemoryResult(**values)`` from the planner's own figures (ints it counted, models it
    built), not validated again (``unvalidated``; tests hold it equal to the validated form).
    ``values`` has the required fields and the three lists; the others default to None."""
    d = _RESULT_FIELDS.copy()
    d.update(values)
    return unvalidated(MemoryResult, d, set(values))


def step_frame(kept: dict, how: str, tr: TrainingSpec, par: ParallelSpec, device: str, ckpt,
               fallback) -> tuple[tuple, object]:
    """A known setup's (assumptions, fused variant: None off one device), built once and kept
    with its templates (``kept``), for ``how`` "step" (one device) or "rank0" (data-parallel
    rank 0, the only worst-rank candidate): the assumptions in the order ``_estimate`` lists
    them (the reserve's, zero_grad, the profile or the data-parallel layout's, the loss, the
    checkpoint plan); ``fallback``: the full estimate of a changed setup (``memory._variant``)."""
    frame = kept.get("frame")
    if frame is None:
        layout = (_PROFILE_REFERENCE,) if how == "step" else dp_assumptions(
            par.zero_stage, par.data_parallel, par.fsdp_mixed_precision, 0)
        extra = (ckpt_assumption(frozenset(ckpt)),) if ckpt else ()
        frame = kept["frame"] = ((_RESERVE_CPU if device == "cpu" else _RESERVE_CUDA, ZERO_GRAD,
                                  *layout, loss_assumption(tr.loss), *extra),
                                 kept_variant(kept, fallback) if how == "step" else None)
    return frame


def step_answer(req: MemoryRequest, model: ResolvedModel, device: str, ckpt, tpl,
                assumptions: tuple, variant, explain: bool) -> MemoryResult:
    """The answer of ``req`` (a known setup, no hardware) from ``tpl``, the template of its
    step (one device) or of data-parallel rank 0 for the request's size domain;
    ``assumptions``: the setup's (as ``_estimate`` lists them); ``variant``: the fused note's
    (``fused_variant.kept_variant``; None off one device, where the notes are not given)."""
    tr = req.training
    first, steady, fb, act_total = tpl.answer(tr.micro_batch_size, tr.sequence_length)
    bd = snap_breakdown(steady)
    phase = f"{steady.phase}: {steady.op}"
    notes: list[str] = []
    if explain and variant is not None and phase.startswith("optimizer"):
        par = req.parallelism
        notes.extend(memory_notes.bytes_per_parameter(model, tr, par, bd, bare=False))
        notes.extend(memory_notes.fused_instead(req, model, device, ckpt, bd, variant))
    return result_of(model=model, breakdown=bd, first_step=snap_breakdown(first),
                     peak_phase=phase, allocator_reserve_bytes=allocator_reserve(bd.total, device),
                     cuda_allocator=None, fit=None, assumptions=list(assumptions), notes=notes,
                     suggestions=[], activation_peak_bytes=act_total,
                     forward_backward_peak=bd if fb is steady else snap_breakdown(fb),
                     forward_backward_peak_phase=f"{fb.phase}: {fb.op}")
