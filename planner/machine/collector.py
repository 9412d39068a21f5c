"""Python's cyclic garbage collector, set for a process that replays training steps.

A replay allocates hundreds of thousands of small objects (storages, autograd nodes, the
polynomial terms of a template's sizes) that reference counting frees as it goes. CPython's
default collector still runs its youngest generation every 700 allocations and a full pass
every 100 of those, and a full pass traverses every object the process holds, its imported
modules included: on the slowest request of the worst-case search (``/v1/zero`` of a 1024-block
model, ``benchmarks/results/worst-case-cpu.md``) that was a third to a half of the wall time.

``tune()``, called once a serving process has imported and built everything (``memplan
serve``; ``memplan estimate`` and ``memplan plan`` once the planner is imported), moves the objects alive then out of the collector's reach
(``gc.freeze``: never traversed again, never collected; they live as long as the process
anyway) and runs the youngest generation every ``YOUNG_THRESHOLD`` allocations. Cycles are
still collected; answers do not depend on it. It sets the C heap for large arrays too
(``planner/machine/heap.py``).
"""

from __future__ import annotations

import gc

from planner.machine import heap

__all__ = ["YOUNG_THRESHOLD", "tune"]

YOUNG_THRESHOLD = 10_000


_TUNED = [False]


def tune() -> None:
    """Once per process (a later call does nothing)."""
    if _TUNED[0]:
        return
    _TUNED[0] = True
    heap.tune()  # (the C heap too: planner/machine/heap.py)
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young:  # 0: the collector is off; left so
        gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
