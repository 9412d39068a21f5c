"""Allocator traces of selected GPU campaign rows, for finding where a row's measured peak differs
from the estimate.

    bash benchmarks/gpu_campaign.sh trace            # on the GPU machine (wheels as for the campaign)
    python benchmarks/gpu_trace.py --dry-run         # the same rows, tiny, on the CPU (no trace)

For each row it runs the reference step (3 steps, as the campaign does) with
``torch.cuda.memory._record_memory_history`` on, and writes ``$OUT/trace-<n>.json.gz``: the
measured peaks, and every allocator event of the step (action, address, size, the innermost Python
frames of the project or of torch.nn). ``benchmarks/allocator_sim.py`` replays such a trace through
the planner's model of the CUDA caching allocator. ``$OUT/sdpa.json`` records which attention kernel
``scaled_dot_product_attention`` runs forward and backward per dtype, grouped-query heads and
dropout, with inputs that require gradients (the training case).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks import gpu_campaign as G

ROWS: list[tuple[str, tuple[str, str], dict]] = [
    ("llama-medium bf16 adamw selective sdpa dropout=0.1", ("llama", "medium"),
     G._t("bf16", "adamw", 2, 1024, "selective", attention="sdpa", dropout=0.1)),
    ("llama-medium fp32 adamw full eager dropout=0.1", ("llama", "medium"),
     G._t("fp32", "adamw", 2, 1024, "full", attention="eager", dropout=0.1)),
    ("gpt2-small amp-bf16 adamw none eager dropout=0", ("gpt2", "small"),
     G._t("amp-bf16", "adamw", 4, 512, "none", attention="eager", dropout=0.0)),
    ("llama-medium fp32 adamw none sdpa dropout=0.1", ("llama", "medium"),
     G._t("fp32", "adamw", 2, 1024, "none", attention="sdpa", dropout=0.1)),
    ("gpt2-medium mixed-bf16 sgd-momentum none sdpa dropout=0.1", ("gpt2", "medium"),
     G._t("mixed-bf16", "sgd-momentum", 2, 1024, "none", attention="sdpa", dropout=0.1)),
]
KEEP_FRAMES = 4


def _frames(frames: list[dict]) -> list[str]:
    out = []
    for f in frames:
        fn = f.get("filename", "")
        if "/planner/" in fn or "/service/" in fn or "/torch/nn/" in fn or "/torch/optim/" in fn \
                or "/torch/autograd/" in fn or "/torch/utils/checkpoint" in fn or "/torch/distributed/" in fn:
            out.append(f"{fn.rsplit('/', 2)[-2]}/{fn.rsplit('/', 1)[-1]}:{f.get('line')}:{f.get('name')}")
        if len(out) >= KEEP_FRAMES:
            break
    return out


def traced(c: G.Campaign, label: str, fn) -> dict:
    G._cleanup(c)
    rec = c.cuda
    if rec:
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=3_000_000)
    t = time.perf_counter()
    err = None
    try:
        res = fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the next row runs
        res, err = {}, f"{type(exc).__name__}: {str(exc)[:500]}"
    out: dict[str, Any] = {"label": label, "result": res, "error": err,
                           "seconds": round(time.perf_counter() - t, 2)}
    if rec:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        dev = torch.cuda.current_device()
        events = []
        for e in snap["device_traces"][dev]:
            events.append([e["action"], e.get("addr"), e.get("size"), e.get("stream"),
                           _frames(e.get("frames") or [])])
        out["events"] = events
        out["allocator_settings"] = snap.get("allocator_settings")
    G._cleanup(c)
    return out


def sdpa_probe(dev: torch.device) -> list[dict]:
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    rows = []
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for gqa in (False, True):
            for p in (0.0, 0.1):
                for hd in (64, 96):
                    r: dict[str, Any] = {"dtype": name, "gqa": gqa, "dropout": p, "head_dim": hd}
                    try:
                        q = torch.randn(2, 8, 128, hd, device=dev, dtype=dt, requires_grad=True)
                        k = torch.randn(2, 2 if gqa else 8, 128, hd, device=dev, dtype=dt, requires_grad=True)
                        v = torch.randn(2, 2 if gqa else 8, 128, hd, device=dev, dtype=dt, requires_grad=True)
                        with Ops() as fw:
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                                               enable_gqa=gqa)
                        with Ops() as bw:
                            o.sum().backward()
                        r["forward"] = sorted(set(fw.names))
                        r["backward"] = sorted(set(bw.names))
                    except Exception as exc:  # noqa: BLE001
                        r["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-trace-out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run or not torch.cuda.is_available()
    dev = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    c = G.Campaign(out=out / "rows", dry=dry, quick=True, dev=dev, header={})
    c.deadlines = {s: float("inf") for s in G.SECTIONS}
    (out / "sdpa.json").write_text(json.dumps(sdpa_probe(c.dev), indent=1))
    if not dry:
        G._warm_up(c)
    models = G.TINY_MODELS if dry else G.DEVICE_MODELS
    for n, (label, key, training) in enumerate(ROWS):
        if dry:
            training = {**training, "micro_batch_size": 2, "sequence_length": 32}
        req = G._vreq(c, models[key], training)
        rec = traced(c, label, lambda req=req: G.measure_row(c, req))
        with gzip.open(out / f"trace-{n}.json.gz", "wt") as f:
            json.dump(rec, f)
        print(f"{label}: {rec['error'] or 'ok'} {len(rec.get('events', []))} events {rec['seconds']} s",
              flush=True)
    model = G.TINY_MODELS[("gpt2", "small")] if dry else dict(preset="gpt2")
    training = G._t("amp-bf16", "adamw", 2 if dry else 4, 32 if dry else 512)
    rec = traced(c, "offload gpt2 amp-bf16 adamw", lambda: G.offload_row(c, model, training))
    with gzip.open(out / f"trace-{len(ROWS)}.json.gz", "wt") as f:
        json.dump(rec, f)
    print(f"offload: {rec['error'] or 'ok'} {len(rec.get('events', []))} events", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
