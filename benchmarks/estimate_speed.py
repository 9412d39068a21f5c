"""Estimate speed (issue 2): planner µs per estimate, POST /v1/memory through uvicorn next to a
trivial route of the same server, and llm-analysis's ``training()`` on the same configuration.

Goals: at least 10x faster than llm-analysis per estimate; /v1/memory at >= 70% of the trivial
route's requests/s (the framework's own ceiling on this machine).

Cases (every cache is cleared where a case says "first"):
- first estimate of a setup: a setup (model, precision, optimizer, checkpointing, ...) never seen
  before is replayed op by op.
- second size of a setup: the compile of the setup's step template, which turns the replay into
  closed forms in the micro-batch size and the sequence length (planner/step/template.py), then
  its evaluation; once per setup.
- new size of a known setup: a micro-batch size and sequence length never asked before, on a setup
  whose template exists: the estimate a sweep or a capacity-planning script makes; the goal row.
- same request again.
- never-seen model of a known structure (benchmarks/never_seen.py): random models, each
  estimated once, on structures compiled with the model's dimensions symbolic
  (planner/step/structure.py), against the same models replayed and llm-analysis; the
  other rows run with structure templates off, as they measure the per-setup paths.
- ZeRO-3 on 8 ranks, 1F1B on 4 ranks: the same for a data-parallel layout (the FSDP2 rank's
  replay) and a pipelined one (every rank's replay), which compile into templates as well.
- fit: with ``hardware`` set, so the largest fitting micro-batch is searched as well.
- ``hardware.allocator: "replay"``: a new size whose answer replays the CUDA caching allocator
  (planner/step/allocator_replay.py: every block, three steps), the price of the exact reserve.
- known setups, interleaved (``--only-known`` runs these alone): each known-setup case above
  (new size, same request again, ZeRO-3 and 1F1B rank templates) measured as the goal row is,
  rounds of estimates alternating with rounds of llm-analysis on the same configuration (its
  data-parallel size, ZeRO stage and pipeline size), so both see the same machine load.
- HTTP: a uvicorn server (one process) serving ``create_app()``; clients keep connections open.
  The trivial route is GET /healthz; /v1/memory gets one configuration.
llm-analysis is optional (``pip install llm-analysis``); its column is left out when it is not
installed. Run: ``python -m benchmarks.estimate_speed``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import time

from planner.routes import memory as planner_memory
from planner.machine import cache
from planner.step import simulate as step_cache
from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest

GOAL_VS_LLM_ANALYSIS = 10.0
GOAL_HTTP_FRACTION = 0.70

MODELS = ["gpt2", "gpt2-xl", "llama-2-7b"]


def _req(preset: str, b: int, t: int, precision: str = "amp-bf16", ckpt: str = "none",
         hardware: dict | None = None, parallelism: dict | None = None,
         accumulation: int = 1) -> MemoryRequest:
    return MemoryRequest.model_validate({
        "model": {"preset": preset},
        "training": {"micro_batch_size": b, "sequence_length": t, "precision": precision,
                     "activation_checkpointing": {"strategy": ckpt},
                     "gradient_accumulation_steps": accumulation},
        **({"hardware": hardware} if hardware else {}),
        **({"parallelism": parallelism} if parallelism else {}),
    })


SETUPS = [(p, c) for p in ("amp-bf16", "fp32", "mixed-bf16", "bf16") for c in ("none", "full")]


def _sizes(preset: str, n: int, seed: int) -> list[tuple[int, int]]:
    """n distinct (micro-batch >= 2, sequence length) pairs; batch 1 and length 1 are template
    domains of their own (planner/step/template.py: domain_of)."""
    rng = random.Random(seed)
    t_max = resolve_model(_req(preset, 1, 8).model).max_sequence_length or 4096
    out: set[tuple[int, int]] = set()
    while len(out) < n:
        out.add((rng.randint(2, 64), rng.randint(16, min(t_max, 4096))))
    return sorted(out, key=lambda _: rng.random())


def _time_each(fn, items) -> list[float]:
    out = []
    for x in items:
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def planner_rows(n_cold: int, n_new: int, n_warm: int) -> list[tuple[str, str, float]]:
    est = planner_memory.estimate_memory
    rows = []
    for preset in MODELS:
        sizes = _sizes(preset, 2 * n_cold + n_new, 1)
        firsts = [_req(preset, b, t, *SETUPS[k % len(SETUPS)])
                  for k, (b, t) in enumerate(sizes[:n_cold])]

        def first(r: MemoryRequest) -> None:
            planner_memory.clear_caches()
            est(r)
        rows.append((preset, "first estimate of a setup (op-by-op replay)",
                     statistics.median(_time_each(first, firsts))))
        second = []
        for k, (b, t) in enumerate(sizes[n_cold:2 * n_cold]):
            planner_memory.clear_caches()
            est(firsts[k])
            r = _req(preset, b, t, *SETUPS[k % len(SETUPS)])
            t0 = time.perf_counter()
            est(r)
            second.append(time.perf_counter() - t0)
        rows.append((preset, "second size of a setup (template compile, once)",
                     statistics.median(second)))
        planner_memory.clear_caches()
        for p, c in SETUPS:  # every setup seen at two sizes: templates compiled
            est(_req(preset, 2, 16, p, c))
            est(_req(preset, 3, 16, p, c))
        news = [_req(preset, b, t, *SETUPS[k % len(SETUPS)])
                for k, (b, t) in enumerate(sizes[2 * n_cold:])]
        rows.append((preset, "new size of a known setup (template)",
                     statistics.median(_time_each(est, news))))
        rows.append((preset, "same request again",
                     statistics.median(_time_each(est, [news[0]] * n_warm))))
        zero3 = {"data_parallel": 8, "zero_stage": 3}
        planner_memory.clear_caches()
        first_z = _req(preset, 2, 16, parallelism=zero3)
        t0 = time.perf_counter()
        est(first_z)
        rows.append((preset, "ZeRO-3 on 8 ranks: first estimate (FSDP2 rank replayed)",
                     time.perf_counter() - t0))
        est(_req(preset, 3, 16, parallelism=zero3))
        zs = [_req(preset, b, t, parallelism=zero3) for b, t in sizes[2 * n_cold:]]
        rows.append((preset, "ZeRO-3 on 8 ranks: new size (rank template)",
                     statistics.median(_time_each(est, zs))))
        pipe = {"pipeline_parallel": 4, "pipeline_schedule": "1f1b"}
        planner_memory.clear_caches()
        t0 = time.perf_counter()
        est(_req(preset, 2, 16, parallelism=pipe, accumulation=8))
        rows.append((preset, "1F1B on 4 ranks, 8 micro-batches: first estimate (every rank "
                     "replayed)", time.perf_counter() - t0))
        est(_req(preset, 3, 16, parallelism=pipe, accumulation=8))
        ps = [_req(preset, b, t, parallelism=pipe, accumulation=8) for b, t in sizes[2 * n_cold:]]
        rows.append((preset, "1F1B on 4 ranks, 8 micro-batches: new size (rank templates)",
                     statistics.median(_time_each(est, ps))))
        fit = _req(preset, 1, 1024, hardware={"gpu": "h100-80gb"})

        def fit_first(r: MemoryRequest) -> None:
            planner_memory.clear_caches()
            est(r)
        rows.append((preset, "first estimate + largest micro-batch", statistics.median(
            _time_each(fit_first, [fit] * max(1, n_cold // 4)))))
        fits = [_req(preset, 2, t, hardware={"gpu": "h100-80gb"}) for _, t in sizes[:n_cold]]
        rows.append((preset, "largest micro-batch, known setup", statistics.median(
            _time_each(est, fits))))
        replays = [_req(preset, b, t, hardware={"allocator": "replay"})
                   for b, t in sizes[2 * n_cold:][:max(1, n_new // 4)]]
        rows.append((preset, "new size with hardware.allocator 'replay' (allocator replayed)",
                     statistics.median(_time_each(est, replays))))
    return rows


def fit_search_rows() -> list[tuple[str, int | None, float, int, float, int]]:
    """Largest fitting micro-batch on an H100 80GB, cold: the secant-guided probes against the
    exponential + binary search (same answer; time and simulations each)."""
    from planner.routes.checkpoint_blocks import checkpointed_blocks
    from planner.routes.memory import _max_micro_batch, _max_micro_batch_search

    rows = []
    for preset in MODELS:
        req = _req(preset, 1, 1024)
        model = resolve_model(req.model)
        blocks = checkpointed_blocks(req.training, model.num_layers)
        mem = 85899345920
        out = []
        for fn in (_max_micro_batch_search, _max_micro_batch):
            planner_memory.clear_caches()
            t0 = time.perf_counter()
            b = fn(req, model, "cuda", blocks, mem)
            out.append((b, time.perf_counter() - t0, len(cache._SIM_CACHE)))
        assert out[0][0] == out[1][0]
        rows.append((preset, out[0][0], out[0][1], out[0][2], out[1][1], out[1][2]))
    return rows


def llm_analysis_s(preset: str, n: int) -> float | None:
    one = llm_analysis_fn(preset)
    return None if one is None else statistics.median(_time_each(one, range(n)))


def llm_analysis_fn(preset: str):
    """llm-analysis's ``training()`` on the preset, as ``one(k)`` (None: not installed)."""
    return llm_analysis_model_fn(resolve_model(_req(preset, 1, 1024).model), preset)


def llm_analysis_model_fn(m, name: str = "model", parallelism: dict | None = None):
    """llm-analysis's ``training()`` on a resolved model, as ``one(k)`` (None: not installed);
    with its data-parallel size, pipeline size and DeepSpeed ZeRO stage where ``parallelism``
    sets them."""
    try:
        from llm_analysis.analysis import DSZeRO, LLMAnalysis
        from llm_analysis.config import (
            ModelConfig,
            ParallelismConfig,
            get_dtype_config_by_name,
            get_gpu_config_by_name,
        )
    except ImportError:
        return None
    logging.disable(logging.CRITICAL)
    mc = ModelConfig(name=name, num_layers=m.num_layers, n_head=m.num_heads,
                     hidden_dim=m.hidden_size, vocab_size=m.vocab_size,
                     max_seq_len=m.max_sequence_length,
                     # llm-analysis needs ffn a multiple of h (llama's 11008 is not): the nearest
                     # one; the time per call does not depend on it.
                     ffn_embed_dim=max(1, round(m.ffn_hidden_size / m.hidden_size)) * m.hidden_size,
                     num_key_value_heads=m.num_kv_heads or m.num_heads)
    # A100 80GB with room for any batch here (llm-analysis refuses a setup that does not fit).
    gpu = dataclasses.replace(get_gpu_config_by_name("a100-sxm-80gb"), mem_per_GPU_in_GB=100000)
    dtype = get_dtype_config_by_name("w16a16e16")
    par = ParallelismConfig(dp_size=parallelism.get("data_parallel", 1),
                            pp_size=parallelism.get("pipeline_parallel", 1)) if parallelism \
        else ParallelismConfig()
    zero = {"ds_zero": DSZeRO(parallelism["zero_stage"])} \
        if parallelism and "zero_stage" in parallelism else {}

    def one(k: int) -> None:
        a = LLMAnalysis(mc, gpu, dtype, par, flops_efficiency=0.5, hbm_memory_efficiency=0.9)
        a.training(batch_size_per_gpu=1 + k % 4, seq_len=(256, 512, 1024)[k % 3],
                   gradient_accumulation_steps=1, mlp_gated_linear_units=m.family != "gpt2",
                   **zero)
    one(0)
    return one


def interleaved_rows(rounds: int, per_round: int) -> list[tuple[str, float, float, float, float]]:
    """The goal row measured fairly on a shared machine: rounds alternate a batch of new-size
    estimates on known setups with a batch of llm-analysis calls, so both see the same load;
    (model, our median µs, llm-analysis median µs, median and lowest per-round speed-up)."""
    est = planner_memory.estimate_memory
    out = []
    for preset in MODELS:
        one = llm_analysis_fn(preset)
        if one is None:
            return []
        planner_memory.clear_caches()
        for p, c in SETUPS:
            est(_req(preset, 2, 16, p, c))
            est(_req(preset, 3, 16, p, c))
        sizes = _sizes(preset, rounds * per_round, 2)
        batches = [[_req(preset, b, t, *SETUPS[k % len(SETUPS)])
                    for k, (b, t) in enumerate(sizes[r * per_round:(r + 1) * per_round])]
                   for r in range(rounds)]
        out.append((preset, *_rounds(est, one, batches)))
    return out


def _rounds(est, one, batches: list[list]) -> tuple[float, float, float, float]:
    """Each batch of estimates timed, then as many llm-analysis calls: (our median µs,
    llm-analysis median µs, median and lowest per-round speed-up)."""
    ours, theirs, ratios = [], [], []
    for batch in batches:
        a = statistics.median(_time_each(est, batch))
        la = statistics.median(_time_each(one, range(len(batch))))
        ours.append(a)
        theirs.append(la)
        ratios.append(la / a)
    return (statistics.median(ours), statistics.median(theirs), statistics.median(ratios),
            min(ratios))


# The known-setup rows of the goal (>= 10x llm-analysis): (case, parallelism, micro-batches);
# llm-analysis gets the same data-parallel size, ZeRO stage and pipeline size.
KNOWN_CASES = [
    ("new size of a known setup (template)", None, 1),
    ("same request again", None, 1),
    ("ZeRO-3 on 8 ranks: new size (rank template)", {"data_parallel": 8, "zero_stage": 3}, 1),
    ("1F1B on 4 ranks, 8 micro-batches: new size (rank templates)",
     {"pipeline_parallel": 4, "pipeline_schedule": "1f1b"}, 8),
]


def known_rows(rounds: int, per_round: int) -> list[tuple[str, str, float, float, float, float]]:
    """Every known-setup row measured as the goal row is: rounds alternate a batch of estimates
    with a batch of llm-analysis calls on the same configuration; (model, case, our median µs,
    llm-analysis median µs, median and lowest per-round speed-up)."""
    est = planner_memory.estimate_memory
    out = []
    for preset in MODELS:
        model = resolve_model(_req(preset, 1, 1024).model)
        for case, par, m in KNOWN_CASES:
            llm_par = None if par is None else {
                k: v for k, v in par.items() if k in ("data_parallel", "pipeline_parallel",
                                                      "zero_stage")}
            one = llm_analysis_model_fn(model, preset, llm_par)
            if one is None:
                return []
            setups = SETUPS if par is None else SETUPS[:1]
            planner_memory.clear_caches()
            for p, c in setups:  # every setup seen at two sizes: templates compiled
                est(_req(preset, 2, 16, p, c, parallelism=par, accumulation=m))
                est(_req(preset, 3, 16, p, c, parallelism=par, accumulation=m))
            sizes = _sizes(preset, rounds * per_round, 3)
            batches = []
            for r in range(rounds):
                if case == "same request again":
                    batch = [_req(preset, *sizes[0], *setups[0], parallelism=par,
                                  accumulation=m)] * per_round
                else:
                    batch = [_req(preset, b, t, *setups[k % len(setups)], parallelism=par,
                                  accumulation=m)
                             for k, (b, t) in enumerate(sizes[r * per_round:(r + 1) * per_round])]
                batches.append(batch)
            out.append((preset, case, *_rounds(est, one, batches)))
    return out


def print_known(rows, rounds: int, per_round: int) -> None:
    print(f"## Known setups, interleaved ({rounds} rounds of {per_round} estimates, each followed "
          f"by {per_round} llm-analysis calls on the same configuration)\n")
    print("| model | case | µs/estimate | llm-analysis µs | speed-up, median of rounds (goal "
          f"≥ {GOAL_VS_LLM_ANALYSIS:.0f}×) | lowest round |")
    print("|---|---|---:|---:|---:|---:|")
    for preset, case, a, la, med, lo in rows:
        print(f"| {preset} | {case} | {a * 1e6:.1f} | {la * 1e6:.0f} | {med:.2f}× | {lo:.2f}× |")
    print()


# ---- HTTP ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _load(url: str, method: str, body: bytes | None, seconds: float, conns: int) -> float:
    import httpx

    done = 0
    stop = time.perf_counter() + seconds
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as client:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                r = await client.request(method, url, content=body, headers=headers)
                r.raise_for_status()
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        return done / (time.perf_counter() - t0)


def http_rows(seconds: float, conns: int) -> list[tuple[str, float]]:
    import httpx

    port = _free_port()
    env = dict(os.environ, MEMPLAN_DATABASE_URL=os.environ.get(
        "MEMPLAN_DATABASE_URL", "sqlite:////tmp/memplan-bench-estimate.db"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(base + "/healthz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = _req("gpt2", 4, 1024).model_dump_json(exclude_none=True).encode()
        httpx.post(base + "/v1/memory", content=body,
                   headers={"content-type": "application/json"}).raise_for_status()
        trivial = asyncio.run(_load(base + "/healthz", "GET", None, seconds, conns))
        memory = asyncio.run(_load(base + "/v1/memory", "POST", body, seconds, conns))
    finally:
        proc.terminate()
        proc.wait(10)
    return [("GET /healthz (trivial)", trivial), ("POST /v1/memory (gpt2, same request)", memory)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", type=int, default=12, help="first estimates per model")
    ap.add_argument("--new", type=int, default=400, help="new sizes of known setups per model")
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per model")
    ap.add_argument("--seconds", type=float, default=5.0, help="per HTTP measurement")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--never-seen", type=int, default=50, help="never-seen models")
    ap.add_argument("--only-never-seen", action="store_true")
    ap.add_argument("--only-known", action="store_true",
                    help="only the known-setup rows, interleaved with llm-analysis")
    args = ap.parse_args()

    from benchmarks.never_seen import never_seen_rows, print_never_seen

    if args.only_never_seen:
        print_never_seen(never_seen_rows(args.never_seen, 5))
        return
    if args.only_known:
        with step_cache.structure_mode("off"):
            known = known_rows(args.rounds, 40)
        if known:
            print_known(known, args.rounds, 40)
        return
    with step_cache.structure_mode("off"):  # the rows below measure the per-setup paths
        rows = planner_rows(args.cold, args.new, args.warm)
    llm = {p: llm_analysis_s(p, 200) for p in MODELS}
    print("## planner.routes.memory.estimate_memory, median per estimate\n")
    print("| model | case | µs/estimate | llm-analysis µs | speed-up vs llm-analysis (goal "
          f"≥ {GOAL_VS_LLM_ANALYSIS:.0f}×) |")
    print("|---|---|---:|---:|---:|")
    for preset, case, s in rows:
        la = llm[preset]
        ratio = f"{la / s:.2f}×" if la else "n/a (not installed)"
        la_s = f"{la * 1e6:.0f}" if la else "n/a"
        print(f"| {preset} | {case} | {s * 1e6:,.0f} | {la_s} | {ratio} |")
    print()
    print_never_seen(never_seen_rows(args.never_seen, 5))
    with step_cache.structure_mode("off"):
        inter = interleaved_rows(args.rounds, 40)
    if inter:
        print(f"## Goal row, interleaved ({args.rounds} rounds of 40 new-size estimates on known "
              "setups, each followed by 40 llm-analysis calls)\n")
        print("| model | µs/estimate | llm-analysis µs | speed-up, median of rounds | lowest round |")
        print("|---|---:|---:|---:|---:|")
        for preset, a, la, med, lo in inter:
            print(f"| {preset} | {a * 1e6:.1f} | {la * 1e6:.0f} | {med:.2f}× | {lo:.2f}× |")
        print()
    with step_cache.structure_mode("off"):
        known = known_rows(args.rounds, 40)
    if known:
        print_known(known, args.rounds, 40)
    print("## Largest fitting micro-batch (H100 80GB, amp-bf16, T=1024), cold\n")
    print("| model | micro-batch | search ms | search simulations | secant ms | secant simulations "
          "| speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset, b, ts, ns, tn, nn in fit_search_rows():
        print(f"| {preset} | {b} | {ts * 1e3:,.0f} | {ns} | {tn * 1e3:,.0f} | {nn} | {ts / tn:.2f}× |")
    print()
    print(f"## HTTP through uvicorn (1 process, {args.connections} keep-alive connections, "
          f"{args.seconds:.0f} s each)\n")
    hr = http_rows(args.seconds, args.connections)
    print(f"| route | requests/s | fraction of trivial (goal ≥ {GOAL_HTTP_FRACTION:.0%}) |")
    print("|---|---:|---:|")
    for name, rps in hr:
        print(f"| {name} | {rps:,.0f} | {rps / hr[0][1]:.0%} |")


if __name__ == "__main__":
    main()
