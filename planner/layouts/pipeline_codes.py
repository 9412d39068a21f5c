"""A rank's action codes decoded at once (``Schedule.decode`` over the whole order, as arrays):
the never-seen estimate decodes every rank's list of a new micro-batch count."""

from __future__ import annotations

import numpy as np

from planner.layouts.pipeline_orders import B_SLOT, F_SLOT

__all__ = ["NAMES", "decoded", "decoded_columns"]

NAMES = ("F", "B", "I", "W")  # a kind's letter by its code


def decoded_columns(schedule, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rank's actions as arrays: kind (F 0, B 1, I 2, W 3), stage, micro-batch."""
    codes = np.asarray(schedule.orders[rank], dtype=np.int64)
    m = schedule.microbatches
    slot, rest = np.divmod(codes, schedule.num_stages * m)
    stage, mb = np.divmod(rest, m)
    full = np.frombuffer(schedule.full_backward, dtype=np.uint8)[rest] != 0
    kind = np.where(slot == B_SLOT, np.where(full, 1, 2), np.where(slot == F_SLOT, 0, 3))
    return kind, stage, mb


def decoded(schedule, rank: int) -> list[tuple[str, int, int]]:
    """``schedule.actions(rank)``: (kind, stage, micro-batch) of each of the rank's actions."""
    if not len(schedule.orders[rank]):
        return []
    kind, stage, mb = decoded_columns(schedule, rank)
    return list(zip(map(NAMES.__getitem__, kind.tolist()), stage.tolist(), mb.tolist()))
