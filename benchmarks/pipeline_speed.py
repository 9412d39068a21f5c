"""Simulation speed: p=64, m=512, v=2 (v=1 where the schedule holds one stage per rank).

Times ``plan_pipeline`` without the timeline (order generation + simulation + per-rank figures),
best of 3, and the simulation alone on a prebuilt order. Goal: < 50 ms per schedule. The process
CPU time of a plan is printed too: on a shared machine it is what wall time would be without
other processes competing for the cores.
Run: ``python benchmarks/pipeline_speed.py``.
"""

from __future__ import annotations

import time

from planner.pipeline import PipelineRequest, plan_pipeline
from planner.pipeline_schedules import build_schedule
from planner.pipeline_sim import simulate

GOAL_MS = 50.0
P, M, V = 64, 512, 2
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", V), ("zb-h1", 1), ("zb-h1", V),
             ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2), ("dualpipe", 1)]


def best_ms(fn, repeat: int = 3, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best * 1e3


def main() -> None:
    print(f"{'schedule':<18}{'p':>4}{'m':>6}{'v':>3}{'actions':>9}{'ms/plan':>10}{'ms/sim':>9}"
          f"{'cpu ms':>8}{'goal ms':>9}{'ratio':>7}")
    for name, v in SCHEDULES:
        req = PipelineRequest(schedule=name, stages=P, microbatches=M, virtual_stages=v,
                              include_timeline=False)
        plan_ms = best_ms(lambda: plan_pipeline(req))
        cpu_ms = best_ms(lambda: plan_pipeline(req), clock=time.process_time)
        sched = build_schedule(name, P, M, v)
        S = sched.num_stages
        sim_ms = best_ms(lambda: simulate(sched, [1.0] * S, [1.0] * S, [1.0] * S, 0.01))
        n = sum(len(o) for o in sched.orders)
        print(f"{name:<18}{P:>4}{M:>6}{v:>3}{n:>9}{plan_ms:>10.1f}{sim_ms:>9.1f}{cpu_ms:>8.1f}{GOAL_MS:>9.0f}"
              f"{plan_ms / GOAL_MS:>7.2f}")


if __name__ == "__main__":
    main()
