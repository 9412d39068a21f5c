"""Checkpoint plans for a memory budget: planned against measured, on this machine's CPU.

Run: python -m benchmarks.accuracy_checkpointing > benchmarks/results/accuracy-checkpointing-cpu.md

For small models of both families, budgets spread between the peak with every block
checkpointed and the peak with none: POST /v1/checkpointing places the blocks (device 'cpu'),
a validation job runs the reference step with that plan under torch.utils.checkpoint and
measures the steady-state peak (live storages, service/validation/meter.py) and the step time
against an unchecked run of the same setup. The issue's acceptance: the measured peak within the
budget and within 2% of the planned peak. ``rows()`` is what benchmarks/accuracy.py reuses.
"""

from __future__ import annotations

import os
import platform

import torch

from planner.routes.checkpoint_specs import CheckpointRequest
from planner.routes.checkpointing import plan_checkpointing
from planner.catalog.specs import (
    ActivationCheckpointing,
    ModelSpec,
    TrainingSpec,
    ValidationRequest,
)
from service.validation.runner import run_validation

MAX_REL_ERROR = 0.02

SETUPS = [
    ("gpt2 4L h64", ModelSpec(family="gpt2", num_layers=4, hidden_size=64, num_heads=4,
                               vocab_size=256, max_sequence_length=64),
     TrainingSpec(precision="fp32", micro_batch_size=4, sequence_length=64)),
    ("llama 4L h64 gqa", ModelSpec(family="llama", num_layers=4, hidden_size=64, num_heads=4,
                                   num_kv_heads=2, vocab_size=256, max_sequence_length=64),
     TrainingSpec(precision="fp32", micro_batch_size=4, sequence_length=64)),
    ("gpt2 6L h128", ModelSpec(family="gpt2", num_layers=6, hidden_size=128, num_heads=4,
                                vocab_size=256, max_sequence_length=128),
     TrainingSpec(precision="amp-bf16", micro_batch_size=8, sequence_length=128)),
    ("llama 6L h128", ModelSpec(family="llama", num_layers=6, hidden_size=128, num_heads=4,
                                vocab_size=256, max_sequence_length=128),
     TrainingSpec(precision="amp-bf16", micro_batch_size=8, sequence_length=128)),
]
FRACTIONS = (0.25, 0.5, 0.75)  # of the way from the all-checkpointed peak to the unchecked one


def _plan(model: ModelSpec, training: TrainingSpec, **kw):
    return plan_checkpointing(CheckpointRequest(model=model, training=training, device="cpu",
                                                **kw))


def rows(fractions: tuple[float, ...] = FRACTIONS, steps: int = 3) -> list[dict]:
    """One row per (setup, budget): planned and measured peak, budget check, step time ratio."""
    out = []
    for name, model, training in SETUPS:
        low = _plan(model, training, strategy="full").total_peak_bytes
        high = _plan(model, training, strategy="none").total_peak_bytes
        for f in fractions:
            budget = low + int(f * (high - low))
            plan = _plan(model, training, strategy="budget", budget_bytes=budget)
            ac = ActivationCheckpointing(strategy="budget", budget_bytes=budget)
            req = ValidationRequest(model=model, device="cpu", steps=steps,
                                    training=training.model_copy(
                                        update={"activation_checkpointing": ac}))
            res = run_validation(req)
            measured = res.measured.total
            rel = (plan.total_peak_bytes - measured) / measured
            out.append({
                "setup": name, "precision": training.precision, "budget_bytes": budget,
                "checkpointed_blocks": plan.checkpointed_blocks,
                "measured_blocks": res.checkpointed_blocks,
                "planned_peak_bytes": plan.total_peak_bytes, "measured_peak_bytes": measured,
                "relative_error": rel, "within_budget": measured <= budget,
                "ok": measured <= budget and abs(rel) <= MAX_REL_ERROR
                and res.checkpointed_blocks == plan.checkpointed_blocks,
                "planned_step_time_ratio": res.planned_step_time_ratio,
                "measured_step_time_ratio": res.step_time_ratio,
                "peak_phase": plan.peak_phase,
            })
    return out


def table(rs: list[dict]) -> str:
    lines = [
        ("| setup | precision | budget B | blocks | planned peak B | measured peak B | rel. error "
         "| within budget | step time ratio planned / measured | peak at |"),
        "|---|---|---:|---|---:|---:|---:|---|---|---|",
    ]
    for r in rs:
        blocks = ",".join(map(str, r["checkpointed_blocks"])) or "-"
        meas = r["measured_step_time_ratio"]
        lines.append(
            f"| {r['setup']} | {r['precision']} | {r['budget_bytes']:,} | {blocks} | "
            f"{r['planned_peak_bytes']:,} | {r['measured_peak_bytes']:,} | "
            f"{r['relative_error']:+.4%} | {'yes' if r['within_budget'] else 'NO'} | "
            f"{r['planned_step_time_ratio']:.3f} / {'-' if meas is None else f'{meas:.3f}'} | "
            f"{r['peak_phase']} |")
    return "\n".join(lines)


def main() -> None:
    rs = rows()
    print("# Checkpoint plans for a budget: planned vs measured (CPU)\n")
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} "
          "threads. "
          "Budgets at 25/50/75% of the way from the all-checkpointed peak to the unchecked peak; "
          "plans from POST /v1/checkpointing (device 'cpu'); peaks are steady-state (step 2+) "
          "allocated bytes of live storages. Step time ratio: planned = 1 + recompute FLOPs / "
          "step FLOPs (roofline); measured = plan / unchecked step time, fastest of 3 steps each, "
          "without the memory meter (small CPU models on a shared machine: Python overhead per op "
          "and other load dominate, not FLOPs).\n")
    print(table(rs))
    ok = sum(r["ok"] for r in rs)
    print(f"\n{ok} of {len(rs)} rows within the budget and within {MAX_REL_ERROR:.0%} of the "
          "planned peak (with the planned blocks).")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nLoad average at the end of the run: {load} on {os.cpu_count()} CPUs; measured "
          "step time ratios are only meaningful on an otherwise idle machine.")


if __name__ == "__main__":
    main()
