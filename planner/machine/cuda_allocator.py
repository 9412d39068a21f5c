"""PyTorch's CUDA caching allocator, replayed: what ``max_memory_allocated`` and
``max_memory_reserved`` report for a sequence of tensor allocations and frees.

The step simulator counts the bytes tensors ask for. On a GPU two other figures decide whether a
step fits: ``torch.cuda.max_memory_allocated`` counts the *blocks* handed out (rounded, and a block
keeps a remainder too small to split), and ``max_memory_reserved`` the *segments* taken from the
driver (cudaMalloc). Both follow from the request sequence alone, by the allocator's fixed rules
(c10/cuda/CUDACachingAllocator.cpp, PyTorch 2.x, default configuration: no expandable segments, no
``max_split_size_mb``, no ``roundup_power2_divisions``, one stream):

- a request is rounded up to a multiple of 512 bytes (``round_size``);
- requests up to 1 MiB are served from the small pool, larger ones from the large pool;
- a request takes the smallest free block of its pool that is large enough (ties: lowest address);
  when there is none, a new segment is taken: 2 MiB for the small pool, 20 MiB for requests under
  10 MiB, else the request rounded up to 2 MiB (``get_allocation_size``);
- the block is split when the remainder is at least 512 bytes (small pool) or more than 1 MiB
  (large pool); otherwise the whole block is handed out and counted as allocated;
- a freed block merges with free neighbours of its segment; segments are kept (no cudaFree).

New segments get descending addresses: the CUDA driver hands out virtual addresses downward in a
process like the measured ones, and address order breaks ties between equal free blocks. Replaying
four recorded H200 allocator traces (torch 2.11; tests/test_cuda_allocator.py) this reproduces
``max_memory_allocated`` and ``max_memory_reserved`` to the byte on three and within 1 MiB on the
fourth.
"""

from __future__ import annotations

import bisect

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: largest request served from the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segment
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc: requests below it share a kLargeBuffer segment
LARGE_BUFFER = 20 << 20  # kLargeBuffer
ROUND_LARGE = 2 << 20  # kRoundLarge: larger requests get a segment rounded up to 2 MiB


def round_size(nbytes: int) -> int:
    """The block size a request of ``nbytes`` asks for."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * ((nbytes + MIN_BLOCK - 1) // MIN_BLOCK)


def segment_size(size: int) -> int:
    """The cudaMalloc size for a (rounded) request no cached block can serve."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((size + ROUND_LARGE - 1) // ROUND_LARGE)


class Block:
    """A block of a segment: allocated or free; neighbours within the segment."""

    __slots__ = ("addr", "size", "small", "prev", "next", "allocated")

    def __init__(self, addr: int, size: int, small: bool) -> None:
        self.addr, self.size, self.small = addr, size, small
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False


class CachingAllocator:
    """The allocator's pools and statistics. ``malloc(nbytes)`` returns the block; ``free(block)``
    gives it back. ``allocated``/``reserved`` are the current statistics, ``peak_allocated``/
    ``peak_reserved`` their maxima since ``reset_peaks``."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}
        self._next_addr = 1 << 47
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0
        self.segments = 0

    def add_free_block(self, nbytes: int, small: bool = True) -> None:
        """Free space the process already holds before the replay (it is not counted as reserved
        here: the replay's figures are relative to the state before it)."""
        self._next_addr -= nbytes + (1 << 30)
        self._insert(Block(self._next_addr, nbytes, small))

    def _insert(self, b: Block) -> None:
        bisect.insort(self._pools[b.small], (b.size, b.addr, b))

    def _remove(self, b: Block) -> None:
        pool = self._pools[b.small]
        i = bisect.bisect_left(pool, (b.size, b.addr))
        del pool[i]

    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            b = pool.pop(i)[2]
        else:
            seg = segment_size(size)
            # a gap between segments keeps them from ever being neighbours
            self._next_addr -= seg + (1 << 30)
            b = Block(self._next_addr, seg, small)
            self.segments += 1
            self.reserved += seg
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        rest = b.size - size
        if (rest >= MIN_BLOCK) if small else (rest > SMALL_SIZE):
            r = Block(b.addr + size, rest, small)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            b.next, b.size = r, size
            self._insert(r)
        b.allocated = True
        self.allocated += b.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return b

    def free(self, b: Block) -> None:
        b.allocated = False
        self.allocated -= b.size
        p = b.prev
        if p is not None and not p.allocated:
            self._remove(p)
            b.addr, b.size, b.prev = p.addr, b.size + p.size, p.prev
            if p.prev is not None:
                p.prev.next = b
        n = b.next
        if n is not None and not n.allocated:
            self._remove(n)
            b.size, b.next = b.size + n.size, n.next
            if n.next is not None:
                n.next.prev = b
        self._insert(b)

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved


def replay(events, allocator: CachingAllocator | None = None) -> CachingAllocator:
    """Replay ``(kind, key, nbytes)`` events (``kind`` "alloc" or "free"; ``key`` names the
    tensor) through an allocator; returns it, its peaks set."""
    a = allocator or CachingAllocator()
    live: dict = {}
    for kind, key, nbytes in events:
        if kind == "alloc":
            live[key] = a.malloc(nbytes)
        else:
            a.free(live.pop(key))
    return a
