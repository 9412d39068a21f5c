"""Solve time of the budget placement on heterogeneous chains of 100 and 1,000 blocks.

Run: python -m benchmarks.checkpoint_speed. Chains mix block widths and attention lengths with
profiled-looking (non-round) byte counts and times; the budget is halfway between the peak with
every block checkpointed and the peak with none. Prints the best of several runs per size.
"""

from __future__ import annotations

import random
import time

from planner.routes.checkpoint_solvers import ChainBlock, chain_peak_bytes, min_peak_plan, solve_budget

GOAL_MS = {100: 100.0, 1000: 100.0}  # issue 4: 1,000 blocks in under 100 ms


def heterogeneous_chain(n: int, seed: int) -> list[ChainBlock]:
    rng = random.Random(seed)
    chain = []
    for _ in range(n):
        width = rng.choice([2048, 4096]) * rng.randint(1, 4)
        saved = rng.randint(20, 60) * width * 1024 + rng.randint(0, 10**6)
        chain.append(ChainBlock(forward_s=saved / 1e12 * rng.uniform(0.5, 2.0),
                                backward_s=2 * saved / 1e12, saved_bytes=saved,
                                input_bytes=2 * width * 1024,
                                transient_bytes=rng.randint(1, 4) * width * 4096))
    return chain


def main(repeats: int = 5) -> None:
    print(f"{'blocks':>7} {'solve ms':>9} {'goal ms':>8} {'ratio':>6}  {'solver':<10} "
          f"{'exact':<5} {'gap to lower bound':>18}")
    for n in (100, 1000):
        chain = heterogeneous_chain(n, seed=n)
        low, high = chain_peak_bytes(chain, min_peak_plan(chain)), chain_peak_bytes(chain, [])
        budget = (low + high) // 2
        best_s, sol = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            sol = solve_budget(chain, budget)
            best_s = min(best_s, time.perf_counter() - t0)
        assert sol is not None and sol.fits and sol.peak_bytes <= budget
        ms = best_s * 1e3
        gap = (sol.recompute_s - sol.lower_bound_s) / sol.lower_bound_s
        print(f"{n:>7} {ms:>9.1f} {GOAL_MS[n]:>8.0f} {ms / GOAL_MS[n]:>6.2f}  {sol.method:<10} "
              f"{str(sol.exact):<5} {gap:>18.2%}")


if __name__ == "__main__":
    main()
