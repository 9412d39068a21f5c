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
Goal: < 50 ms per schedule (the ``plan`` column is held to it). A second table: schedules at the
limits with a setup's stage costs and messages, where the longest path wraps round the ranks
(the relaxation alone, the stage chains of ``planner/layouts/pipeline_sim_chains.py`` alone,
and ``simulate``'s choice, with the ways it tried). A third: a caller's stage costs far apart at
the limits, with a slow link and a free one (the repeated rounds of
``planner/layouts/pipeline_sim_steady.py`` alone, the levels of ``pipeline_sim_levels.py``
alone, the event loop, and ``simulate``'s choice). Wall-clock numbers on a shared
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


WAYS = ("_relax_by_rank", "settle", "repeat", "by_levels")


def event_loop_ms(sched, costs, comm: float) -> float:
    was = [getattr(pipeline_sim, w) for w in WAYS]
    for w in WAYS:
        setattr(pipeline_sim, w, lambda *a, **k: None)
    try:
        return best_ms(lambda: simulate(sched, *costs, comm), repeat=3)
    finally:
        for w, f in zip(WAYS, was):
            setattr(pipeline_sim, w, f)


def ways_taken(sched, costs, comm: float) -> list[str]:
    """The ways ``simulate`` tries, in order, the last the one that answered (the event loop
    where none did)."""
    names = {"_relax_by_rank": "relax", "settle": "chains", "repeat": "steady",
             "by_levels": "levels"}
    was = [getattr(pipeline_sim, w) for w in WAYS]
    used: list[str] = []

    def traced(w, f):
        def call(*a, **k):
            used.append(names[w])
            return f(*a, **k) if w != "by_levels" else f(*a, relax=was[0], **k)
        return call
    for w, f in zip(WAYS, was):
        setattr(pipeline_sim, w, traced(w, f))
    try:
        simulate(sched, *costs, comm)
    finally:
        for w, f in zip(WAYS, was):
            setattr(pipeline_sim, w, f)
    return used


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


# At the limit of stages x virtual stages x micro-batches (2^20), with a setup's stage costs (a
# 1024-block llama on H100s: the last stage's loss makes it about four times the others) and its
# activation messages: the simulations the /v1/pipeline route runs for such a setup
LIMIT_MODEL = {"family": "llama", "num_layers": 1024, "hidden_size": 1024, "num_heads": 16,
               "vocab_size": 50257, "max_sequence_length": 8192}
LIMIT_CASES = [("interleaved-1f1b", 64, 16, 1024), ("interleaved-1f1b", 8, 32, 4096),
               ("zb-h1", 8, 16, 8192), ("zb-h1", 64, 4, 4096), ("zb-v", 64, 2, 8192),
               ("dualpipe-v", 64, 2, 8192), ("1f1b", 64, 1, 16384), ("gpipe", 64, 1, 16384)]


def limits() -> None:
    """Per LIMIT_CASES schedule: the relaxation alone (no work limit), the stage chains' scans
    alone (``pipeline_sim_chains.settle``) and ``simulate`` as it chooses (the ways it tried, in
    order: the last answered), best of 3; the largest relative difference of the first two
    answers' ready times."""
    import numpy as np

    from planner.layouts import pipeline_sim_chains
    from planner.routes.pipeline import roofline_costs, schedule_shape

    print(f"\n{'schedule':<18}{'p':>4}{'v':>4}{'m':>7}{'actions':>9}{'relax':>9}{'chains':>8}"
          f"{'simulate':>10}{'relax/sim':>11}  {'ways':<22}{'difference':>11}")
    for name, p, v, m in LIMIT_CASES:
        setup = {"model": LIMIT_MODEL,
                 "training": {"micro_batch_size": 1, "sequence_length": 2048,
                              "gradient_accumulation_steps": m},
                 "parallelism": {"pipeline_parallel": p, "pipeline_schedule": name,
                                 "virtual_pipeline_stages": v}, "hardware": {"gpu": "h100-80gb"}}
        req = PipelineRequest.model_validate({"setup": setup, "include_timeline": False})
        name, p, m, v = schedule_shape(req)
        sched = build_schedule(name, p, m, v)
        f, i, w, msg, bw, _ = roofline_costs(req.setup, sched.num_stages,
                                             req.model_flops_utilization)
        comm = msg / bw
        offs, flat, dep_pos, cost, cross, _, _ = pipeline_sim._flat_arrays(sched, f, i, w, comm)
        consumers = pipeline_sim_chains.consumers_of(sched)
        limits_were = pipeline_sim.MAX_SWEEPS, pipeline_sim.RELAX_WORK
        pipeline_sim.MAX_SWEEPS, pipeline_sim.RELAX_WORK = 4000, 10 ** 6
        try:
            out: list = []
            relax = best_ms(lambda: out.append(pipeline_sim._relax_by_rank(
                p, offs, dep_pos, cost, cross, consumers, comm)), repeat=3)
        finally:
            pipeline_sim.MAX_SWEEPS, pipeline_sim.RELAX_WORK = limits_were
        got: list = []
        chains = best_ms(lambda: got.append(pipeline_sim_chains.settle(
            sched, offs, flat, dep_pos, cost, cross, comm)), repeat=3)
        sim = best_ms(lambda: simulate(sched, f, i, w, comm), repeat=3)
        n = offs[p]
        a, b = out[-1][:n], got[-1][:n]
        diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)))
        path = "+".join(ways_taken(sched, (f, i, w), comm)) or "loop"
        print(f"{name:<18}{p:>4}{v:>4}{m:>7}{n:>9}{relax:>9.0f}{chains:>8.0f}{sim:>10.0f}"
              f"{relax / sim:>10.1f}x  {path:<22}{diff:>11.1e}")
    print("\nms, best of 3; the relaxation without its work limit, the stage chains alone, and "
          "simulate as it chooses. difference: the largest relative difference of the two "
          "answers' times (floats summed in running totals against integer units).")


# A caller's per-stage costs far apart (0.05-4 s, drawn once per row) at the limits, with a link
# slower than a stage or a free one: the cases that neither scan settles within its work limit
FAR_CASES = [("interleaved-1f1b", 32, 4, 8192, 5.0), ("1f1b", 64, 1, 16384, 5.0),
             ("zb-v", 64, 2, 8192, 5.0), ("zb-v", 64, 2, 8192, 0.0),
             ("dualpipe-v", 8, 2, 65536, 5.0), ("dualpipe-v", 64, 2, 8192, 5.0),
             ("1f1b", 1024, 1, 1024, 5.0), ("zb-h2", 1024, 1, 1024, 5.0),
             ("zb-v", 512, 2, 1024, 5.0), ("interleaved-1f1b", 256, 4, 1024, 5.0),
             ("gpipe", 1024, 1, 1024, 5.0)]


def far_apart() -> None:
    """Per FAR_CASES schedule: the repeated rounds alone (``pipeline_sim_steady``; '-' where the
    orders hold none or it gives way), the levels alone (``pipeline_sim_levels``), the event
    loop alone, and ``simulate`` as it chooses (best of 3, ms); the ways it tried; the largest
    relative difference of its times from the event loop's."""
    import random

    import numpy as np

    from planner.layouts import pipeline_sim_steady as steady

    print(f"\n{'schedule':<18}{'p':>5}{'v':>3}{'m':>7}{'link':>5}{'actions':>9}{'steady':>8}"
          f"{'levels':>8}{'loop':>7}{'simulate':>10}{'loop/sim':>10}  {'ways':<24}{'difference':>11}")
    for name, p, v, m, link in FAR_CASES:
        sched = build_schedule(name, p, m, v)
        rng = random.Random(3)
        costs = tuple([round(rng.uniform(0.05, 4), 3) for _ in range(sched.num_stages)]
                      for _ in range(3))
        offs, flat, dep_pos, cost, cross, _, _ = pipeline_sim._flat_arrays(sched, *costs, link)
        rd = steady.rounds_of(flat, offs, m)
        rd = rd and steady.with_reach(rd, offs, dep_pos)
        rep = rd and steady.repeat(rd, offs, dep_pos, cost, cross, link)
        st_ms = f"{best_ms(lambda: steady.repeat(rd, offs, dep_pos, cost, cross, link), 3):8.0f}" \
            if rep is not None else f"{'-':>8}"
        lv = best_ms(lambda: pipeline_sim.by_levels(p, offs, dep_pos, cost, cross, link, None), 3)
        loop = event_loop_ms(sched, costs, link)
        sim = best_ms(lambda: simulate(sched, *costs, link), repeat=3)
        ways = ways_taken(sched, costs, link)
        a = simulate(sched, *costs, link).end_flat
        was = [getattr(pipeline_sim, w) for w in WAYS]
        for w in WAYS:
            setattr(pipeline_sim, w, lambda *x, **k: None)
        try:
            b = simulate(sched, *costs, link).end_flat
        finally:
            for w, f in zip(WAYS, was):
                setattr(pipeline_sim, w, f)
        diff = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
        print(f"{name:<18}{p:>5}{v:>3}{m:>7}{link:>5.0f}{offs[p]:>9}{st_ms}{lv:>8.0f}{loop:>7.0f}"
              f"{sim:>10.0f}{loop / sim:>9.1f}x  {'+'.join(ways) or 'loop':<24}{diff:>11.1e}")
    print("\nms, best of 3. link: the message's cost, s. ways: what simulate tried, in order (the "
          "last answered; 'loop' alone: none of the others ran). difference: the largest relative "
          "difference of simulate's end times from the event loop's (0: the same floats).")


if __name__ == "__main__":
    main()
    limits()
    far_apart()
