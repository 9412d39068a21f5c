"""Estimate speed of a model never seen before, on a structure whose template is compiled
(planner/step/structure.py): the row "never-seen model of a known structure" of
``benchmarks/estimate_speed.py``, next to the same models replayed and llm-analysis's
``training()``. Run alone: ``python -m benchmarks.never_seen``; ``--section pipelined`` runs
only the pipelined section (random gpt2/llama models on 2, 4 or 8 pipeline stages, 1F1B and
interleaved 1F1B, random micro-batch counts), ``--section schedules`` one layout of every
schedule (GPipe, 1F1B, interleaved, ZB-H1, ZB-H2, ZB-V, DualPipeV), ``--section long`` every
schedule at 64 ranks and hundreds to thousands of micro-batches (taped ranks), ``--section
single``/``data-parallel`` the others.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

from benchmarks.estimate_speed import SETUPS, _time_each, llm_analysis_model_fn
from planner.layouts import pipeline_actions, pipeline_structure, pipeline_structures
from planner.layouts.pipeline_machines import _Recording
from planner.layouts.pipeline_schedules import schedule_of
from planner.routes import memory as planner_memory
from planner.routes import memory_answers
from planner.machine import cache, collector
from planner.step import simulate as step_cache
from planner.step import structures as structures_mod
from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest

STRUCTURE_LAYERS = {"gpt2": 12, "llama": 32}
GOAL_COMPILE_MS = 50  # the goal: no per-setup compile step above it


@contextlib.contextmanager
def _timing(module, name: str, into: list[float]):
    """Inside, each call of ``module.name`` appends its wall time (s) to ``into``."""
    real = getattr(module, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            into.append(time.perf_counter() - t0)
    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def _recorded(into: list):
    """Inside, each pipeline action replayed op by op with symbolic sizes (an ``ActionMemo``
    record on the recording machine: what a layout's first compiles spend most of their time
    on) appends 1 to ``into``: a count free of the machine's noise."""
    real = pipeline_actions.ActionMemo._record

    def counted(self, prog, *a, **kw):
        if isinstance(prog.m, _Recording):
            into.append(1)
        return real(self, prog, *a, **kw)
    pipeline_actions.ActionMemo._record = counted
    try:
        yield
    finally:
        pipeline_actions.ActionMemo._record = real


def _random_arch(family: str, rng: random.Random, gqa: bool = False) -> dict:
    """A random model of the family (every dimension >= 2 but the query heads per key/value
    head, 1 unless ``gqa``; llama's head dimension even: one domain of a structure,
    planner/step/structure.py)."""
    nkv = rng.choice([2, 4, 8, 12, 16, 32])
    g = rng.choice([2, 4, 8]) if gqa else 1
    hd = rng.choice([32, 64, 80, 96, 128])
    h = nkv * g * hd
    return {"family": family, "num_layers": STRUCTURE_LAYERS[family], "hidden_size": h,
            "num_heads": nkv * g, **({"num_kv_heads": nkv} if family == "llama" else {}),
            "ffn_hidden_size": rng.randint(2 * h, 4 * h),
            "vocab_size": rng.randint(1000, 128000), "max_sequence_length": 8192}


def _arch_req(arch: dict, b: int, t: int, precision: str, ckpt: str,
              parallelism: dict | None = None) -> MemoryRequest:
    return MemoryRequest.model_validate({"model": arch, "training": {
        "micro_batch_size": b, "sequence_length": t, "precision": precision,
        "activation_checkpointing": {"strategy": ckpt}}, "parallelism": parallelism or {}})


def never_seen_rows(n: int, rounds: int, seed: int = 5, parallelism: dict | None = None,
                    setups=SETUPS) -> dict:
    """``n`` random gpt2/llama models (llama with and without grouped-query attention: two
    domains) over the SETUPS structures, each estimated once at a micro-batch of at least 2 (a
    batch of one is a domain of its own), in ``rounds`` rounds; each round times its models (a)
    replayed, as before structure templates ("off"), (b) from the structure's template, and (c)
    llm-analysis's ``training()`` on the same models, so all three see the same load. Before
    the rounds every structure is compiled once (a warm-up estimate in "sync" mode: compile +
    evaluation), timed. ``parallelism``: every model on data-parallel ranks (DDP, FSDP2), its
    rank's structure template (planner/step/rank_structure.py) against llm-analysis with the
    same data-parallel size and ZeRO stage."""
    est = planner_memory.estimate_memory
    rng = random.Random(seed)
    structures = [(f, gqa, p, c) for f, gqa in (("gpt2", False), ("llama", False),
                                                ("llama", True)) for p, c in setups]
    planner_memory.clear_caches()
    compile_s, each_s = [], []  # warm-up estimates; each structure compile in them
    with _timing(structures_mod, "_compile_structure", each_s), \
            step_cache.structure_mode("sync"):
        for f, gqa, p, c in structures:
            for k in range(3):  # the first compiles; variants a note compares with, too
                r = _arch_req(_random_arch(f, rng, gqa), 4, 1024, p, c, parallelism)
                t0 = time.perf_counter()
                est(r)
                if k == 0:
                    compile_s.append(time.perf_counter() - t0)
    cases = []
    for k in range(n):
        f, gqa, p, c = structures[k % len(structures)]
        cases.append(_arch_req(_random_arch(f, rng, gqa), rng.randint(2, 16),
                               rng.choice([512, 1024, 2048, 4096]), p, c, parallelism))
    rng.shuffle(cases)
    per = -(-n // rounds)
    replayed, templated, theirs = [], [], []
    for r in range(rounds):
        batch = cases[r * per:(r + 1) * per]
        if not batch:
            break
        with step_cache.structure_mode("off"):
            a = []
            for q in batch:
                cache._SIM_CACHE.clear()
                cache._SEEN.clear()
                cache._MEMO.clear()  # per-setup results (a rank's model states): never seen
                t0 = time.perf_counter()
                est(q)
                a.append(time.perf_counter() - t0)
        replayed.append(statistics.median(a))
        cache._SIM_CACHE.clear()
        cache._SEEN.clear()
        cache._MEMO.clear()
        templated.append(statistics.median(_time_each(est, batch)))
        fns = [llm_analysis_model_fn(resolve_model(q.model), parallelism=parallelism)
               for q in batch]
        if fns[0] is not None:
            theirs.append(statistics.median(_time_each(lambda fn: fn(1), fns)))
    layout = "one device" if not parallelism else (
        f"{'DDP' if parallelism['zero_stage'] == 0 else 'FSDP2 ZeRO-' + str(parallelism['zero_stage'])}"
        f" on {parallelism['data_parallel']} ranks")
    return {"layout": layout, "compile_median": statistics.median(compile_s), "compile_max": max(compile_s),
            "each": len(each_s), "each_median": statistics.median(each_s), "each_max": max(each_s),
            "structures": len(structures), "n": n, "rounds": len(templated),
            "replayed": statistics.median(replayed), "templated": statistics.median(templated),
            "llm": statistics.median(theirs) if theirs else None,
            "ratios": [la / a for la, a in zip(theirs, templated)]}


def print_never_seen(res: dict) -> None:
    print(f"## Never-seen model of a known structure, {res['layout']} ({res['n']} random "
          f"gpt2/llama models over "
          f"{res['structures']} structures, each estimated once; {res['rounds']} interleaved "
          "rounds, median of rounds)\n")
    print("| case | µs/estimate | llm-analysis µs | speed-up vs llm-analysis |")
    print("|---|---:|---:|---:|")
    la = res["llm"]
    for name, s in (("replayed (no structure template)", res["replayed"]),
                    ("from the structure's template", res["templated"])):
        ratio = f"{la / s:.2f}×" if la else "n/a (not installed)"
        print(f"| {name} | {s * 1e6:,.0f} | {la * 1e6:.0f} | {ratio} |" if la else
              f"| {name} | {s * 1e6:,.0f} | n/a | {ratio} |")
    if res["ratios"]:
        print(f"\nLowest round: {min(res['ratios']):.2f}×. ", end="")
    print(f"Structure compiles ({res['each']}, each timed, goal ≤ {GOAL_COMPILE_MS} ms): median "
          f"{res['each_median'] * 1e3:,.0f} ms, max {res['each_max'] * 1e3:,.0f} ms. A "
          "structure's first estimate (warm-up in sync mode: its compile, the compile of the "
          "fused-optimizer variant its note reads where the peak is in the optimizer step, "
          f"the evaluation): median {res['compile_median'] * 1e3:,.0f} ms, max "
          f"{res['compile_max'] * 1e3:,.0f} ms.\n")


# The data-parallel rows: three of the SETUPS structures per family (compiles are per rank's
# structure, each a few times a single device's).
DP_SETUPS = [("amp-bf16", "none"), ("mixed-bf16", "full"), ("bf16", "none")]

# The pipelined rows: (pipeline stages, schedule, virtual stages per rank); every model has
# PIPELINE_LAYERS layers (room for 8 ranks x 2 virtual stages).
PIPELINE_LAYOUTS = [(pp, s, v) for pp in (2, 4, 8)
                    for s, v in (("1f1b", 1), ("interleaved-1f1b", 2))]
PIPELINE_LAYERS = 32
PIPELINE_SETUPS = [("amp-bf16", "none")]


def _pipelined_req(arch: dict, b: int, t: int, pp: int, schedule: str, v: int,
                   m: int) -> MemoryRequest:
    req = _arch_req({**arch, "num_layers": PIPELINE_LAYERS}, b, t, *PIPELINE_SETUPS[0],
                    {"pipeline_parallel": pp, "pipeline_schedule": schedule,
                     "virtual_pipeline_stages": v})
    tr = req.training.model_copy(update={"gradient_accumulation_steps": m})
    return req.model_copy(update={"training": tr})


def _clear_setup_caches(lists=None) -> None:
    """The per-setup caches (what a never-seen model has not met): replays, sizes seen,
    per-setup results, answers kept, and, for ``lists`` (a request), the ranks' shortened lists and its
    layout's searched count of its micro-batch count (a new micro-batch count: its lists are
    derived from other counts of the layout, or searched)."""
    cache._SIM_CACHE.clear()
    cache._SEEN.clear()
    cache._MEMO.clear()
    memory_answers.clear()  # answers kept for a request seen before
    if lists is not None:
        pipeline_structure._LISTS.clear()
        p = lists.parallelism
        pipeline_structure.forget_microbatches(lists.training.gradient_accumulation_steps,
                                               p.pipeline_schedule, p.pipeline_parallel)


def pipelined_rows(n: int, rounds: int, seed: int = 7) -> dict:
    """``n`` random gpt2/llama models (llama with and without grouped-query attention) on the
    PIPELINE_LAYOUTS, each with a random micro-batch count m (a multiple of the stages, 1 to 8
    rounds) and a random micro-batch (>= 2) and sequence length, each estimated once. Before the
    rounds each layout's first estimate (a new model; it compiles its ranks' structures, sync
    mode) is timed, and a second new model on it; then every case's structures are compiled (a
    sibling model with the case's layout and m; each rank structure's compile timed). Then
    ``rounds`` rounds each time their batch of never-seen models (a) with every rank replayed
    (structures off, as before pipeline structure templates), (b) from the structures'
    templates, both with per-setup caches cleared (and the ranks' shortened lists and the
    layout's searched lists of the case's count: a new micro-batch count, its lists derived
    from other counts of the layout or searched), (b') the same with the shortened lists known, and (c) llm-analysis's ``training()`` with
    the same pipeline size on the same models, so all three see the same load."""
    est = planner_memory.estimate_memory
    rng = random.Random(seed)
    kinds = [("gpt2", False), ("llama", False), ("llama", True)]
    planner_memory.clear_caches()
    first_s, second_s, compile_s = [], [], []
    with step_cache.structure_mode("sync"):
        for pp, sched, v in PIPELINE_LAYOUTS:
            for f, gqa in kinds:
                times = []
                for _ in range(2):
                    r = _pipelined_req(_random_arch(f, rng, gqa), 4, 1024, pp, sched, v,
                                       pp * rng.randint(1, 8))
                    t0 = time.perf_counter()
                    res = est(r, explain=False)
                    times.append(time.perf_counter() - t0)
                    assert "(rank " in res.peak_phase, res.peak_phase  # every rank answered
                first_s.append(times[0])
                second_s.append(times[1])
    cases = []
    for k in range(n):
        pp, sched, v = PIPELINE_LAYOUTS[k % len(PIPELINE_LAYOUTS)]
        f, gqa = kinds[k % len(kinds)]
        m = pp * rng.randint(1, 8)
        case = _pipelined_req(_random_arch(f, rng, gqa), rng.randint(2, 16),
                              rng.choice([512, 1024, 2048, 4096]), pp, sched, v, m)
        sibling = _pipelined_req(_random_arch(f, rng, gqa), 4, 1024, pp, sched, v, m)
        cases.append((case, sibling))
    with _timing(pipeline_structures, "_compile", compile_s), step_cache.structure_mode("sync"):
        for _, sibling in cases:
            est(sibling, explain=False)
    cases = [c for c, _ in cases]
    rng.shuffle(cases)
    per = -(-n // rounds)
    ours, templ, known, theirs, worst, fallbacks = [], [], [], [], 0.0, 0
    n_searched = n_derived = n_whole = 0
    by_layout: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in range(rounds):
        batch = cases[r * per:(r + 1) * per]
        if not batch:
            break
        a, b, c = [], [], []
        for q in batch:
            _clear_setup_caches(q)
            with step_cache.structure_mode("off"):
                t0 = time.perf_counter()
                est(q, explain=False)
                a.append(time.perf_counter() - t0)
            _clear_setup_caches(q)
            replays = cache.COUNTS["replays"]
            searched = pipeline_structure.COUNTS["searched"]
            derived = pipeline_structure.COUNTS["derived"]
            whole = pipeline_structure.COUNTS["whole"]
            with step_cache.structure_mode("sync"):
                t0 = time.perf_counter()
                est(q, explain=False)
                b.append(time.perf_counter() - t0)
            fallbacks += cache.COUNTS["replays"] != replays
            n_searched += pipeline_structure.COUNTS["searched"] - searched
            n_whole += pipeline_structure.COUNTS["whole"] - whole
            got = pipeline_structure.COUNTS["derived"] - derived
            n_derived += got
            _clear_setup_caches(q)
            with step_cache.structure_mode("sync"):
                est(q, explain=False)  # the layout's shortened lists known now
                _clear_setup_caches()
                t0 = time.perf_counter()
                est(q, explain=False)
                c.append(time.perf_counter() - t0)
            p = q.parallelism
            by_layout.setdefault((p.pipeline_parallel, p.pipeline_schedule), []).append(
                (q.training.gradient_accumulation_steps, a[-1], b[-1], got))
        worst = max(worst, max(a))
        ours.append(statistics.median(a))
        templ.append(statistics.median(b))
        known.append(statistics.median(c))
        fns = [llm_analysis_model_fn(resolve_model(q.model), parallelism={
            "pipeline_parallel": q.parallelism.pipeline_parallel}) for q in batch]
        if fns[0] is not None:
            theirs.append(statistics.median(_time_each(lambda fn: fn(1), fns)))
    return {"n": n, "rounds": len(ours), "layouts": len(PIPELINE_LAYOUTS) * len(kinds),
            "first_median": statistics.median(first_s), "first_max": max(first_s),
            "second_median": statistics.median(second_s), "second_max": max(second_s),
            "compiles": len(compile_s), "compile_median": statistics.median(compile_s),
            "compile_max": max(compile_s), "fallbacks": fallbacks,
            "searched": n_searched, "derived": n_derived, "whole": n_whole,
            "ours": statistics.median(ours), "templ": statistics.median(templ),
            "known": statistics.median(known), "worst": worst,
            "llm": statistics.median(theirs) if theirs else None,
            "ratios": [a / la for a, la in zip(templ, theirs)],
            "by_layout": dict(sorted(by_layout.items()))}


def print_pipelined(res: dict) -> None:
    print(f"## Never-seen model, pipelined: pp 2/4/8, 1F1B and interleaved 1F1B (2 virtual "
          f"stages), random micro-batch counts ({res['n']} random gpt2/llama models of "
          f"{PIPELINE_LAYERS} layers, each estimated once; {res['rounds']} interleaved rounds, "
          "median of rounds)\n")
    print("| case | µs/estimate | llm-analysis µs | vs llm-analysis |")
    print("|---|---:|---:|---:|")
    la = res["llm"]
    for name, s in (("every rank replayed (no structure template), per-setup caches cleared",
                     res["ours"]),
                    ("from the structures' templates, per-setup caches and shortened lists "
                     "cleared (a new model and micro-batch count)", res["templ"]),
                    ("from the structures' templates, the layout's shortened lists known (a new "
                     "model on a layout and micro-batch count seen before)", res["known"])):
        if la:
            print(f"| {name} | {s * 1e6:,.0f} | {la * 1e6:.0f} | {s / la:,.1f}× its time |")
        else:
            print(f"| {name} | {s * 1e6:,.0f} | n/a | n/a |")
    if res["ratios"]:
        print(f"\nRounds' template time vs llm-analysis: {min(res['ratios']):,.1f}× to "
              f"{max(res['ratios']):,.1f}× its time. ", end="")
    print(f"New micro-batch counts' rank lists: {res['derived']} derived from other counts of "
          f"the layout, {res['whole']} whole (virtual stages below nine rounds), "
          f"{res['searched']} searched. ", end="")
    print(f"Estimates that replayed a rank despite the templates: {res['fallbacks']} of "
          f"{res['n']}. Slowest replayed estimate: {res['worst'] * 1e3:,.0f} ms. First "
          f"estimate on each of the {res['layouts']} layouts (a new model, caches cold, its "
          f"ranks' structures compiled in the request): median {res['first_median'] * 1e3:,.0f}"
          f" ms, max {res['first_max'] * 1e3:,.0f} ms; a second new model on it (another "
          f"micro-batch count): median {res['second_median'] * 1e3:,.1f} ms, max "
          f"{res['second_max'] * 1e3:,.1f} ms. Rank structure compiles for the timed cases: "
          f"{res['compiles']}, median {res['compile_median'] * 1e3:,.0f} ms, max "
          f"{res['compile_max'] * 1e3:,.0f} ms.\n")
    print("| layout | estimates | micro-batch counts | ranks' lists derived | replayed median ms "
          "| template median µs | template max µs |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for (pp, sched), xs in res["by_layout"].items():
        ms = sorted(x[0] for x in xs)
        print(f"| pp {pp} {sched} | {len(xs)} | {', '.join(map(str, ms))} | "
              f"{sum(x[3] for x in xs)} of {pp * len(xs)} | "
              f"{statistics.median(x[1] for x in xs) * 1e3:,.0f} | "
              f"{statistics.median(x[2] for x in xs) * 1e6:,.0f} | "
              f"{max(x[2] for x in xs) * 1e6:,.0f} |")
    print()


# The lists-only rows: deep pipelines at counts past the steady state's threshold (the ranks'
# structures are not compiled: each would take seconds per rank).
LIST_LAYOUTS = [(pp, s, v) for pp in (8, 16, 32, 64)
                for s, v in (("1f1b", 1), ("interleaved-1f1b", 2))]


class _Blocks:  # the lists read the block count only
    num_layers = 128


def lists_rows(rounds: int = 5, seed: int = 3) -> list[tuple]:
    """Per LIST_LAYOUTS layout: every rank's shortened lists for a new micro-batch count m
    (8 to 16 rounds of pp micro-batches), derived from two other counts of the layout searched
    before (m - 2 pp and m - pp; the plain search where they are not alike), against the plain
    search of m; ``rounds`` new counts, median. (layout, m's, derived ms, searched ms, ranks
    derived of ranks)."""
    rng = random.Random(seed)
    out = []
    for pp, sched, v in LIST_LAYOUTS:
        ms = [pp * rng.randint(8, 16) for _ in range(rounds)]
        der, plain, got = [], [], 0
        for m in ms:
            plans = {c: schedule_of(sched, pp, c, v) for c in (m - 2 * pp, m - pp, m)}
            pipeline_structure._KNOWN.clear()
            pipeline_structure._LISTS.clear()
            for c in (m - 2 * pp, m - pp):
                for r in range(pp):
                    pipeline_structure.rank_lists(plans[c], r, _Blocks)
            before = pipeline_structure.COUNTS["derived"]
            t0 = time.perf_counter()
            for r in range(pp):
                pipeline_structure.rank_lists(plans[m], r, _Blocks)
            der.append(time.perf_counter() - t0)
            got += pipeline_structure.COUNTS["derived"] - before
            pipeline_structure._KNOWN.clear()
            pipeline_structure._LISTS.clear()
            t0 = time.perf_counter()
            for r in range(pp):
                pipeline_structure.rank_lists(plans[m], r, _Blocks)
            plain.append(time.perf_counter() - t0)
        out.append(((pp, sched), ms, statistics.median(der), statistics.median(plain), got,
                    pp * len(ms)))
    pipeline_structure._KNOWN.clear()
    pipeline_structure._LISTS.clear()
    return out


def print_lists(rows: list[tuple]) -> None:
    print("## A new micro-batch count's rank lists, deep pipelines (every rank; derived from "
          "two counts of the layout searched before, vs the plain search; median of 5 counts)\n")
    print("| layout | micro-batch counts | derived ms | searched ms | ranks derived |")
    print("|---|---|---:|---:|---:|")
    for (pp, sched), ms, d, p, got, of in rows:
        print(f"| pp {pp} {sched} | {', '.join(map(str, sorted(ms)))} | {d * 1e3:,.2f} | "
              f"{p * 1e3:,.2f} | {got} of {of} |")
    print()


# Every schedule the estimate replays, with the stages per rank each takes; one layout each at
# ``SCHEDULE_PP`` stages (the goal's "any schedule"; the pipelined section above varies pp and m)
SCHEDULE_LAYOUTS = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1),
                    ("zb-h2", 1), ("zb-v", 2), ("dualpipe-v", 2)]
SCHEDULE_PP = 8
SCHEDULE_LAYERS = 64


def schedules_rows(n: int = 6, seed: int = 11) -> list[tuple]:
    """Per SCHEDULE_LAYOUTS schedule (pp ``SCHEDULE_PP``, ``SCHEDULE_LAYERS`` blocks, a random
    count of 2 to 8 rounds of micro-batches): ``_layout_rows``."""
    rng = random.Random(seed)
    return _layout_rows([(sched, v, lambda: SCHEDULE_PP * rng.randint(2, 8))
                         for sched, v in SCHEDULE_LAYOUTS], SCHEDULE_PP, SCHEDULE_LAYERS, n, rng)


def _layout_rows(layouts, pp: int, layers: int, n: int, rng) -> list[tuple]:
    """Per (schedule, virtual stages, ``() -> m``) layout of ``pp`` stages and ``layers``
    blocks: the first estimate of a new model with caches cold, in sync mode (the layout's
    templates compiled in the request: each rank structure's compile timed, and each rank of
    a taped template's), then ``n`` new models of the layout (per-setup caches cleared: each an
    evaluation of the templates) timed against llm-analysis's ``training()`` on the same
    models, interleaved. (schedule, m, first s, compiles, compile median s, compile max s,
    never-seen median s, llm-analysis median s, estimates that replayed a rank, ranks
    answered from a taped template per estimate, actions the first estimate recorded with
    symbolic sizes: ``_recorded``)."""
    from planner.layouts import pipeline_tape_templates
    est = planner_memory.estimate_memory
    out = []
    for sched, v, m_of in layouts:
        planner_memory.clear_caches()
        m = m_of()

        def req(arch, b, t):
            r = _pipelined_req({**arch, "num_layers": layers}, b, t, pp, sched, v, m)
            return r.model_copy(update={"model": r.model.model_copy(
                update={"num_layers": layers})})
        compile_s: list[float] = []
        recorded: list[int] = []
        spent = pipeline_tape_templates.COUNTS["rank_seconds"]
        before = len(spent)
        with _timing(pipeline_structures, "_compile", compile_s), _recorded(recorded), \
                step_cache.structure_mode("sync"):
            t0 = time.perf_counter()
            est(req(_random_arch("llama", rng), 4, 1024), explain=False)
            first = time.perf_counter() - t0
        compile_s += spent[before:]
        ours, theirs, replayed, taped = [], [], 0, []
        for _ in range(n):
            q = req(_random_arch("llama", rng), rng.randint(2, 16), rng.choice([512, 2048]))
            _clear_setup_caches()
            was = (cache.COUNTS["replays"], pipeline_tape_templates.COUNTS["evaluated"])
            with step_cache.structure_mode("sync"):
                t0 = time.perf_counter()
                est(q, explain=False)
                ours.append(time.perf_counter() - t0)
            replayed += cache.COUNTS["replays"] != was[0]
            taped.append(pipeline_tape_templates.COUNTS["evaluated"] - was[1])
            fn = llm_analysis_model_fn(resolve_model(q.model), parallelism={"pipeline_parallel": pp})
            if fn is not None:
                theirs.append(statistics.median(_time_each(lambda f: f(1), [fn] * 5)))
        out.append((sched, m, first, len(compile_s),
                    statistics.median(compile_s) if compile_s else 0.0,
                    max(compile_s, default=0.0), statistics.median(ours),
                    statistics.median(theirs) if theirs else None, replayed,
                    statistics.median(taped), len(recorded)))
    return out


def print_schedules(rows: list[tuple]) -> None:
    _print_layouts(f"## Never-seen model, every schedule: pp {SCHEDULE_PP}, {SCHEDULE_LAYERS} "
                   "blocks (llama), a random micro-batch count per schedule; the layout's first "
                   "estimate compiles its ranks' structures in the request, then new models of "
                   "it are timed against llm-analysis (median of 6)", rows, "replayed", 8)


def _print_layouts(title: str, rows: list[tuple], last: str, at: int) -> None:
    """``_layout_rows``' table, its last column ``last`` the rows' field ``at``."""
    print(title + "\n")
    print("| schedule | m | first estimate ms | rank compiles | actions recorded | compile "
          "median ms | compile max ms | never-seen µs | llm-analysis µs | vs llm-analysis | "
          f"{last} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        sched, m, first, nc, cmed, cmax, ours, la = row[:8]
        ratio = f"{ours / la:,.1f}× its time" if la else "n/a"
        las = f"{la * 1e6:,.0f}" if la else "n/a"
        print(f"| {sched} | {m} | {first * 1e3:,.0f} | {nc} | {row[10]} | {cmed * 1e3:,.0f} | "
              f"{cmax * 1e3:,.0f} | {ours * 1e6:,.0f} | {las} | {ratio} | {row[at]:g} |")
    print("(actions recorded: the layout's actions its first estimate replayed op by op with the "
          "sizes symbolic, counted)\n")


# Long pipelines (the goal's "pp <= 64, any schedule, any m"): every schedule at 64 ranks, a
# micro-batch count of hundreds to thousands (ranks of 512 to 32,768 actions: taped,
# planner/layouts/pipeline_tape.py; GPipe and 1F1B at 64 ranks from their rank structures)
LONG_LAYOUTS = [("gpipe", 1, 1024), ("1f1b", 1, 4096), ("interleaved-1f1b", 4, 4096),
                ("zb-h1", 1, 4096), ("zb-h2", 1, 2048), ("zb-v", 2, 1024),
                ("dualpipe-v", 2, 512)]
LONG_PP = 64
LONG_LAYERS = 512


def long_rows(n: int = 6, seed: int = 13) -> list[tuple]:
    """Per LONG_LAYOUTS layout (``LONG_PP`` ranks, ``LONG_LAYERS`` blocks): ``_layout_rows``."""
    return _layout_rows([(sched, v, lambda m=m: m) for sched, v, m in LONG_LAYOUTS], LONG_PP,
                        LONG_LAYERS, n, random.Random(seed))


def print_long(rows: list[tuple]) -> None:
    _print_layouts(f"## Never-seen model, long pipelines: pp {LONG_PP}, {LONG_LAYERS} blocks "
                   "(llama), every schedule; the layout's first estimate compiles its templates "
                   "in the request (sync mode), then new models of it are timed against "
                   "llm-analysis (median of 6)", rows, "ranks from a taped template", 9)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", choices=["all", "single", "data-parallel", "pipelined",
                                          "pipelined-lists", "schedules", "long"],
                    default="all")
    args = ap.parse_args(argv)
    collector.tune()  # as `memplan serve` does once the app is built (planner/machine/collector.py)
    if args.section in ("all", "single"):
        print_never_seen(never_seen_rows(50, 5))
    if args.section in ("all", "data-parallel"):
        for par in ({"data_parallel": 8, "zero_stage": 0}, {"data_parallel": 8, "zero_stage": 3}):
            print_never_seen(never_seen_rows(45, 5, parallelism=par, setups=DP_SETUPS))
    if args.section in ("all", "pipelined"):
        print_pipelined(pipelined_rows(36, 4))
    if args.section in ("all", "schedules"):
        print_schedules(schedules_rows())
    if args.section in ("all", "pipelined-lists"):
        print_lists(lists_rows())
    if args.section in ("all", "long"):
        print_long(long_rows())


if __name__ == "__main__":
    main()
