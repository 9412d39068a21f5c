"""Per-rank tables of data-parallel sharding: which tensors each ZeroRedundancyOptimizer rank
owns, and FSDP2's padded and unpadded dim-0 shards, stored as runs of ranks alike.

``planner/layouts/sharding.py`` reads them for the per-rank model states;
``planner/layouts/data_parallel.py`` for a rank's replay.
"""

from __future__ import annotations

import bisect
import functools
import heapq
from collections.abc import Sequence
from typing import Generic, TypeVar

Shape = tuple[int, ...]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


V = TypeVar("V")


class RankTable(Sequence, Generic[V]):
    """A value per rank for ``world_size`` ranks, stored as runs of equal values: rank ``r``
    has ``values[i]`` for the last ``starts[i] <= r``. Ranks fall into few classes (ZeRO-1:
    ranks past the tensor count own nothing; FSDP2: full, partial and empty chunks of each dim
    0), so a million-rank layout costs its classes, not its ranks. ``runs()`` gives each class
    once, with its lowest rank."""

    __slots__ = ("starts", "values", "world_size")

    def __init__(self, starts: list[int], values: list[V], world_size: int) -> None:
        assert starts and starts[0] == 0 and len(starts) == len(values)
        self.starts, self.values, self.world_size = starts, values, world_size

    def __len__(self) -> int:
        return self.world_size

    def __getitem__(self, r):  # type: ignore[override]
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(self.world_size))]
        if r < 0:
            r += self.world_size
        if not 0 <= r < self.world_size:
            raise IndexError(r)
        return self.values[bisect.bisect_right(self.starts, r) - 1]

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Sequence) else NotImplemented

    def runs(self) -> list[tuple[int, V]]:
        """(lowest rank, value) of each run."""
        return list(zip(self.starts, self.values))

    def worst(self, key) -> int:
        """The lowest rank with the largest ``key(value)`` (one evaluation per run)."""
        return max(self.runs(), key=lambda rv: (key(rv[1]), -rv[0]))[0]


def zero1_partition(numels: list[int], world_size: int) -> RankTable[list[int]]:
    """Indices of the tensors each rank owns under ZeroRedundancyOptimizer (one param group):
    sort by numel, largest first (stable), give each to the rank with the smallest total so far
    (lowest index on ties) — ``ZeroRedundancyOptimizer._partition_parameters``. Memoised (every
    rank's replay and the per-rank states ask for the same partition; callers only read it)."""
    return _zero1_partition(tuple(numels), world_size)


@functools.lru_cache(maxsize=64)
def _zero1_partition(numels: tuple[int, ...], world_size: int) -> RankTable[list[int]]:
    # A heap of (total, rank) pops exactly min over (sizes[k], k): O(n log W), not O(n W). Only
    # the first min(n, W) ranks can ever receive a tensor (an empty rank of lower index always
    # wins), so only they enter the heap; the ranks after them own nothing.
    k = min(world_size, len(numels))
    ranks: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, r) for r in range(k)]
    for i in sorted(range(len(numels)), key=lambda j: numels[j], reverse=True):
        size, r = heapq.heappop(heap)
        ranks[r].append(i)
        heapq.heappush(heap, (size + numels[i], r))
    starts = list(range(k))
    if k < world_size:
        starts.append(k)
        ranks.append([])
    return RankTable(starts, ranks, world_size)


def fsdp_row_classes(dims: list[int], world_size: int) -> RankTable[tuple[int, ...]]:
    """Per rank, its unpadded rows of each dim 0 in ``dims`` (``fsdp_local_shard_shape``): a
    dim d in chunks of c = ceil(d/N) rows gives ranks below d // c all c rows, rank d // c the
    rest, and the ranks after it none, so the classes start where some dim changes."""
    cuts = {0}
    for d in dims:
        c = _ceil_div(d, world_size)
        cuts.update(x for x in (d // c, d // c + 1) if x < world_size)
    starts = sorted(cuts)
    values = [tuple(fsdp_local_shard_shape((d,), world_size, r)[0] for d in dims) for r in starts]
    return RankTable(starts, values, world_size)


def fsdp_shard_shape(shape: Shape, world_size: int) -> Shape:
    """Padded per-rank shard of FSDP2: the first ``torch.chunk`` piece, ceil(d0/N) rows."""
    return (_ceil_div(shape[0], world_size),) + shape[1:]


def fsdp_local_shard_shape(shape: Shape, world_size: int, rank: int) -> Shape:
    """Rank ``rank``'s unpadded FSDP2 shard: its ``torch.chunk`` piece of dim 0 (ceil(d0/N) rows,
    fewer or none on the last ranks when N does not divide d0). The sharded parameter's storage
    is padded to ``fsdp_shard_shape`` on every rank, but its local tensor, and so everything the
    optimizer makes from it (states, fp32 masters, the step's copies), has this shape."""
    c = _ceil_div(shape[0], world_size)
    return (min(c, max(0, shape[0] - rank * c)),) + shape[1:]


__all__ = ["RankTable", "fsdp_local_shard_shape", "fsdp_row_classes", "fsdp_shard_shape",
           "zero1_partition"]
