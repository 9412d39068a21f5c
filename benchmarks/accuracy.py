"""Accuracy of the planner against the measured reference step: the figure memplan is judged by.

Runs a matrix of real CPU configurations (both families, every torch optimizer, several precision
presets, checkpointing none / full / every-k / sqrt, eager and SDPA attention, dropout, LoRA,
gradient accumulation, chunked losses, several micro-batch and sequence sizes) plus traced full-size configs
(FakeTensorMode: GPT-2 XL, Llama-2-7B, ...), and prints estimate, measured and relative error per
category for the steady-state step. Goal: total within 1% and every category within 2% on every
row.

    python -m benchmarks.accuracy [--quick] [--out benchmarks/results/accuracy-cpu.md]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from planner.catalog.specs import ValidationRequest
from service.validation.runner import run_validation

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")

TINY_GPT2 = dict(family="gpt2", num_layers=4, hidden_size=128, num_heads=4, vocab_size=1000,
                 max_sequence_length=256)
TINY_LLAMA = dict(family="llama", num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=2,
                  ffn_hidden_size=352, vocab_size=1000, max_sequence_length=256)
SMALL_GPT2 = dict(family="gpt2", num_layers=6, hidden_size=256, num_heads=8, vocab_size=4096,
                  max_sequence_length=512)
SMALL_LLAMA = dict(family="llama", num_layers=6, hidden_size=256, num_heads=8, num_kv_heads=4,
                   ffn_hidden_size=688, vocab_size=4096, max_sequence_length=512)


def _t(**kw):
    base = dict(micro_batch_size=2, sequence_length=64)
    base.update(kw)
    return base


# (label, model, training, mode)
REAL = [
    ("gpt2 fp32 sgd", TINY_GPT2, _t(precision="fp32", optimizer="sgd")),
    ("gpt2 fp32 sgd-momentum", TINY_GPT2, _t(precision="fp32", optimizer="sgd-momentum")),
    ("gpt2 amp-bf16 adamw", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw")),
    ("gpt2 amp-bf16 adam b4 s128", TINY_GPT2, _t(precision="amp-bf16", optimizer="adam", micro_batch_size=4, sequence_length=128)),
    ("gpt2 amp-fp16 adamw", TINY_GPT2, _t(precision="amp-fp16", optimizer="adamw")),
    ("gpt2 mixed-bf16 adamw", TINY_GPT2, _t(precision="mixed-bf16", optimizer="adamw")),
    ("gpt2 mixed-fp16 adam", TINY_GPT2, _t(precision="mixed-fp16", optimizer="adam")),
    ("gpt2 bf16 adagrad", TINY_GPT2, _t(precision="bf16", optimizer="adagrad")),
    ("gpt2 fp32 rmsprop eager", TINY_GPT2, _t(precision="fp32", optimizer="rmsprop", attention="eager")),
    ("gpt2 amp-bf16 adadelta full-ckpt", TINY_GPT2, _t(precision="amp-bf16", optimizer="adadelta", activation_checkpointing={"strategy": "full"})),
    ("gpt2 amp-bf16 sgd selective eager", TINY_GPT2, _t(precision="amp-bf16", optimizer="sgd", attention="eager", activation_checkpointing={"strategy": "selective"})),
    ("llama bf16 adamw selective", TINY_LLAMA, _t(precision="bf16", optimizer="adamw", micro_batch_size=4, activation_checkpointing={"strategy": "selective"})),
    ("llama mixed-bf16 adamw fp32 grads", TINY_LLAMA, _t(precision="mixed-bf16", optimizer="adamw", precision_overrides={"gradients": "fp32"})),
    ("gpt2 amp-bf16 adamw lora bf16 base", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw", lora={"rank": 8, "target_modules": ["q", "v", "up"], "base_dtype": "bf16"})),
    ("gpt2 amp-bf16 adamw every-2", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw", activation_checkpointing={"strategy": "every-k", "every_k": 2})),
    ("gpt2 fp32 adamw dropout 0.1", TINY_GPT2, _t(precision="fp32", optimizer="adamw", dropout=0.1)),
    ("gpt2 amp-bf16 adamw lora q,v", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw", lora={"rank": 8, "target_modules": ["q", "v"]})),
    ("gpt2 amp-bf16 adamw accum 3", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw", gradient_accumulation_steps=3)),
    ("gpt2 fp32 adamw for-loop", TINY_GPT2, _t(precision="fp32", optimizer="adamw", optimizer_implementation="for-loop")),
    ("gpt2 fp32 adam fused", TINY_GPT2, _t(precision="fp32", optimizer="adam", optimizer_implementation="fused")),
    ("llama fp32 sgd", TINY_LLAMA, _t(precision="fp32", optimizer="sgd")),
    ("llama amp-bf16 sgd-momentum", TINY_LLAMA, _t(precision="amp-bf16", optimizer="sgd-momentum")),
    ("llama amp-bf16 adamw", TINY_LLAMA, _t(precision="amp-bf16", optimizer="adamw")),
    ("llama amp-bf16 adam b1 s256", TINY_LLAMA, _t(precision="amp-bf16", optimizer="adam", micro_batch_size=1, sequence_length=256)),
    ("llama mixed-bf16 adamw", TINY_LLAMA, _t(precision="mixed-bf16", optimizer="adamw")),
    ("llama bf16 adagrad eager", TINY_LLAMA, _t(precision="bf16", optimizer="adagrad", attention="eager")),
    ("llama fp32 rmsprop centered", TINY_LLAMA, _t(precision="fp32", optimizer="rmsprop", rmsprop_centered=True, rmsprop_momentum=True)),
    ("llama amp-bf16 adadelta full-ckpt", TINY_LLAMA, _t(precision="amp-bf16", optimizer="adadelta", activation_checkpointing={"strategy": "full"})),
    ("llama bf16 adamw sqrt-ckpt", TINY_LLAMA, _t(precision="bf16", optimizer="adamw", activation_checkpointing={"strategy": "sqrt"})),
    ("llama amp-fp16 adamw", TINY_LLAMA, _t(precision="amp-fp16", optimizer="adamw")),
    ("llama amp-bf16 adamw lora all", TINY_LLAMA, _t(precision="amp-bf16", optimizer="adamw", lora={"rank": 4, "target_modules": ["q", "k", "v", "o", "gate", "up", "down"]})),
    ("llama fp32 adafactor", TINY_LLAMA, _t(precision="fp32", optimizer="adafactor")),
    ("gpt2-small amp-bf16 adamw b4 s256", SMALL_GPT2, _t(precision="amp-bf16", optimizer="adamw", micro_batch_size=4, sequence_length=256)),
    ("llama-small mixed-bf16 adamw b2 s512", SMALL_LLAMA, _t(precision="mixed-bf16", optimizer="adamw", micro_batch_size=2, sequence_length=512)),
    ("llama-small amp-bf16 adamw full-ckpt eager", SMALL_LLAMA, _t(precision="amp-bf16", optimizer="adamw", micro_batch_size=2, sequence_length=256, attention="eager", activation_checkpointing={"strategy": "full"})),
    # chunked cross-entropy losses (training.loss): torchtune-style and recomputed per chunk
    ("gpt2 amp-bf16 adamw loss chunked 4", TINY_GPT2, _t(precision="amp-bf16", optimizer="adamw", loss={"kind": "chunked", "chunks": 4})),
    ("gpt2 fp32 sgd loss chunked-linear 8 full-ckpt", TINY_GPT2, _t(precision="fp32", optimizer="sgd", activation_checkpointing={"strategy": "full"}, loss={"kind": "chunked-linear", "chunks": 8})),
    ("llama bf16 adamw loss chunked 3 b3 s50", TINY_LLAMA, _t(precision="bf16", optimizer="adamw", micro_batch_size=3, sequence_length=50, loss={"kind": "chunked", "chunks": 3})),
    ("llama amp-bf16 sgd-momentum loss chunked-linear 4", TINY_LLAMA, _t(precision="amp-bf16", optimizer="sgd-momentum", loss={"kind": "chunked-linear", "chunks": 4})),
    ("llama mixed-bf16 adamw loss chunked-linear 16 full-ckpt", TINY_LLAMA, _t(precision="mixed-bf16", optimizer="adamw", activation_checkpointing={"strategy": "full"}, loss={"kind": "chunked-linear", "chunks": 16})),
    ("llama-small amp-bf16 adam loss chunked-linear 8 b4 s256", SMALL_LLAMA, _t(precision="amp-bf16", optimizer="adam", micro_batch_size=4, sequence_length=256, loss={"kind": "chunked-linear", "chunks": 8})),
]

TRACED = [
    ("gpt2-xl amp-bf16 adamw b1 s1024", dict(preset="gpt2-xl"), _t(precision="amp-bf16", optimizer="adamw", micro_batch_size=1, sequence_length=1024)),
    ("gpt2-xl mixed-bf16 adam b2 s1024 full-ckpt", dict(preset="gpt2-xl"), _t(precision="mixed-bf16", optimizer="adam", micro_batch_size=2, sequence_length=1024, activation_checkpointing={"strategy": "full"})),
    ("llama-2-7b bf16 adamw b1 s2048", dict(preset="llama-2-7b"), _t(precision="bf16", optimizer="adamw", micro_batch_size=1, sequence_length=2048)),
    ("llama-2-7b amp-bf16 sgd b1 s4096 full-ckpt", dict(preset="llama-2-7b"), _t(precision="amp-bf16", optimizer="sgd", micro_batch_size=1, sequence_length=4096, activation_checkpointing={"strategy": "full"})),
    ("tinyllama-1.1b amp-bf16 adamw b4 s2048", dict(preset="tinyllama-1.1b"), _t(precision="amp-bf16", optimizer="adamw", micro_batch_size=4, sequence_length=2048)),
    # Llama-3-8B at micro-batch 4 x 8192 with full checkpointing: the loss head's memory, three ways
    *[(f"llama-3-8b bf16 adamw b4 s8192 full-ckpt loss {name}", dict(preset="llama-3-8b"),
       _t(precision="bf16", optimizer="adamw", micro_batch_size=4, sequence_length=8192,
          activation_checkpointing={"strategy": "full"}, loss=loss))
      for name, loss in (("standard", {"kind": "standard"}),
                         ("chunked 8", {"kind": "chunked", "chunks": 8}),
                         ("chunked-linear 8", {"kind": "chunked-linear", "chunks": 8}))],
]


def rows(quick: bool = False):
    real = REAL[::4] if quick else REAL
    traced = TRACED[:1] if quick else TRACED
    for mode, table in (("real", real), ("traced", traced)):
        for label, model, training in table:
            req = ValidationRequest(model=model, training=training, mode=mode, steps=3 if mode == "real" else 2)
            t0 = time.perf_counter()
            res = run_validation(req)
            yield label, mode, res, time.perf_counter() - t0


def _fmt_bytes(n: int) -> str:
    return f"{n:,}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.3f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the rows")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    lines = [
        "# Accuracy: planner estimate vs measured reference step (CPU)",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}; "
        "steady-state step (step 2+); bytes; error = (estimate - measured) / measured.",
        "Goal: total within 1%, every category within 2%.",
        "",
        "| config | mode | peak op | measured total | estimate total | " +
        " | ".join(f"err {c}" for c in CATS) + " | first-step err | s |",
        "|---|---|---|---:|---:|" + "---:|" * len(CATS) + "---:|---:|",
    ]
    worst_total, worst_cat, n = 0.0, 0.0, 0
    print("\n".join(lines), flush=True)
    for label, mode, r, dt in rows(args.quick):
        errs = r.relative_error.model_dump()
        first = None
        if r.first_step_estimate and r.first_step_measured and r.first_step_measured.total:
            first = (r.first_step_estimate.total - r.first_step_measured.total) / r.first_step_measured.total
        worst_total = max(worst_total, abs(errs["total"] or 0))
        worst_cat = max([worst_cat] + [abs(errs[c]) for c in CATS[:-1] if errs[c] is not None])
        n += 1
        line = (f"| {label} | {mode} | {r.peak_op} | {_fmt_bytes(r.measured.total)} | "
                f"{_fmt_bytes(r.estimate.total)} | " + " | ".join(_pct(errs[c]) for c in CATS) +
                f" | {_pct(first)} | {dt:.1f} |")
        lines.append(line)
        print(line, flush=True)
    summary = [
        "",
        f"{n} rows; worst |total error| {100 * worst_total:.4f}% (goal 1%), worst |category error| "
        f"{100 * worst_cat:.4f}% (goal 2%): {'PASS' if worst_total <= 0.01 and worst_cat <= 0.02 else 'FAIL'}",
    ]
    lines += summary
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if worst_total <= 0.01 and worst_cat <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
