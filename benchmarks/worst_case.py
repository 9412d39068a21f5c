"""The slowest requests within the documented limits: wall time and memory of each, top 10.

    python -m benchmarks.worst_case [--random 60] [--limit-s 20] [--seed 0]
                                    [--out benchmarks/results/worst-case-cpu.md]
    python -m benchmarks.worst_case --only "random #0" --only "random #21" [--rounds 5]

Goal: every request within the documented input limits answers in at most 1 s using at most
256 MiB. Each candidate request runs in a process of its own, forked from a parent that has
imported the app but estimated nothing (so no candidate profits from another's caches) and set
the garbage collector as ``memplan serve`` does (``planner/machine/collector.py``): the
time is the request's wall time through the ASGI app (``TestClient``), the memory is the
child's peak resident set minus the parent's at the fork. A child past ``--limit-s`` is killed
and reported as over the limit (the service's own per-request work limit is lifted for this, so
the raw cost is what is measured).

Candidates: hand-picked extremes (the largest layer counts, pipeline ranks, micro-batch counts
(every schedule at the limit of pipeline ranks x virtual stages x micro-batches),
data-parallel degrees, checkpoint plans, LoRA, eager attention with dropout, ranks holding two
stages (interleaved, the V shapes), timelines and SVG) and a seeded random search over layers,
widths, ranks, micro-batches, every pipeline schedule (with the stages per rank it allows),
checkpoint plans, LoRA, routes, ``include_timeline`` and the SVG rendering; half its pipelined
candidates are setups the estimate replays rank by rank (one data-parallel replica, no
checkpointing, LoRA or dropout), the others mostly take the composed approximation.

``--only LABEL`` (repeatable) measures just those candidates, each ``--rounds`` times (rounds
interleave the rows), prints every run, the median seconds (wall and CPU) and peak RSS per row
and one JSON line of them, and writes no table: for comparing two versions of the code on a few
rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_S = 1.0
GOAL_RSS_MIB = 256

BIG = {"family": "llama", "num_layers": 1024, "hidden_size": 8192, "num_heads": 64,
       "num_kv_heads": 8, "vocab_size": 128256, "max_sequence_length": 8192}


def _mem(model: dict, training: dict | None = None, parallelism: dict | None = None,
         hardware: bool = True) -> dict:
    body: dict = {"model": model, "training": {"micro_batch_size": 1, "sequence_length": 2048,
                                              **(training or {})}}
    if parallelism:
        body["parallelism"] = parallelism
    if hardware:
        body["hardware"] = {"gpu": "h100-80gb"}
    return body


def hand_picked() -> list[tuple[str, str, dict, dict]]:
    """(label, path, body, headers): the extremes a newcomer's probe found slow."""
    every_other = {"strategy": "every-k", "every_k": 2}
    return [
        # (pipeline_parallel x virtual stages x micro-batches is at most 2^20: 422 past it)
        ("memory 1024 layers pp 1024 m 65536", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 65536}, {"pipeline_parallel": 1024}), {}),
        ("memory 1024 layers pp 1024 m 1024", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 1024}, {"pipeline_parallel": 1024}), {}),
        ("zero 1024 layers dp 1048576", "/v1/zero",
         _mem(BIG, None, {"data_parallel": 1_048_576}), {}),
        ("memory 128 layers pp 16 m 128", "/v1/memory",
         _mem({**BIG, "num_layers": 128}, {"gradient_accumulation_steps": 128},
              {"pipeline_parallel": 16}), {}),
        ("memory 1024 layers every-2 eager dropout lora", "/v1/memory",
         _mem(BIG, {"activation_checkpointing": every_other, "attention": "eager",
                    "dropout": 0.1, "lora": {"rank": 16}}), {}),
        ("zero gpt2 dp 999999", "/v1/zero",
         {"model": {"preset": "gpt2"}, "training": {"micro_batch_size": 1, "sequence_length": 128},
          "parallelism": {"data_parallel": 999999}, "hardware": {"gpu": "h100-80gb"}}, {}),
        ("memory 1024 layers zero-3 dp 64", "/v1/memory",
         _mem(BIG, None, {"data_parallel": 64, "zero_stage": 3}), {}),
        ("zero 1024 layers dp 64", "/v1/zero", _mem(BIG, None, {"data_parallel": 64}), {}),
        ("checkpointing 1024 layers budget", "/v1/checkpointing",
         {**_mem(BIG), "strategy": "budget"}, {}),
        ("pipeline 64 ranks v 16 m 1024 timeline", "/v1/pipeline",
         {"schedule": "interleaved-1f1b", "stages": 64, "virtual_stages": 16,
          "microbatches": 1024}, {}),
        ("pipeline zb-h2 1024 ranks m 1024 svg", "/v1/pipeline",
         {"schedule": "zb-h2", "stages": 1024, "microbatches": 1024},
         {"accept": "image/svg+xml"}),
        ("pipeline setup 1024 layers pp 64 m 4096", "/v1/pipeline",
         {"setup": _mem(BIG, {"gradient_accumulation_steps": 4096}, {"pipeline_parallel": 64}),
          "include_timeline": False}, {}),
        # ranks holding two stages: interleaved, and the V shapes (a rank's stages meet at
        # the V's turn)
        ("memory 1024 layers pp 64 interleaved v 4 m 4096", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 4096},
              {"pipeline_parallel": 64, "pipeline_schedule": "interleaved-1f1b",
               "virtual_pipeline_stages": 4}), {}),
        ("memory 1024 layers pp 64 zb-v m 512", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 512},
              {"pipeline_parallel": 64, "pipeline_schedule": "zb-v",
               "virtual_pipeline_stages": 2}), {}),
        ("memory 1024 layers pp 64 dualpipe-v m 512", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 512},
              {"pipeline_parallel": 64, "pipeline_schedule": "dualpipe-v",
               "virtual_pipeline_stages": 2}), {}),
        ("memory 1024 layers pp 64 dualpipe m 512", "/v1/memory",
         _mem(BIG, {"gradient_accumulation_steps": 512},
              {"pipeline_parallel": 64, "pipeline_schedule": "dualpipe"}), {}),
        # every schedule at the limit of pipeline_parallel x virtual stages x micro-batches
        # (2^20): the deepest pipelines, and the most stages on one rank
        *[(f"memory 1024 layers pp {pp} {name} v {v} m {m}", "/v1/memory",
           _mem(BIG, {"gradient_accumulation_steps": m},
                {"pipeline_parallel": pp, "pipeline_schedule": name,
                 "virtual_pipeline_stages": v}), {})
          for name, pp, v, m in (("interleaved-1f1b", 2, 512, 1024),
                                 ("interleaved-1f1b", 256, 4, 1024),
                                 ("zb-h1", 1024, 1, 1024), ("zb-h2", 1024, 1, 1024),
                                 ("zb-v", 512, 2, 1024), ("dualpipe-v", 256, 2, 2048),
                                 ("gpipe", 1024, 1, 1024))],
        # the timing simulation at the same limit, with a setup's stage costs (the last stage's
        # loss makes it the slowest) and messages: many stages a rank, whose longest path wraps
        # round the ranks again and again
        *[(f"pipeline setup 1024 layers pp {pp} {name} v {v} m {m}", "/v1/pipeline",
           {"setup": _mem(BIG, {"gradient_accumulation_steps": m},
                          {"pipeline_parallel": pp, "pipeline_schedule": name,
                           "virtual_pipeline_stages": v}), "include_timeline": True}, {})
          for name, pp, v, m in (("interleaved-1f1b", 64, 16, 1024),
                                 ("interleaved-1f1b", 8, 32, 4096),
                                 ("zb-h1", 8, 16, 8192), ("zb-v", 64, 2, 8192))],
        # per-stage costs of the caller's, far apart (0.05 to 4 s, drawn once), and a link
        # slower than a stage: the longest path turns between ranks and stage chains dozens of
        # times, so neither the relaxation nor the stage chains settle within their work limits
        # and the action-by-action event loop times the schedule
        ("pipeline costs far apart, slow link, pp 32 v 4 m 8192", "/v1/pipeline",
         {"schedule": "interleaved-1f1b", "stages": 32, "virtual_stages": 4,
          "microbatches": 8192, "include_timeline": False,
          "costs": {k: [round(rng.uniform(0.05, 4), 3) for _ in range(128)]
                    for rng in [random.Random(2)]
                    for k in ("forward_s", "backward_input_s", "backward_weight_s")}
          | {"p2p_latency_s": 5.0}}, {}),
        # the same far-apart costs (drawn once per row) on every schedule at the limits, with
        # a link slower than a stage or a free one: deep pipelines (as many ranks as
        # micro-batches: no steady rounds), long ones, and steady rounds whose times repeat
        # late (ZB-V on 64 ranks with free messages: a quarter of the rounds in)
        *[(f"pipeline costs far apart, {'slow' if lat else 'free'} link, {name} pp {pp} v {v} "
           f"m {m}", "/v1/pipeline",
           {"schedule": name, "stages": pp, "virtual_stages": v, "microbatches": m,
            "include_timeline": False,
            "costs": {k: [round(rng.uniform(0.05, 4), 3) for _ in range(pp * v)]
                      for rng in [random.Random(3)]
                      for k in ("forward_s", "backward_input_s", "backward_weight_s")}
            | {"p2p_latency_s": lat}}, {})
          for name, pp, v, m, lat in (("gpipe", 1024, 1, 1024, 5.0), ("1f1b", 1024, 1, 1024, 5.0),
                                      ("zb-h2", 1024, 1, 1024, 5.0), ("zb-v", 512, 2, 1024, 5.0),
                                      ("interleaved-1f1b", 256, 4, 1024, 5.0),
                                      ("dualpipe-v", 64, 2, 8192, 5.0),
                                      ("dualpipe-v", 8, 2, 65536, 5.0),
                                      ("zb-v", 64, 2, 8192, 0.0), ("1f1b", 64, 1, 16384, 5.0),
                                      ("interleaved-1f1b", 64, 2, 4096, 0.0))],
    ]


# every schedule the estimate routes take, with the stages per rank each allows
SCHEDULES = [("gpipe", (1,)), ("1f1b", (1,)), ("interleaved-1f1b", (2, 4)), ("zb-h1", (1,)),
             ("zb-h2", (1,)), ("zb-v", (2,)), ("dualpipe", (1,)), ("dualpipe-v", (2,))]


def random_candidates(n: int, seed: int) -> list[tuple[str, str, dict, dict]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        heads = rng.choice([8, 16, 32, 64])
        model = {"family": rng.choice(["gpt2", "llama"]),
                 "num_layers": rng.choice([24, 96, 256, 512, 1024]),
                 "hidden_size": heads * rng.choice([64, 128]), "num_heads": heads,
                 "vocab_size": rng.choice([50257, 128256]), "max_sequence_length": 8192}
        pp = rng.choice([1, 1, 2, 8, 64, 256])
        while model["num_layers"] % pp:
            pp //= 2
        ck = rng.choice([{"strategy": "none"}, {"strategy": "full"}, {"strategy": "selective"},
                         {"strategy": "every-k", "every_k": rng.choice([2, 3, 7])},
                         {"strategy": "sqrt"}, {"strategy": "budget"}])
        training = {"micro_batch_size": rng.choice([1, 4, 64]),
                    "sequence_length": rng.choice([512, 4096, 32768]),
                    "gradient_accumulation_steps": rng.choice([1, 8, 512, 8192]),
                    "activation_checkpointing": ck,
                    "precision": rng.choice(["fp32", "amp-bf16", "mixed-bf16"]),
                    "attention": rng.choice(["sdpa", "eager"]),
                    "dropout": rng.choice([0.0, 0.1])}
        if rng.random() < 0.3:
            training["lora"] = {"rank": 8}
        schedule, vs = rng.choice(SCHEDULES)
        v = rng.choice(vs)
        while pp > 1 and model["num_layers"] % (pp * v):
            pp //= 2
        parallelism = {"pipeline_parallel": pp, "pipeline_schedule": schedule,
                       "data_parallel": rng.choice([1, 8, 1024, 1_048_576]),
                       "zero_stage": rng.choice([0, 1, 2, 3])}
        if parallelism["data_parallel"] == 1:
            parallelism["zero_stage"] = 0
        if pp > 1 and v > 1:
            parallelism["virtual_pipeline_stages"] = v
        if pp > 1 and rng.random() < 0.5:
            # half the pipelined candidates within what the estimate replays rank by rank
            # (planner/layouts/pipeline_memory.py: ``unsupported_reason``); drawn at random
            # above, nearly every one would take the composed approximation instead
            parallelism |= {"data_parallel": 1, "zero_stage": 0}
            training |= {"activation_checkpointing": {"strategy": "none"}, "dropout": 0.0,
                         "precision": rng.choice(["fp32", "amp-bf16"])}
            training.pop("lora", None)
        body = _mem(model, training, parallelism, hardware=rng.random() < 0.7)
        route = rng.choice(["/v1/memory", "/v1/memory", "/v1/zero", "/v1/checkpointing",
                            "/v1/pipeline"])
        headers: dict = {}
        if route == "/v1/pipeline":
            body = {"setup": {**body, "hardware": {"gpu": "h100-80gb"}},
                    "include_timeline": rng.random() < 0.5}
            if rng.random() < 0.3:
                headers = {"accept": "image/svg+xml"}
        out.append((f"random #{i}", route, body, headers))
    return out


def far_apart_candidates(n: int, seed: int) -> list[tuple[str, str, dict, dict]]:
    """``/v1/pipeline`` with a caller's per-stage costs drawn far apart (0.05-4 s): a random
    schedule, ranks (8 to the limit), stages per rank and micro-batches up to the limit of ranks
    x stages per rank x micro-batches (2^20), and a link that is free, fast or slower than a
    stage. Only shapes the schedule accepts (``pipeline_schedules.check``)."""
    from planner.catalog.specs import MAX_STAGE_MICROBATCHES
    from planner.layouts.pipeline_schedules import ScheduleConstraintError, check

    rng = random.Random(10_000 + seed)
    out: list[tuple[str, str, dict, dict]] = []
    while len(out) < n:
        name, vs = rng.choice(SCHEDULES)
        v = rng.choice(vs if name != "interleaved-1f1b" else (2, 4, 8, 16))
        p = rng.choice([8, 32, 64, 256, 1024])
        top = MAX_STAGE_MICROBATCHES // (p * v)
        m = rng.choice([x for x in (p, 2 * p, 8 * p, top // 2, top) if 1 <= x <= top])
        if name.startswith("dualpipe"):
            m -= m % 2
        try:
            check(name, p, m, v)
        except ScheduleConstraintError:
            continue
        S = p * v * (2 if name == "dualpipe" else 1)
        link = rng.choice([0.0, 0.01, 5.0])
        costs = {k: [round(rng.uniform(0.05, 4), 3) for _ in range(S)]
                 for k in ("forward_s", "backward_input_s", "backward_weight_s")}
        out.append((f"far apart #{len(out)} {name} pp {p} v {v} m {m} link {link:g}",
                    "/v1/pipeline",
                    {"schedule": name, "stages": p, "virtual_stages": v, "microbatches": m,
                     "include_timeline": False, "costs": costs | {"p2p_latency_s": link}}, {}))
    return out


def _short(body):
    """A body for the table: lists of more than 8 numbers cut (the label and seed make it)."""
    if isinstance(body, dict):
        return {k: _short(x) for k, x in body.items()}
    if isinstance(body, list) and len(body) > 8:
        return body[:3] + [f"... {len(body)} values"]
    return body


def _run_child(app, path: str, body: dict, headers: dict, fd: int) -> None:
    from fastapi.testclient import TestClient  # imported by main() before any fork

    with TestClient(app, raise_server_exceptions=False) as client:
        t0, c0 = time.perf_counter(), time.process_time()
        r = client.post(path, json=body, headers=headers)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    os.write(fd, json.dumps({"status": r.status_code, "seconds": dt, "cpu_s": cpu}).encode())
    os._exit(0)


def measure(app, label, path, body, headers, limit_s: float, base_rss_kib: int) -> dict:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            _run_child(app, path, body, headers, wfd)
        finally:
            os._exit(1)
    os.close(wfd)
    deadline = time.monotonic() + limit_s
    status = None
    while True:
        done, st, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            done, st, usage = os.wait4(pid, 0)
            status = "killed"
            break
        time.sleep(0.01)
    data = os.read(rfd, 4096)
    os.close(rfd)
    row = {"label": label, "route": path, "svg": headers.get("accept") == "image/svg+xml",
           "rss_mib": max(0, usage.ru_maxrss - base_rss_kib) / 1024}
    if status == "killed" or not data:
        row |= {"status": status or "crashed", "seconds": limit_s if status else None}
    else:
        row |= json.loads(data)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=60, help="random candidates (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--far-apart", type=int, default=20,
                    help="random /v1/pipeline candidates with a caller's far-apart costs")
    ap.add_argument("--limit-s", type=float, default=20.0, help="kill a request after this")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/worst-case-cpu.md"))
    ap.add_argument("--only", action="append", default=[],
                    help="measure just this candidate (its label, e.g. 'random #0'); repeatable")
    ap.add_argument("--rounds", type=int, default=1, help="with --only: runs of each row")
    args = ap.parse_args(argv)

    import logging
    import warnings

    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: F401  (once, before the forks)
    from planner.machine import collector
    from service.app import create_app
    from service.settings import Settings

    tmp = tempfile.TemporaryDirectory(prefix="memplan-worst-")
    # the service's own work limit (MEMPLAN_ESTIMATE_DEADLINE_S) is lifted: the raw cost is measured
    app = create_app(Settings(database_url=f"sqlite:///{tmp.name}/jobs.db",
                              estimate_deadline_s=10 * args.limit_s))
    collector.tune()  # as `memplan serve` does once the app is built
    base_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.only:
        return _only(app, args, base_rss_kib)
    rows = []
    for cand in (hand_picked() + random_candidates(args.random, args.seed)
                 + far_apart_candidates(args.far_apart, args.seed)):
        row = measure(app, *cand, limit_s=args.limit_s, base_rss_kib=base_rss_kib)
        print(f"{row['seconds'] if row['seconds'] is not None else float('nan'):8.3f} s "
              f"{row['rss_mib']:8.1f} MiB  {row['status']}  {row['route']}  {row['label']}",
              flush=True)
        rows.append((cand, row))
    rows.sort(key=lambda cr: -(cr[1]["seconds"] or args.limit_s))
    over = [r for _, r in rows if (r["seconds"] or args.limit_s) > GOAL_S
            or r["rss_mib"] > GOAL_RSS_MIB]
    lines = [
        f"Slowest requests within the documented limits: {len(rows)} candidates "
        f"({len(hand_picked())} hand-picked, {args.random} random, {args.far_apart} random "
        f"with far-apart stage costs, seed {args.seed}), each in "
        f"a forked process with cold caches; `python -m benchmarks.worst_case`. Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs. Goal: at most {GOAL_S:g} s and "
        f"{GOAL_RSS_MIB} MiB each; requests past {args.limit_s:g} s were killed. CPU s: the "
        "process's CPU time over the request, every thread (a compile it queued included): "
        "near the wall time where the request alone keeps one core busy.",
        "",
        f"Over the goal: {len(over)} of {len(rows)}.",
        "",
        "| # | route | case | status | seconds | vs goal | CPU s | peak RSS MiB |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for i, (cand, r) in enumerate(rows[:10], 1):
        sec, cpu = r["seconds"], r.get("cpu_s")
        lines.append(f"| {i} | {r['route']}{' (svg)' if r['svg'] else ''} | {r['label']} | "
                     f"{r['status']} | {sec if sec is None else f'{sec:.3f}'} | "
                     f"{'' if sec is None else f'{sec / GOAL_S:.1f}x'} | "
                     f"{'' if cpu is None else f'{cpu:.3f}'} | {r['rss_mib']:.0f} |")
    lines += ["", "Bodies of the top 10:", ""]
    for i, (cand, r) in enumerate(rows[:10], 1):
        lines.append(f"{i}. `{json.dumps(_short(cand[2]), separators=(',', ':'))}`")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


def _only(app, args, base_rss_kib: int) -> int:
    """The ``--only`` rows, ``--rounds`` times each, interleaved; medians printed."""
    import statistics

    cands = {c[0]: c for c in hand_picked() + random_candidates(args.random, args.seed)
             + far_apart_candidates(args.far_apart, args.seed)}
    missing = [x for x in args.only if x not in cands]
    if missing:
        print(f"unknown candidates: {missing}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {x: [] for x in args.only}
    for _ in range(args.rounds):
        for label in args.only:
            row = measure(app, *cands[label], limit_s=args.limit_s, base_rss_kib=base_rss_kib)
            cpu = row.get("cpu_s")
            print(f"{row['seconds']:8.3f} s {'' if cpu is None else f'({cpu:.3f} s CPU) '}"
                  f"{row['rss_mib']:8.1f} MiB  {row['status']}  {row['route']}  {label}",
                  flush=True)
            runs[label].append(row)
    out = {label: {"median_s": statistics.median(r["seconds"] or args.limit_s for r in rs),
                   "median_cpu_s": statistics.median(r.get("cpu_s") or args.limit_s
                                                     for r in rs),
                   "median_rss_mib": statistics.median(r["rss_mib"] for r in rs), "runs": len(rs)}
           for label, rs in runs.items()}
    for label, m in out.items():
        print(f"{label}: median {m['median_s']:.3f} s ({m['median_cpu_s']:.3f} s CPU), "
              f"{m['median_rss_mib']:.0f} MiB ({m['runs']} runs)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
