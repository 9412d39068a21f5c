"""Which blocks of a checkpoint plan a replay simulates, and which it accounts for
arithmetically (``planner/step/program.py: ReferenceProgram._phantom_forward``)."""

from __future__ import annotations

__all__ = ["compression_plan", "plan_period"]


def plan_period(checkpointed: set[int], num_layers: int, longest: int = 64) -> int | None:
    """The shortest period k (at most ``longest`` and a seventh of the blocks) with which the
    checkpoint plan repeats over all blocks: block i checkpointed exactly when block i + k is.
    None when it has none."""
    for k in range(1, min(longest, num_layers // 7) + 1):
        if all((i in checkpointed) == (i + k in checkpointed) for i in range(num_layers - k)):
            return k
    return None


def compression_plan(checkpointed: set[int], num_layers: int, longest: int = 64
                     ) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Which blocks to simulate, and the phantoms that stand in for the others.

    With a checkpoint plan of period k (``plan_period``) and q whole periods: periods 0, 1, 2
    and the last two (with any remainder) are simulated and one phantom after period 2 stands
    for the q - 5 between, measured on period 2. Inside each simulated period, a run of r >= 7
    blocks alike (a long period of checkpointed blocks with one kept, sqrt's) is compressed the
    same way: its first three and last two blocks simulated, a phantom after its third standing
    for the r - 5 between, measured on that third block — so a period costs a few blocks
    however long it is, and every simulated period is compressed alike (the outer phantom's
    measure, period 2, includes its inner phantoms).

    A plan without a period (a budget's prefix, explicit blocks) or with fewer than seven
    periods is one period of all the blocks: each of its runs of r >= 7 blocks alike is
    compressed as inside a period (a prefix plan of 1024 blocks simulates ten).

    Returns (real_blocks, phantoms): the simulated blocks' indices, and per phantom (first and
    last simulated position of its measured window, copies of that window it stands for, blocks
    it stands for)."""
    k = plan_period(checkpointed, num_layers, longest)
    q = num_layers // k if k else 1
    if k is None:
        k = num_layers
    pattern = [i in checkpointed for i in range(k)]
    runs, a = [], 0  # maximal runs of blocks alike inside a period: (start, length)
    for i in range(1, k + 1):
        if i == k or pattern[i] != pattern[a]:
            runs.append((a, i - a))
            a = i
    inner = [(a, r) for a, r in runs if r >= 7]
    keep = [i for i in range(k) if not any(a + 3 <= i < a + r - 2 for a, r in inner)]
    real: list[int] = []
    phantoms: list[tuple[int, int, int, int]] = []
    for p in ([0, 1, 2, *range(q - 2, q)] if q > 1 else [0]):
        for i in keep:
            real.append(p * k + i)
            for a, r in inner:
                if i == a + 2:
                    j = len(real) - 1
                    phantoms.append((j, j, r - 5, r - 5))
        if p == 2:
            phantoms.append((2 * len(keep), 3 * len(keep) - 1, q - 5, (q - 5) * k))
    real += range(q * k, num_layers)
    return real, phantoms
