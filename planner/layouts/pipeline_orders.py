"""The common form of pipeline schedules: per-rank action orders as int codes, and where stages sit.

A ``Schedule`` holds, for every rank, the order in which it runs its actions, each a forward (F),
a backward (B) or, with the backward split, a backward for inputs (I) or for weights (W), on one
(virtual stage, micro-batch); with the stage-to-rank mapping and the stages before and after each
stage. ``planner.layouts.pipeline_schedules`` builds the orders of the schedules with one stage
per rank and of the looped ones, ``planner.layouts.pipeline_vshaped`` those whose ranks hold two
stages (V-shaped, bidirectional); both through ``_make``, with the placements here.

Actions are encoded as ints, ``code = (slot * num_stages + stage) * microbatches + mb`` with
slot 0 = F, 1 = backward for inputs (B when the backward is not split), 2 = W, so that schedules
of a few hundred thousand actions build and simulate in tens of milliseconds.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

F_SLOT, B_SLOT, W_SLOT = 0, 1, 2


@dataclass(frozen=True)
class Schedule:
    name: str
    num_ranks: int  # p
    virtual_stages: int  # v: stage chunks per rank (2 for the V-shaped and bidirectional ones)
    num_stages: int  # S: virtual stages in all (= p * v; 2p for dualpipe, two pipelines of p)
    microbatches: int  # m: per pipeline (per direction for dualpipe)
    stage_to_rank: list[int]
    prev_stage: list[int]  # -1 where a pipeline starts
    next_stage: list[int]  # -1 where a pipeline ends (the loss is computed there)
    orders: list[Sequence[int]]  # per rank, action codes in execution order (array('q'))
    full_backward: bytearray  # per (stage * m + mb): 1 when its backward is one B, not I + W
    # where the builder's own pass gives them: levels for ``pipeline_sim_levels`` (the flat
    # positions, rank after rank, in the order of its steps; where each step starts, and the end)
    levels: tuple | None = field(default=None, compare=False, repr=False)

    def decode(self, code: int) -> tuple[str, int, int]:
        """(kind, stage, micro-batch) of an action code; kind is F, B, I or W."""
        slot, rest = divmod(code, self.num_stages * self.microbatches)
        stage, mb = divmod(rest, self.microbatches)
        if slot == B_SLOT:
            return ("B" if self.full_backward[rest] else "I"), stage, mb
        return ("F" if slot == F_SLOT else "W"), stage, mb

    def actions(self, rank: int) -> list[tuple[str, int, int]]:
        return [self.decode(c) for c in self.orders[rank]]


def _loop_mapping(p: int, v: int) -> list[int]:
    # Looped placement: virtual stage s on rank s % p (Narayanan et al. 2021, §2.2, Fig. 4).
    return [s % p for s in range(p * v)]


def _v_mapping(p: int) -> list[int]:
    # V-shaped placement: rank r holds stages r and 2p-1-r (Qi et al. 2024, "Pipeline
    # Parallelism with Controllable Memory", Fig. 1; torch generate_stage_to_rank_mapping "v").
    return [s if s < p else 2 * p - 1 - s for s in range(2 * p)]


def _chain(n: int) -> tuple[list[int], list[int]]:
    return [s - 1 for s in range(n)], [s + 1 if s + 1 < n else -1 for s in range(n)]


def _make(name: str, p: int, v: int, m: int, mapping: list[int], orders: list[list[int]],
          split: bool, prev_next: tuple[list[int], list[int]] | None = None,
          full: bytearray | None = None, levels: tuple | None = None) -> Schedule:
    S = len(mapping)
    prev, nxt = prev_next or _chain(S)
    if full is None:
        full = bytearray(S * m) if split else bytearray(b"\x01") * (S * m)
    # 8 bytes an action (a list of ints holds 40): a schedule of millions of actions stays small;
    # each rank's order replaced in place, so the builder's copy goes as the next is made
    for r, o in enumerate(orders):
        if not isinstance(o, array):
            orders[r] = array("q", np.asarray(o, dtype=np.int64).tobytes()) \
                if isinstance(o, np.ndarray) else array("q", o)
    return Schedule(name, p, v, S, m, mapping, prev, nxt, orders, full, levels)
