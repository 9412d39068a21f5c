"""POST /v1/memory for implementation 'transformers' on data-parallel ranks: DDP, ZeRO-1 and FSDP2
(ZeRO-2, ZeRO-3), full-size models, the traced estimate's first-request time and its peak.

    python -m benchmarks.hf_zero [--out benchmarks/results/hf-zero-cpu.md] [--only REGEX]

Each row is a fresh estimate (the trace cache cleared), timed on this machine's CPU; the peak is
the worst rank's steady-state peak. The exactness of these traces is held by
tests/test_hf_fsdp.py and tests/test_hf_data_parallel.py (traced ranks equal real gloo ranks to
the byte); this benchmark records what a full-size request costs.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
import warnings

ROWS = [  # (preset, micro-batch, sequence, data_parallel, zero_stage, precision)
    ("llama-3.1-8b", 1, 1024, 8, 0, "amp-bf16"),
    ("llama-3.1-8b", 1, 1024, 8, 3, "amp-bf16"),
    ("llama-3.1-8b", 1, 1024, 8, 2, "amp-bf16"),
    ("qwen2.5-7b", 1, 1024, 8, 3, "bf16"),
    ("llama-3.1-8b", 1, 1024, 8, 1, "amp-bf16"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from planner.catalog.specs import MemoryRequest
    from planner.hf import estimate as E
    from planner.routes.memory import estimate_memory

    lines = ["# implementation 'transformers' under DDP, ZeRO-1 and FSDP2: full-size estimates",
             "", f"CPU: {platform.processor() or platform.machine()}; `python -m "
             "benchmarks.hf_zero`; adamw, estimates for a CUDA device (its attention "
             "kernels), the trace cache cleared before each row; peak = the allocated "
             "steady-state peak of the worst rank.", "",
             "| model | b | s | dp | zero | precision | traced blocks | peak (GiB) | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for preset, b, s, dp, z, prec in ROWS:
        label = f"{preset} zero{z} {prec}"
        if args.only and not re.search(args.only, label):
            continue
        E.clear()
        req = MemoryRequest(model={"preset": preset},
                            training={"precision": prec, "optimizer": "adamw",
                                      "micro_batch_size": b, "sequence_length": s,
                                      "implementation": "transformers"},
                            parallelism={"data_parallel": dp, "zero_stage": z})
        t0 = time.perf_counter()
        res = estimate_memory(req, device="cuda")
        dt = time.perf_counter() - t0
        traced = next(a.value for a in res.assumptions if a.name == "traced_layers")
        row = (f"| {preset} | {b} | {s} | {dp} | {z} | {prec} | {traced} | "
               f"{res.breakdown.total / 2**30:.2f} | {dt:.1f} |")
        print(row, flush=True)
        lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
