"""Accuracy of implementation 'transformers': the estimate against the real transformers step.

Every row is a validation job (service/validation/runner.py): the estimate traces one- to
three-block proxies of the model under FakeTensorMode and extrapolates over the blocks; the
measurement runs the whole transformers model (``AutoModelForCausalLM.from_config``, random
init, ``loss = model(**batch).loss``, backward, ``optimizer.step()``,
``zero_grad(set_to_none=True)``) for real on the CPU, or traced (FakeTensorMode) for the
full-size rows. Steady state = the highest of steps 2+. Goal (issue 15): byte-exact on >= 90%
of rows, every category within 1% on all.

For the gpt2 and llama rows the reference step's estimate of the same architecture is shown
too (the ``reference err`` column): how far the estimate of memplan's own step is from the
transformers step, the gap this implementation closes.

    python -m benchmarks.accuracy_hf [--quick] [--no-traced] [--out benchmarks/results/accuracy-hf-cpu.md]
    python -m benchmarks.accuracy_hf --no-traced --only 'fp16|mixed' --out benchmarks/results/accuracy-hf-cpu-precisions.md
    bash benchmarks/gpu_campaign.sh hf --device cuda --quick --out $OUT/accuracy-hf-cuda.md   # a GPU

With ``--device cuda`` the real rows run on the GPU and the estimate describes CUDA (the traced
rows stay on the CPU's FakeTensorMode).
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
import warnings

import torch
import transformers

from planner.catalog.presets import hf_presets
from planner.catalog.specs import MemoryRequest, ValidationRequest
from planner.routes.memory import estimate_memory
from service.validation.runner import run_validation

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries", "total")

_B = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
M = {
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 256,
             "vocab_size": 512},
    "llama": {"model_type": "llama", **_B},
    "mistral": {"model_type": "mistral", **_B, "sliding_window": 32},
    "qwen2": {"model_type": "qwen2", **_B},
    "qwen3": {"model_type": "qwen3", **_B, "head_dim": 32},
    "gemma2": {"model_type": "gemma2", **_B, "num_hidden_layers": 6, "head_dim": 16,
               "sliding_window": 32},
    "gemma3": {"model_type": "gemma3_text", **_B, "num_hidden_layers": 7, "head_dim": 16,
               "sliding_window": 32},
    "phi3": {"model_type": "phi3", **_B, "pad_token_id": 0},
    "mixtral": {"model_type": "mixtral", **_B, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **_B, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", **_B, "moe_intermediate_size": 32, "head_dim": 16,
                  "num_experts": 8, "num_experts_per_tok": 2},
}


def _t(**kw):
    base = dict(micro_batch_size=2, sequence_length=64, precision="fp32", optimizer="adamw",
                implementation="transformers")
    base.update(kw)
    return base


FULL = {"activation_checkpointing": {"strategy": "full"}}
REENTRANT = {**FULL, "transformers": {"use_reentrant": True}}

# (label, model, training)
REAL = [
    ("gpt2 fp32 adamw sdpa", M["gpt2"], _t()),
    ("gpt2 amp-bf16 sgd eager", M["gpt2"], _t(precision="amp-bf16", optimizer="sgd", attention="eager")),
    ("gpt2 amp-bf16 adamw full-ckpt", M["gpt2"], _t(precision="amp-bf16", **FULL)),
    ("gpt2 fp32 sgd use_cache off", M["gpt2"], _t(optimizer="sgd", transformers={"use_cache": False})),
    ("llama fp32 adamw", M["llama"], _t()),
    ("llama amp-bf16 adamw", M["llama"], _t(precision="amp-bf16")),
    ("llama amp-bf16 sgd eager", M["llama"], _t(precision="amp-bf16", optimizer="sgd", attention="eager")),
    ("llama bf16 adam", M["llama"], _t(precision="bf16", optimizer="adam")),
    ("llama fp32 sgd full-ckpt", M["llama"], _t(optimizer="sgd", **FULL)),
    ("llama amp-bf16 adamw full-ckpt reentrant", M["llama"], _t(precision="amp-bf16", **REENTRANT)),
    ("llama fp32 adamw use_cache off b4 s128", M["llama"], _t(micro_batch_size=4, sequence_length=128, transformers={"use_cache": False})),
    ("llama fp32 adamw fused accum 2", M["llama"], _t(optimizer_implementation="fused", gradient_accumulation_steps=2)),
    ("mistral amp-bf16 adamw", M["mistral"], _t(precision="amp-bf16")),
    ("mistral fp32 sgd-momentum eager", M["mistral"], _t(optimizer="sgd-momentum", attention="eager")),
    ("mistral bf16 adamw full-ckpt", M["mistral"], _t(precision="bf16", **FULL)),
    ("qwen2 fp32 adamw", M["qwen2"], _t()),
    ("qwen2 amp-bf16 sgd full-ckpt", M["qwen2"], _t(precision="amp-bf16", optimizer="sgd", **FULL)),
    ("qwen3 amp-bf16 adamw", M["qwen3"], _t(precision="amp-bf16")),
    ("qwen3 bf16 rmsprop eager", M["qwen3"], _t(precision="bf16", optimizer="rmsprop", attention="eager")),
    ("gemma2 fp32 adamw eager", M["gemma2"], _t(attention="eager")),
    ("gemma2 amp-bf16 sgd eager full-ckpt", M["gemma2"], _t(precision="amp-bf16", optimizer="sgd", attention="eager", **FULL)),
    ("gemma3 fp32 adamw sdpa", M["gemma3"], _t()),
    ("gemma3 amp-bf16 adam eager", M["gemma3"], _t(precision="amp-bf16", optimizer="adam", attention="eager")),
    ("phi3 fp32 adamw", M["phi3"], _t()),
    ("phi3 amp-bf16 sgd full-ckpt", M["phi3"], _t(precision="amp-bf16", optimizer="sgd", **FULL)),
    ("mixtral fp32 adamw", M["mixtral"], _t()),
    ("mixtral amp-bf16 sgd", M["mixtral"], _t(precision="amp-bf16", optimizer="sgd")),
    ("mixtral bf16 adamw full-ckpt", M["mixtral"], _t(precision="bf16", **FULL)),
    ("qwen2_moe fp32 adamw", M["qwen2_moe"], _t()),
    ("qwen2_moe amp-bf16 adam eager", M["qwen2_moe"], _t(precision="amp-bf16", optimizer="adam", attention="eager")),
    ("qwen3_moe fp32 sgd", M["qwen3_moe"], _t(optimizer="sgd")),
    ("qwen3_moe amp-bf16 adamw full-ckpt", M["qwen3_moe"], _t(precision="amp-bf16", **FULL)),
    ("qwen3_moe bf16 adamw b4 s128", M["qwen3_moe"], _t(precision="bf16", micro_batch_size=4, sequence_length=128)),
    # amp-fp16 (GradScaler) and mixed-* (fp32 master weights; fp16 with a static loss scale)
    ("gpt2 amp-fp16 adamw", M["gpt2"], _t(precision="amp-fp16")),
    ("gpt2 mixed-bf16 sgd", M["gpt2"], _t(precision="mixed-bf16", optimizer="sgd")),
    ("gpt2 mixed-fp16 adamw full-ckpt", M["gpt2"], _t(precision="mixed-fp16", **FULL)),
    ("llama amp-fp16 adamw", M["llama"], _t(precision="amp-fp16")),
    ("llama amp-fp16 sgd full-ckpt", M["llama"], _t(precision="amp-fp16", optimizer="sgd", **FULL)),
    ("llama mixed-bf16 adamw", M["llama"], _t(precision="mixed-bf16")),
    ("llama mixed-fp16 sgd eager", M["llama"], _t(precision="mixed-fp16", optimizer="sgd", attention="eager")),
    ("qwen2 mixed-bf16 adamw fused", M["qwen2"], _t(precision="mixed-bf16", optimizer_implementation="fused")),
    ("mixtral amp-fp16 sgd", M["mixtral"], _t(precision="amp-fp16", optimizer="sgd")),
    ("mixtral mixed-bf16 adamw", M["mixtral"], _t(precision="mixed-bf16")),
    ("mixtral mixed-fp16 sgd", M["mixtral"], _t(precision="mixed-fp16", optimizer="sgd")),
    ("qwen3_moe mixed-bf16 adamw full-ckpt", M["qwen3_moe"], _t(precision="mixed-bf16", **FULL)),
]

_FS = dict(micro_batch_size=1, sequence_length=1024)
TRACED = [
    ("Llama-3.1-8B amp-bf16 adamw b1 s1024", "llama-3.1-8b", _t(precision="amp-bf16", **_FS)),
    ("Mistral-7B bf16 adamw b1 s1024 full-ckpt", "mistral-7b-v0.1", _t(precision="bf16", **_FS, **FULL)),
    ("Qwen2.5-7B amp-bf16 sgd b1 s1024", "qwen2.5-7b", _t(precision="amp-bf16", optimizer="sgd", **_FS)),
    ("GPT-2 XL amp-bf16 adamw b2 s1024", "gpt2-xl-hf", _t(precision="amp-bf16", micro_batch_size=2, sequence_length=1024)),
    ("Mixtral-8x7B bf16 sgd b1 s1024", "mixtral-8x7b", _t(precision="bf16", optimizer="sgd", **_FS)),
]


DEVICE = "cpu"


def _reference_err(model: dict, training: dict, measured_total: int) -> str:
    """The reference step's estimate of the same architecture against the transformers step."""
    tr = {k: v for k, v in training.items() if k not in ("implementation", "transformers")}
    try:
        est = estimate_memory(MemoryRequest(model=model, training=tr), device=DEVICE,
                              explain=False)
    except ValueError:
        return "n/a"
    return _pct((est.breakdown.total - measured_total) / measured_total)


def rows(quick: bool, traced: bool, only: str | None = None):
    real = REAL[::4] if quick else REAL
    if only is not None:  # the rows whose label matches (e.g. the precision rows)
        real = [r for r in real if re.search(only, r[0])]
    table = [(label, {"hf_config": m}, tr, "real") for label, m, tr in real]
    if traced:
        table += [(label, {"preset": p}, tr, "traced") for label, p, tr in
                  (TRACED[:1] if quick else TRACED)]
    for label, model, training, mode in table:
        req = ValidationRequest(model=model, training=training, mode=mode,
                                steps=3 if mode == "real" else 2,
                                device=DEVICE if mode == "real" else "cpu")
        t0 = time.perf_counter()
        res = run_validation(req)
        yield label, mode, model, training, res, time.perf_counter() - t0


_COST = """
import sys, time, warnings, json
warnings.filterwarnings("ignore")
t0 = time.perf_counter()
import transformers  # noqa: F401
from planner.catalog.specs import MemoryRequest
from planner.routes.memory import estimate_memory
t1 = time.perf_counter()
req = MemoryRequest.model_validate_json(sys.argv[1])
estimate_memory(req, device="cpu")
t2 = time.perf_counter()
estimate_memory(req.model_copy(update={"training": req.training.model_copy(
    update={"micro_batch_size": req.training.micro_batch_size})}), device="cpu")
t3 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2]))
"""


def first_request_costs() -> list[str]:
    """Each full-size row's estimate in a fresh process: the transformers import, the first
    estimate (three proxy traces), a repeat (cached)."""
    import json
    import subprocess

    out = ["", "## First-request cost of the full-size estimates (fresh process each)", "",
           "| config | import transformers s | first estimate s | repeat s |",
           "|---|---:|---:|---:|"]
    for label, preset, tr in TRACED:
        body = MemoryRequest(model={"preset": preset}, training=tr).model_dump_json()
        res = subprocess.run([sys.executable, "-c", _COST, body], capture_output=True,
                             text=True, check=True)
        imp, first, again = json.loads(res.stdout.strip().splitlines()[-1])
        out.append(f"| {label} | {imp:.1f} | {first:.1f} | {again:.4f} |")
        print(out[-1], flush=True)
    return out


def _device_name() -> str:
    if DEVICE == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return "CPU"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.3f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the rows")
    ap.add_argument("--no-traced", action="store_true", help="skip the full-size traced rows")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the real rows run (and what the estimate describes)")
    ap.add_argument("--only", help="only the real rows whose label matches this regex "
                    "(e.g. 'fp16|mixed'); with --no-traced, a part of the table")
    ap.add_argument("--cost-only", action="store_true", help="only the first-request cost "
                    "table (appended to --out)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if args.cost_only:
        lines = first_request_costs()
        if args.out:
            with open(args.out, "a") as f:
                f.write("\n".join(lines) + "\n")
        return 0
    lines = [
        "# Accuracy: implementation 'transformers' vs the measured transformers step "
        f"({_device_name()})",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}; steady-state step (step 2+); "
        "bytes; error = (estimate - measured) / measured. Real rows: the whole model run on "
        f"the {DEVICE.upper()} (the storage meter; tensors, not allocator blocks); traced rows: the whole full-size model under FakeTensorMode. The estimate: "
        "one- to three-block proxies traced and extrapolated.",
        "Goal: byte-exact on >= 90% of rows, every category within 1% on all.",
        "",
        "| config | mode | peak | measured total | estimate total | " +
        " | ".join(f"err {c}" for c in CATS) + " | first-step err | reference err | s |",
        "|---|---|---|---:|---:|" + "---:|" * len(CATS) + "---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    n = exact = 0
    worst = 0.0
    for label, mode, model, training, r, dt in rows(args.quick, not args.no_traced, args.only):
        errs = r.relative_error.model_dump()
        first = (r.first_step_estimate.total - r.first_step_measured.total) / \
            r.first_step_measured.total
        n += 1
        exact += r.estimate == r.measured and r.first_step_estimate == r.first_step_measured
        worst = max([worst] + [abs(errs[c]) for c in CATS if errs[c] is not None])
        cfg = model.get("hf_config") or hf_presets()[model["preset"]]
        ref = _reference_err(model, training, r.measured.total) \
            if cfg["model_type"] in ("gpt2", "llama") else "n/a"
        line = (f"| {label} | {mode} | {r.peak_phase}: {r.peak_op} | {r.measured.total:,} | "
                f"{r.estimate.total:,} | " + " | ".join(_pct(errs[c]) for c in CATS) +
                f" | {_pct(first)} | {ref} | {dt:.1f} |")
        lines.append(line)
        print(line, flush=True)
    ok = exact >= 0.9 * n and worst <= 0.01
    summary = ["", f"{n} rows; {exact} byte-exact (first and steady step, every category); "
               f"worst |category error| {100 * worst:.4f}% (goal 1%): {'PASS' if ok else 'FAIL'}"]
    lines += summary
    print("\n".join(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
