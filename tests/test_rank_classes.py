"""Ranks in classes (planner.layouts.rank_tables.RankTable): the per-rank layouts of ZeroRedundancyOptimizer and
FSDP2 kept as runs of equal ranks equal the rank-by-rank definitions, and the worst rank and the
ranks that differ come out the same, for world sizes up to a million at the cost of the classes."""

from __future__ import annotations

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from planner.catalog.presets import resolve_model
from planner.catalog.optimizers import optimizer_state_bytes
from planner.layouts.parallel_ranks import (
    fsdp_rank_keys,
    ranks_that_differ,
    zero1_ownership,
)
from planner.catalog.specs import ModelSpec, ParallelSpec, TrainingSpec
from planner.layouts.sharding import fsdp_local_shard_shape, fsdp_row_classes, zero1_partition


def _partition_rank_by_rank(numels: list[int], world_size: int) -> list[list[int]]:
    """ZeroRedundancyOptimizer._partition_parameters as written: every rank in the heap."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0, k) for k in range(world_size)]
    for i in sorted(range(len(numels)), key=lambda j: numels[j], reverse=True):
        size, r = heapq.heappop(heap)
        ranks[r].append(i)
        heapq.heappush(heap, (size + numels[i], r))
    return ranks


@settings(max_examples=200, deadline=None)
@given(numels=st.lists(st.integers(1, 10**6), min_size=1, max_size=40),
       world_size=st.integers(1, 80))
def test_zero1_partition_equals_the_rank_by_rank_heap(numels, world_size):
    table = zero1_partition(numels, world_size)
    assert len(table) == world_size
    assert list(table) == _partition_rank_by_rank(numels, world_size)
    assert len(table.runs()) <= min(world_size, len(numels)) + 1


@settings(max_examples=200, deadline=None)
@given(dims=st.lists(st.integers(1, 5000), min_size=1, max_size=8, unique=True),
       world_size=st.integers(1, 300))
def test_fsdp_row_classes_equal_every_rank(dims, world_size):
    dims = sorted(dims)
    table = fsdp_row_classes(dims, world_size)
    per_rank = [tuple(fsdp_local_shard_shape((d,), world_size, r)[0] for d in dims)
                for r in range(world_size)]
    assert list(table) == per_rank
    assert len(table.runs()) <= 2 * len(dims) + 1


def test_a_million_ranks_cost_their_classes():
    cfg = resolve_model(ModelSpec(preset="gpt2"))
    tr = TrainingSpec(precision="mixed-bf16", micro_batch_size=1, sequence_length=128)
    for zero in (1, 3):
        par = ParallelSpec(data_parallel=1_048_576, zero_stage=zero)
        keys = zero1_ownership(cfg, tr, par)[0] if zero == 1 else fsdp_rank_keys(cfg, tr, par)
        assert len(keys) == 1_048_576 and len(keys.runs()) < 1000
        assert keys[-1] == keys[1_048_575] == (() if zero == 1 else keys[1_000_000])
    # the ranks that differ and the worst ranks, from the classes, against rank-by-rank scans
    par = ParallelSpec(data_parallel=1000, zero_stage=3)
    keys = fsdp_rank_keys(cfg, tr, par)
    first: dict = {}
    for r in range(1000):
        first.setdefault(keys[r], r)
    assert ranks_that_differ(cfg, tr, par) == sorted(first.values())
    par = ParallelSpec(data_parallel=300, zero_stage=1)
    keys, worst = zero1_ownership(cfg, tr, par)
    first = {}
    for r in range(300):
        first.setdefault(keys[r], r)
    assert ranks_that_differ(cfg, tr, par) == sorted(first.values())
    states = [optimizer_state_bytes(tr, list(keys[r]), "fp32") for r in range(300)]
    assert worst == sorted({max(range(300), key=lambda r: (states[r], -r)),
                            max(range(300), key=lambda r: (sum(keys[r]), -r))})
