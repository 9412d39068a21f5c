"""A rank's action codes decoded at once (``Schedule.decode`` over the whole order, as arrays):
the never-seen estimate decodes every rank's list of a new micro-batch count."""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_orders import B_SLOT, F_SLOT

__all__ = ["decoded"]

_NAMES = ("F", "B", "I", "W")


def decoded(schedule, rank: int) -> list[tuple[str, int, int]]:
    """``schedule.actions(rank)``: (kind, stage, micro-batch) of each of the rank's actions."""
    codes = np.asarray(schedule.orders[rank], dtype=np.int64)
    if not len(codes):
        return []
    m = schedule.microbatches
    slot, rest = np.divmod(codes, schedule.num_stages * m)
    stage, mb = np.divmod(rest, m)
    full = np.frombuffer(bytes(schedule.full_backward), dtype=np.uint8)[rest] != 0
    kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
    return list(zip(map(_NAMES.__getitem__, kind.tolist()), stage.tolist(), mb.tolist()))
