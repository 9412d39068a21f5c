"""``memplan plan``: a PlanRequest searched locally, printed as a table per cluster size."""

from __future__ import annotations

import argparse
from typing import Any

EXIT_NOTHING_FITS = 3


def layout_name(x: Any) -> str:
    """e.g. 'dp64 tp8 pp4 v2 z1 ckpt=full b1x8'."""
    parts = [f"dp{x.data_parallel}", f"tp{x.tensor_parallel}", f"pp{x.pipeline_parallel}"]
    if x.virtual_pipeline_stages > 1:
        parts.append(f"v{x.virtual_pipeline_stages}")
    if getattr(x, "expert_parallel", 1) > 1:
        parts.append(f"ep{x.expert_parallel}")
    parts.append(f"z{x.zero_stage}")
    if x.offload_optimizer:
        parts.append("off-opt")
    if x.offload_parameters:
        parts.append("off-par")
    parts.append(f"ckpt={x.activation_checkpointing}")
    if x.loss != "standard":
        parts.append(f"loss={x.loss}")
    parts.append(f"b{x.micro_batch_size}x{x.gradient_accumulation_steps}")
    return " ".join(parts)


def _days(s: float | None) -> str:
    return "-" if s is None else f"{s / 86400:,.1f} d"


def plan_table(result: Any) -> str:
    from service.cli import _table, human_bytes

    out = []
    for c in result.clusters:
        s = c.search
        out.append(f"{c.num_gpus} GPUs: {s.space_size} layouts, {s.pruned_by_bound} pruned by "
                   f"a lower bound, {s.evaluated} evaluated, {s.seconds * 1e3:.0f} ms")
        if not c.layouts:
            out.append("  nothing fits (or within the budget); rejected: " + ", ".join(
                f"{k} {v}" for k, v in sorted(s.rejected.items())))
            continue
        rows = [[layout_name(x), human_bytes(x.peak_bytes), f"{x.time.step_s:.2f}",
                 f"{x.time.compute_s:.2f}",
                 f"{x.time.tensor_parallel_s + x.time.data_parallel_s + x.time.pipeline_p2p_s:.2f}",
                 f"{x.time.bubble_s:.2f}", f"{x.tokens_per_s:,.0f}",
                 f"{x.model_flops_utilization:.1%}", _days(x.time_to_train_s),
                 "-" if x.cost_to_train is None else f"{x.cost_to_train:,.0f}",
                 "*" if x.pareto else ""] for x in c.layouts]
        out.append(_table(["layout", "peak", "step s", "compute", "comm", "bubble", "tokens/s",
                           "MFU", "train", "cost", "pareto"], rows))
        out.append("")
    out += [f"note: {n}" for n in result.notes]
    return "\n".join(out).rstrip()


def cmd_plan(args: argparse.Namespace) -> int:
    from planner.catalog.errors import PlanningError
    from planner.catalog.plan_specs import PlanRequest
    from planner.catalog.presets import UnknownName
    from planner.machine import collector
    from planner.routes.plan_search import plan
    from service.cli import InputError, _dump, load_spec

    collector.tune()  # the planner is imported: out of the cyclic collector's way
    request = load_spec(args.spec, PlanRequest)
    try:
        result = plan(request)
    except (PlanningError, UnknownName, ValueError) as exc:
        raise InputError(f"cannot plan this cluster: {exc}") from None
    print(_dump(result) if args.json else plan_table(result))
    return 0 if any(c.layouts for c in result.clusters) else EXIT_NOTHING_FITS


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="search a cluster's parallel layouts",
                       description="Every data/tensor/pipeline/ZeRO/offload/checkpointing/"
                       "micro-batch layout of a PlanRequest's cluster: the fastest that fit, "
                       "with per-device peak, step time and tokens/s. Exit status 3 when "
                       "nothing fits.")
    p.add_argument("spec", metavar="SPEC.json", help="a PlanRequest ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="print the result object as JSON")
    p.set_defaults(fn=cmd_plan)
