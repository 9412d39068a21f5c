"""Simulation speed: p=64, m=512, v=2 (v=1 where the schedule holds one stage per rank).

Per schedule, best of 5 wall-clock runs of:
- build: the per-rank action lists (``build_schedule``);
- sim: ``simulate`` on a prebuilt order with free links (the public check's setting) and with
  slow links (a message costs 5% of a forward), which makes the per-rank relaxation take more
  sweeps (``sweeps`` column);
- event loop: the same slow-link simulation forced through the action-by-action event loop (the
  fallback), for the side-by-side ratio;
- plan: ``plan_pipeline`` without the timeline — build + simulate + per-rank figures, the work
  behind one ``POST /v1/pipeline``.
Goal: < 50 ms per schedule (the ``plan`` column is held to it). Wall-clock numbers on a shared
2-core machine vary by up to 2x between runs; the ratios within one run are the stable part.
Run: ``python benchmarks/pipeline_speed.py``.
"""

from __future__ import annotations

import time

from planner.layouts import pipeline_sim
from planner.routes.pipeline import PipelineRequest, plan_pipeline
from planner.layouts.pipeline_schedules import build_schedule
from planner.layouts.pipeline_sim import simulate

GOAL_MS = 50.0
P, M, V = 64, 512, 2
SLOW_LINK_S = 0.05
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", V), ("zb-h1", 1), ("zb-h1", V),
             ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2), ("dualpipe", 1)]


def best_ms(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def sweeps_needed(sched, costs, comm: float) -> int:
    """Sweeps the relaxation takes to settle (a rerun with a growing sweep limit)."""
    saved = pipeline_sim.MAX_SWEEPS
    try:
        for k in range(1, saved + 1):
            pipeline_sim.MAX_SWEEPS = k
            calls = []
            orig = pipeline_sim._relax_by_rank
            pipeline_sim._relax_by_rank = lambda *a: calls.append(orig(*a)) or calls[-1]
            try:
                simulate(sched, *costs, comm)
            finally:
                pipeline_sim._relax_by_rank = orig
            if calls and calls[0] is not None:
                return k
        return -1
    finally:
        pipeline_sim.MAX_SWEEPS = saved


def event_loop_ms(sched, costs, comm: float) -> float:
    orig = pipeline_sim._relax_by_rank
    pipeline_sim._relax_by_rank = lambda *a: None
    try:
        return best_ms(lambda: simulate(sched, *costs, comm), repeat=3)
    finally:
        pipeline_sim._relax_by_rank = orig


def main() -> None:
    print(f"{'schedule':<18}{'p':>4}{'m':>5}{'v':>3}{'actions':>9}{'build':>8}{'sim':>7}"
          f"{'sim slow':>10}{'sweeps':>8}{'event loop':>12}{'speed-up':>10}{'plan':>7}{'goal':>6}"
          f"{'plan/goal':>11}")
    for name, v in SCHEDULES:
        req = PipelineRequest(schedule=name, stages=P, microbatches=M, virtual_stages=v,
                              include_timeline=False)
        sched = build_schedule(name, P, M, v)
        S = sched.num_stages
        costs = ([1.0] * S, [1.0] * S, [1.0] * S)
        build = best_ms(lambda: build_schedule(name, P, M, v))
        sim = best_ms(lambda: simulate(sched, *costs, 0.0))
        slow = best_ms(lambda: simulate(sched, *costs, SLOW_LINK_S))
        sweeps = sweeps_needed(sched, costs, SLOW_LINK_S)
        loop = event_loop_ms(sched, costs, SLOW_LINK_S)
        plan = best_ms(lambda: plan_pipeline(req))
        n = sum(len(o) for o in sched.orders)
        print(f"{name:<18}{P:>4}{M:>5}{v:>3}{n:>9}{build:>8.1f}{sim:>7.1f}{slow:>10.1f}{sweeps:>8}"
              f"{loop:>12.1f}{loop / slow:>9.1f}x{plan:>7.1f}{GOAL_MS:>6.0f}{plan / GOAL_MS:>11.2f}")
    print("\nms, best of 5 (event loop: best of 3). sim: free links; sim slow / event loop: a "
          f"message costs {SLOW_LINK_S} of a forward. plan = build + sim + per-rank figures.")


if __name__ == "__main__":
    main()
