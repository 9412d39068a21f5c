"""The fused-kernel variant a known single-device setup's note reads, from templates kept with
the setup.

When a single device's peak falls in the optimizer step, POST /v1/memory's notes say what
``optimizer_implementation: fused`` would change (``memory_notes.fused_instead``): the same
setup estimated with the fused kernel, of which the note reads the peak and its phase. For a
setup seen before (``memory.estimate_memory``'s kept setups), that variant is a setup of its
own whose step template, once compiled, is kept with the request's setup per size domain, as
the request's own is: the note's figures are its template evaluated at the request's sizes,
exactly what the variant's estimate would read from the same template (``tests/test_known_answers.py``
holds the notes equal to the ones made through the full estimate). Until it is compiled, and
for any other change, the full estimate answers.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from planner.machine.recording import domain_of
from planner.step import simulate as step_cache

__all__ = ["kept_variant"]

_FUSED = {"optimizer_implementation": "fused"}
_UNSET = object()


def kept_variant(kept: dict, fallback: Callable) -> Callable:
    """A ``variant`` for ``memory_notes.fused_instead`` over a known setup's ``kept`` dict (its
    templates per size domain; the fused variant's go under ``("fused", domain)`` keys, its
    spec under ``"fused"``); ``fallback``: the full estimate (``memory._variant``)."""

    def variant(req, model, device, ckpt, **training):
        if training != _FUSED:
            return fallback(req, model, device, ckpt, **training)
        spec = kept.get("fused", _UNSET)
        if spec is _UNSET:  # the first time: the full estimate (None: not a valid setup)
            r = fallback(req, model, device, ckpt, **training)
            kept["fused"] = None if r is None else True
            return r
        if spec is None:
            return None
        tr = req.training
        b, t = tr.micro_batch_size, tr.sequence_length
        dkey = ("fused", domain_of(b, t))
        tpl = kept.get(dkey)
        if tpl is None:
            ftr = tr.model_copy(update=training)
            tpl = step_cache.compiled_step(model, ftr, device, frozenset(ckpt))
            if tpl is None:  # not compiled yet: the estimate compiles it at the second size
                return fallback(req, model, device, ckpt, **training)
            kept[dkey] = tpl
        total, op, phase = tpl.steady(b, t)
        return SimpleNamespace(breakdown=SimpleNamespace(total=total), peak_phase=f"{phase}: {op}")

    return variant
