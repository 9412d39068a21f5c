"""Multi-rank accuracy: the planner's per-rank estimate against every rank's measured step.

ZeRO stages 0-3 x {2, 4} data-parallel ranks x {gpt2, llama} x {fp32, amp-bf16}: 32 real
torchrun runs (gloo on CPU, NCCL on GPUs) of tiny models. For each run: per rank, estimate,
measurement and relative error per category and in total (steady state, step 2+), and the worst
ranks (the highest estimated and the highest measured peak). Goal: every rank's total within 2%
on CPU (3% on GPU).

    python benchmarks/accuracy_distributed.py [--out benchmarks/results/accuracy-distributed-cpu.md]

``--extras`` runs the other supported setups instead (each precision preset under the stages
that run it, LoRA, activation checkpointing; 2 and 4 ranks):

    python benchmarks/accuracy_distributed.py --extras --out benchmarks/results/accuracy-distributed-extras-cpu.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.catalog.specs import ValidationRequest  # noqa: E402
from service.validation.distributed import run_multi_rank  # noqa: E402

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")
SHORT = ("params", "grads", "optim", "acts", "temps", "total")


def model(family: str) -> dict:
    m = {"family": family, "num_layers": 2, "hidden_size": 64, "num_heads": 4, "vocab_size": 256,
         "max_sequence_length": 64}
    if family == "llama":
        m |= {"num_kv_heads": 2, "ffn_hidden_size": 160}
    return m


MAIN = [(f, p, z, n, None) for f in ("gpt2", "llama") for p in ("fp32", "amp-bf16")
        for z in range(4) for n in (2, 4)]
_CKPT = ("full checkpointing", "activation_checkpointing", {"strategy": "full"})
_SEL = ("selective checkpointing", "activation_checkpointing", {"strategy": "selective"})
_LORA = ("LoRA r=4", "lora", {"rank": 4})
EXTRAS = ([(f, p, z, n, None) for f, p in (("gpt2", "mixed-bf16"), ("llama", "mixed-fp16"))
           for z in range(4) for n in (2, 4)]
          + [("llama", "amp-fp16", 0, n, None) for n in (2, 4)]
          + [(f, "fp32", z, 2, x) for f, x in (("gpt2", _CKPT), ("llama", _SEL), ("gpt2", _LORA))
             for z in range(4)])


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--extras", action="store_true",
                    help="precisions, LoRA and checkpointing instead of the main matrix")
    a = ap.parse_args()
    lines = [f"# Multi-rank accuracy ({a.device}){': other setups' if a.extras else ''}", "",
             "Per rank: estimate / measured bytes at the steady-state peak, relative error per "
             "category; `*` marks the worst rank (`worst_rank`: the highest estimated peak, "
             "lowest rank on ties) and `m` the rank with the highest measured peak "
             "(`worst_measured_rank`) where that is another rank.", "",
             "| family | precision | ZeRO | ranks | rank | " + " | ".join(
                 f"{s} est / meas (err)" for s in SHORT) + " |",
             "|" + "---|" * (5 + len(SHORT))]
    worst_err, rows, t0 = 0.0, 0, time.perf_counter()
    exact = rank_rows = 0
    for family, precision, zero, ranks, extra in (EXTRAS if a.extras else MAIN):
        training = {"precision": precision, "sequence_length": 32,
                    "micro_batch_size": 2, "optimizer": "adamw"}
        if extra:
            training[extra[1]] = extra[2]
            precision = f"{precision} + {extra[0]}"
        req = ValidationRequest.model_validate({
            "model": model(family),
            "training": training,
            "parallelism": {"data_parallel": ranks, "zero_stage": zero},
            "device": a.device, "steps": 4, "timeout_s": 600})
        res = run_multi_rank(req)
        rows += 1
        for r in res.ranks or []:
            cells = [f"{getattr(r.estimate, c):,} / {getattr(r.measured, c):,} "
                     f"({pct(getattr(r.relative_error, c))})" for c in CATS]
            mark = "*" if r.rank == res.worst_rank else (
                "m" if r.rank == res.worst_measured_rank else "")
            lines.append(f"| {family} | {precision} | {zero} | {ranks} | "
                         f"{r.rank}{mark} | " + " | ".join(cells) + " |")
            worst_err = max(worst_err, abs(r.relative_error.total or 0.0))
            rank_rows += 1
            exact += r.estimate == r.measured
        print(f"{family:5} {precision:8} zero={zero} ranks={ranks} worst rank "
              f"{res.worst_rank} (measured: {res.worst_measured_rank}): total "
              f"{res.estimate.total:,} est / {res.measured.total:,} measured "
              f"({pct(res.relative_error.total)})", flush=True)
    lines += ["", f"{rows} runs; {exact} of {rank_rows} ranks equal to the byte in every "
              f"category; largest per-rank total error {100 * worst_err:.4f}% "
              f"(goal: 2% on CPU); {time.perf_counter() - t0:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
