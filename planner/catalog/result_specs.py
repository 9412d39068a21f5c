"""Small result models of POST /v1/memory: the breakdown, assumptions, the fit, suggestions."""

from __future__ import annotations

from pydantic import Field

from planner.catalog.frozen import _Frozen

__all__ = ["Assumption", "Breakdown", "Fit", "Suggestion", "breakdown_of", "unvalidated"]

_new, _set = object.__new__, object.__setattr__


def unvalidated(cls, values: dict, fields_set: set[str] | None = None):
    """``cls(**values)`` without validation, for values the planner computed itself (ints it
    counted, results it built): what a template answer would otherwise spend on validating its
    own numbers. ``values`` holds every field of ``cls``, in declaration order (defaults
    included); ``fields_set``: the fields given explicitly (default: all). Requests are always
    validated; tests hold such results equal to their validated form."""
    obj = _new(cls)
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values) if fields_set is None else fields_set)
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


class Breakdown(_Frozen):
    """Bytes per device at the peak of one training step; the categories sum to ``total``."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    temporaries: int
    total: int


def breakdown_of(parameters: int, gradients: int, optimizer_states: int, activations: int,
                 temporaries: int, total: int) -> Breakdown:
    """``Breakdown(...)`` from the planner's own byte counts (ints), without validation."""
    return unvalidated(Breakdown, {
        "parameters": parameters, "gradients": gradients, "optimizer_states": optimizer_states,
        "activations": activations, "temporaries": temporaries, "total": total})


class Assumption(_Frozen):
    name: str
    value: str
    note: str = ""


class Fit(_Frozen):
    gpu: str | None
    memory_bytes: int
    fits: bool
    headroom_bytes: int = Field(..., description="memory_bytes - (peak + allocator reserve); "
                                "negative when it does not fit.")
    max_micro_batch_size: int | None = Field(
        None, description="Largest micro-batch whose peak fits (None: not even 1 fits, or "
        "activations unknown, or, for implementation 'transformers', whose sizes are each a "
        "traced step, the search ran out of the request's work limit: said in notes).")


class Suggestion(_Frozen):
    """A change after which a setup that does not fit fits (POST /v1/plan's search, anchored)."""

    change: str
    parallelism: dict[str, int | bool | str] = Field(default_factory=dict)
    training: dict[str, int | str | dict[str, int | str]] = Field(
        default_factory=dict, description="Changed training fields, as posted ('loss' as an "
        "object, 'activation_checkpointing' as its strategy).")
    peak_bytes: int = Field(..., description="POST /v1/memory's breakdown.total after the change.")
    headroom_bytes: int
