"""Pipeline accuracy: the planner's per-rank pipeline replay against every rank's measured step.

gpipe, 1f1b, interleaved-1f1b (v=2), zb-h1 (v=1 and v=2), zb-v, dualpipe-v x {2, 4} pipeline
ranks x {gpt2, llama} x {fp32, amp-bf16}: 56 real torchrun runs (gloo on CPU, NCCL on GPUs) of tiny
8-block models with 8 micro-batches. For each run and rank: estimate, measurement and relative
error per category and in total at the steady-state peak, and whether the rank's action order
and peak in-flight count equal the simulator's. Goal: every rank's total within 2% (the
replay is meant to be exact).

    python benchmarks/accuracy_pipeline.py [--out benchmarks/results/accuracy-pipeline-cpu.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.catalog.specs import ValidationRequest  # noqa: E402
from service.validation.runner import run_validation  # noqa: E402

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")
SHORT = ("params", "grads", "optim", "acts", "temps", "total")
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-h1", 2),
             ("zb-v", 2), ("dualpipe-v", 2)]


def model(family: str) -> dict:
    m = {"family": family, "num_layers": 8, "hidden_size": 64, "num_heads": 4, "vocab_size": 128,
         "max_sequence_length": 32, "tie_embeddings": False}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


def err(e: int, m: int) -> str:
    return "n/a" if not m else f"{100 * (e - m) / m:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    lines = [f"# Pipeline accuracy ({a.device})", "",
             "Per rank: estimate / measured bytes at the steady-state peak, relative error per "
             "category; order and in-flight: the rank's measured action order and peak "
             "in-flight micro-batches equal the simulator's.", "",
             "| family | precision | schedule | v | ranks | rank | " + " | ".join(
                 f"{s} est / meas (err)" for s in SHORT) + " | order | in-flight |",
             "|" + "---|" * (8 + len(SHORT))]
    worst, rows, exact_ranks, all_ranks, t0 = 0.0, 0, 0, 0, time.perf_counter()
    for family in ("gpt2", "llama"):
        for precision in ("fp32", "amp-bf16"):
            for schedule, v in SCHEDULES:
                for ranks in (2, 4):
                    req = ValidationRequest.model_validate({
                        "model": model(family),
                        "training": {"precision": precision, "sequence_length": 32,
                                     "micro_batch_size": 2, "optimizer": "adamw",
                                     "gradient_accumulation_steps": 8},
                        "parallelism": {"pipeline_parallel": ranks, "pipeline_schedule": schedule,
                                        "virtual_pipeline_stages": v},
                        "device": a.device, "steps": 3, "timeout_s": 600})
                    res = run_validation(req)
                    rows += 1
                    comp = {c.rank: c for c in res.pipeline.ranks}
                    for r in res.ranks or []:
                        cells = [f"{getattr(r.estimate, c):,} / {getattr(r.measured, c):,} "
                                 f"({err(getattr(r.estimate, c), getattr(r.measured, c))})"
                                 for c in CATS]
                        pc = comp[r.rank]
                        inflight = pc.in_flight_measured == pc.in_flight_simulated
                        lines.append(f"| {family} | {precision} | {schedule} | {v} | {ranks} | "
                                     f"{r.rank} | " + " | ".join(cells) + f" | "
                                     f"{'yes' if pc.action_order_matches else 'NO'} | "
                                     f"{'yes' if inflight else 'NO'} |")
                        e = abs(r.estimate.total - r.measured.total) / r.measured.total
                        worst = max(worst, e)
                        all_ranks += 1
                        exact_ranks += r.estimate == r.measured
                    print(f"{family:5} {precision:8} {schedule:16} v={v} ranks={ranks}: "
                          f"worst rank total {res.estimate.total:,} est / {res.measured.total:,} "
                          f"measured ({err(res.estimate.total, res.measured.total)})", flush=True)
    lines += ["", f"{rows} runs, {all_ranks} ranks: {exact_ranks} equal to the byte in every "
              f"category; largest per-rank total error {100 * worst:.4f}% (goal: 2%); "
              f"{time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
