"""GPU accuracy campaign: the planner's ``cuda`` estimates against the reference step on one GPU.

One run, one device, every table the CUDA accuracy report needs (rows = the planner's estimate for
device ``cuda`` against a measurement of the reference step of ``service/validation``):

1. **single-device** - a fractional-factorial subset of {gpt2, llama} x {small, medium} x every
   precision preset x {adamw, adam-8bit (bitsandbytes), sgd-momentum, adafactor} x checkpointing
   {none, full, selective} x attention {sdpa, eager} x dropout {0, 0.1}: every level of every factor
   appears several times and the pairs of levels are spread as widely as the row count allows.
   Measured with ``service.validation.runner.measure`` (the validation job's own step and meter):
   ``torch.cuda.max_memory_allocated`` of the first and of the steady-state step,
   ``max_memory_reserved``, ``num_alloc_retries``, and the storage meter's per-category peak.
   Estimated with ``planner.routes.memory.estimate_memory(device="cuda")``: the peak and
   ``allocator_reserve_bytes``. Goals: allocated peak within 1% (byte-exact on most rows),
   reserved within 10% of peak + reserve.
2. **full-size** - GPT-2 XL and Llama-2-7B with full checkpointing, where the planner says they fit.
3. **max-micro-batch** - the largest micro-batch the planner says fits this device's free memory:
   does it run, and does the next one raise ``torch.cuda.OutOfMemoryError``.
4. **offload** - FSDP2 ``CPUOffloadPolicy`` on one rank (a world-size-1 NCCL group started in this
   process; the rank program of ``service.validation.distributed``): device and host bytes against
   the offload row of ``planner.routes.zero.zero_stages`` (``POST /v1/zero``).
5. **step-time** - forward, input-gradient and weight-gradient time of one transformer block (CUDA
   events; weight-gradient = full backward - input-gradient backward) against the roofline costs
   ``planner.routes.pipeline.roofline_costs`` gives ``POST /v1/pipeline``.

Every row is guarded: a failure is recorded with its error and the campaign goes on; each section
has a time budget (rows that would start after it are recorded as skipped), and the tables are
rewritten after every row, so an interrupted run still leaves what it measured. Output:
``$OUT/accuracy-cuda.md`` (tables) and ``$OUT/accuracy-cuda.json`` (raw rows); ``$OUT`` defaults
to ``./gpu-campaign-out``.

    python -m benchmarks.gpu_campaign              # on a GPU: about 4 minutes on one H100
    python -m benchmarks.gpu_campaign --quick      # fewer rows: about 2 minutes
    python -m benchmarks.gpu_campaign --dry-run    # every row on the CPU at tiny sizes (< 1 min)

On a GPU machine without pydantic (the planner's one dependency besides numpy), carry the wheels:
``benchmarks/gpu_campaign.sh download`` fetches them into ``.whl/`` (ignored by git, ~3 MiB) on a
machine with an index; then, from the repository root on the GPU machine::

    bash benchmarks/gpu_campaign.sh device [--quick]

which is this one line (installs the wheels into /tmp/site, no index needed)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
        python3 benchmarks/gpu_campaign.py

With the project's device tool: ``run(command="bash benchmarks/gpu_campaign.sh device",
carry=[".whl"], timeout_s=480)`` (``--quick`` for a rerun, ``timeout_s=240``); the tables come
back under ``$OUT`` and are committed as ``benchmarks/results/accuracy-cuda.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: python3 benchmarks/gpu_campaign.py
    sys.path.insert(0, str(ROOT))

import torch

from planner.catalog.presets import resolve_model
from planner.routes.memory import estimate_memory
from planner.routes.pipeline import DEFAULT_MFU, roofline_costs
from planner.step.program import PRECISIONS
from planner.catalog.specs import (
    HardwareSpec,
    MemoryRequest,
    ModelSpec,
    OptimizerName,
    ParallelSpec,
    Precision,
    TrainingSpec,
    ValidationRequest,
)
from planner.layouts.sharding import shard_model_states
from planner.routes.zero import zero_stages
from service.validation import step as S
from service.validation.meter import _storages
from service.validation.runner import check_supported, measure

CATS = ("parameters", "gradients", "optimizer_states", "activations", "temporaries")
SECTIONS = ("single-device", "full-size", "max-micro-batch", "offload", "step-time")
REPLAY_TORCH = "2.13"  # the torch version the replay was validated against, byte for byte (CPU)

# ---- models and sizes -------------------------------------------------------------------------
# Device sizes: each single-device row is a few seconds at most on one H100.
DEVICE_MODELS: dict[tuple[str, str], dict] = {
    ("gpt2", "small"): dict(preset="gpt2"),  # 124M
    ("gpt2", "medium"): dict(preset="gpt2-medium"),  # 355M
    ("llama", "small"): dict(family="llama", num_layers=8, hidden_size=768, num_heads=12,
                             num_kv_heads=4, ffn_hidden_size=2048, vocab_size=32000,
                             max_sequence_length=2048),
    ("llama", "medium"): dict(family="llama", num_layers=16, hidden_size=1024, num_heads=16,
                              num_kv_heads=4, ffn_hidden_size=2816, vocab_size=32000,
                              max_sequence_length=2048),
}
DEVICE_SIZES = {"small": (4, 512), "medium": (2, 1024)}  # (micro-batch, sequence)
# Dry-run stand-ins: the same rows at sizes a CPU runs in milliseconds.
TINY_MODELS: dict[tuple[str, str], dict] = {
    ("gpt2", "small"): dict(family="gpt2", num_layers=2, hidden_size=64, num_heads=4,
                            vocab_size=256, max_sequence_length=64),
    ("gpt2", "medium"): dict(family="gpt2", num_layers=2, hidden_size=96, num_heads=4,
                             vocab_size=384, max_sequence_length=64),
    ("llama", "small"): dict(family="llama", num_layers=2, hidden_size=64, num_heads=4,
                             num_kv_heads=2, ffn_hidden_size=176, vocab_size=256,
                             max_sequence_length=64),
    ("llama", "medium"): dict(family="llama", num_layers=2, hidden_size=96, num_heads=6,
                              num_kv_heads=2, ffn_hidden_size=256, vocab_size=384,
                              max_sequence_length=64),
}
TINY_SIZES = {"small": (2, 32), "medium": (2, 48)}
TINY_XL = TINY_MODELS[("gpt2", "medium")]
TINY_7B = TINY_MODELS[("llama", "medium")]


def _t(precision: str, optimizer: str, b: int, s: int, ckpt: str = "none", **kw: Any) -> dict:
    return dict(precision=precision, optimizer=optimizer, micro_batch_size=b, sequence_length=s,
                activation_checkpointing={"strategy": ckpt}, **kw)


# (label, model on the device, training on the device, tiny model, tiny training)
FULL_SIZE = [
    ("gpt2-xl amp-bf16 adamw b8 s1024 full-ckpt", dict(preset="gpt2-xl"),
     _t("amp-bf16", "adamw", 8, 1024, "full"), TINY_XL, _t("amp-bf16", "adamw", 2, 48, "full")),
    ("llama-2-7b bf16 adamw b1 s4096 full-ckpt", dict(preset="llama-2-7b"),
     _t("bf16", "adamw", 1, 4096, "full"), TINY_7B, _t("bf16", "adamw", 1, 64, "full")),
]
# Setups whose largest fitting micro-batch is small, so that it and the next run in seconds.
MAX_BATCH = [
    ("gpt2-xl amp-bf16 adamw s1024", dict(preset="gpt2-xl"), _t("amp-bf16", "adamw", 1, 1024),
     TINY_XL, _t("amp-bf16", "adamw", 1, 48)),
    ("llama-2-7b bf16 adamw s4096", dict(preset="llama-2-7b"), _t("bf16", "adamw", 1, 4096),
     TINY_7B, _t("bf16", "adamw", 1, 64)),
]
OFFLOAD = [
    ("gpt2 amp-bf16 adamw b4 s512", DEVICE_MODELS[("gpt2", "small")], _t("amp-bf16", "adamw", 4, 512),
     TINY_MODELS[("gpt2", "small")], _t("amp-bf16", "adamw", 2, 32)),
    ("llama-small bf16 adamw b4 s512", DEVICE_MODELS[("llama", "small")], _t("bf16", "adamw", 4, 512),
     TINY_MODELS[("llama", "small")], _t("bf16", "adamw", 2, 32)),
]
STEP_TIME = [
    ("gpt2-medium block amp-bf16 b4 s1024", dict(preset="gpt2-medium"), _t("amp-bf16", "adamw", 4, 1024),
     TINY_MODELS[("gpt2", "medium")], _t("amp-bf16", "adamw", 2, 48)),
    ("llama-medium block amp-bf16 b4 s1024", DEVICE_MODELS[("llama", "medium")],
     _t("amp-bf16", "adamw", 4, 1024), TINY_MODELS[("llama", "medium")], _t("amp-bf16", "adamw", 2, 48)),
    ("gpt2-xl block amp-bf16 b8 s1024", dict(preset="gpt2-xl"), _t("amp-bf16", "adamw", 8, 1024),
     TINY_XL, _t("amp-bf16", "adamw", 2, 48)),
    ("llama-2-7b block bf16 b1 s4096", dict(preset="llama-2-7b"), _t("bf16", "adamw", 1, 4096),
     TINY_7B, _t("bf16", "adamw", 1, 64)),
    ("llama-2-7b block bf16 b1 s4096 eager", dict(preset="llama-2-7b"),
     _t("bf16", "adamw", 1, 4096, attention="eager"), TINY_7B,
     _t("bf16", "adamw", 1, 64, attention="eager")),
]

# Section time budgets in seconds (cumulative deadlines: time a section leaves is the next one's).
BUDGET_S = {"full": dict(zip(SECTIONS, (130, 60, 70, 30, 25))),
            "quick": dict(zip(SECTIONS, (45, 25, 25, 12, 10)))}
ROW_LIMIT_S = {"single-device": 40, "full-size": 90, "max-micro-batch": 90, "offload": 90,
               "step-time": 40}


# ---- the fractional-factorial design ------------------------------------------------------------
def optimizer_levels() -> tuple[list[str], str | None]:
    """Optimizers of the design, and why adam-8bit is left out (None when it is in)."""
    names = typing.get_args(OptimizerName)
    wanted = [o for o in ("adamw", "adam-8bit", "sgd-momentum", "adafactor") if o in names]
    reason = _bnb_missing()
    if reason is not None and "adam-8bit" in wanted:
        wanted.remove("adam-8bit")
    return wanted, reason


def _bnb_missing() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means no 8-bit optimizer
        return f"bitsandbytes not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def factors(optimizers: list[str]) -> list[tuple[str, list]]:
    return [("family", ["gpt2", "llama"]), ("size", ["small", "medium"]),
            ("precision", list(typing.get_args(Precision))), ("optimizer", optimizers),
            ("checkpointing", ["none", "full", "selective"]), ("attention", ["sdpa", "eager"]),
            ("dropout", [0.0, 0.1])]


def design(n: int, facs: list[tuple[str, list]], tries: int = 400) -> list[dict]:
    """``n`` rows: every factor's column balanced (each level ``n / levels`` times, give or take
    one), columns permuted by seeded shuffles; of ``tries`` seeds the one covering the most
    distinct level pairs over all factor pairs is kept (deterministic)."""
    best: tuple[int, list[list]] | None = None
    for seed in range(tries):
        rng = random.Random(seed)
        cols = []
        for _, levels in facs:
            col = [levels[i % len(levels)] for i in range(n)]
            rng.shuffle(col)
            cols.append(col)
        score = sum(len(set(zip(cols[a], cols[b])))
                    for a in range(len(cols)) for b in range(a + 1, len(cols)))
        if best is None or score > best[0]:
            best = (score, cols)
    assert best is not None
    # kept in shuffled order: rows cut by the time budget are spread over every level
    return [dict(zip([f for f, _ in facs], vals)) for vals in zip(*best[1])]


# ---- the run's context ---------------------------------------------------------------------------
@dataclass
class Campaign:
    out: Path
    dry: bool
    quick: bool
    dev: torch.device
    header: dict
    rows: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    deadlines: dict[str, float] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def est_device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def pick(self, dev_value: Any, tiny_value: Any) -> Any:
        return tiny_value if self.dry else dev_value

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"header": self.header, "rows": self.rows}
        (self.out / "accuracy-cuda.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (self.out / "accuracy-cuda.md").write_text(render_markdown(self.header, self.rows))


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based wall-clock limit for one row (main thread only; no-op elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row exceeded its {seconds:g} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _cleanup(c: Campaign) -> str | None:
    """Free what a row left to the collector and hand cached blocks back; the error, if the device
    is in one (a failed kernel poisons the context: later rows then fail with it, recorded)."""
    if not c.cuda:
        return None
    try:
        gc.collect()
        torch.cuda.synchronize(c.dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(c.dev)
        torch.cuda.reset_accumulated_memory_stats(c.dev)
    except Exception as exc:  # noqa: BLE001 - reported by the row that runs next
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def guarded(c: Campaign, section: str, label: str, fn: Callable[[], dict]) -> dict:
    """Run one row: its result, or its error; never raises (the campaign goes on)."""
    row: dict[str, Any] = {"section": section, "label": label}
    if not c.dry and time.perf_counter() > c.deadlines[section]:
        row.update(status="skipped", reason="section time budget spent")
    else:
        broken = _cleanup(c)
        t, cpu = time.perf_counter(), time.process_time()
        try:
            if broken:
                raise RuntimeError(f"device unusable before the row: {broken}")
            with _time_limit(0 if c.dry else ROW_LIMIT_S[section]):
                row.update(fn())
            row.setdefault("status", "ok")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded row
            row.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:600]}",
                       traceback=traceback.format_exc()[-3000:])
            traceback.clear_frames(exc.__traceback__)
            del exc
        row["seconds"] = round(time.perf_counter() - t, 2)
        row["cpu_seconds"] = round(time.process_time() - cpu, 2)
        _cleanup(c)
    c.rows.append(row)
    c.write()
    status = row["status"] + (f" ({row.get('error') or row.get('reason')})"
                              if row["status"] != "ok" else "")
    print(f"[{time.perf_counter() - c.t0:6.1f}s] {section}: {label}: {status}", flush=True)
    return row


# ---- measurement helpers -------------------------------------------------------------------------
def _baseline(c: Campaign) -> tuple[int, int]:
    if not c.cuda:
        return 0, 0
    return torch.cuda.memory_allocated(c.dev), torch.cuda.memory_reserved(c.dev)


def _rel(est: float | None, meas: float | None) -> float | None:
    if est is None or meas is None:
        return None
    if meas == 0:
        return 0.0 if est == 0 else None
    return (est - meas) / meas


@contextlib.contextmanager
def _adam8bit():
    """Let the reference step build bitsandbytes' Adam8bit for 'adam-8bit' (torch.optim has none);
    everything else in the step is unchanged."""
    import bitsandbytes as bnb

    orig = S.make_optimizer

    def make(training, params):
        if training.optimizer == "adam-8bit":
            return bnb.optim.Adam8bit(params, lr=1e-4)
        return orig(training, params)

    S.make_optimizer = make
    try:
        yield
    finally:
        S.make_optimizer = orig


def measure_row(c: Campaign, req: ValidationRequest) -> dict:
    """Estimate (device cuda, or cpu in a dry run) and measure one setup."""
    est = estimate_memory(req, device=c.est_device, allocator=True)  # the allocator replayed
    if req.training.optimizer == "adam-8bit":
        ctx: Any = _adam8bit()
    else:
        check_supported(req)
        ctx = contextlib.nullcontext()
    base_alloc, base_res = _baseline(c)
    with ctx:
        m = measure(req)
    steady, first = m["steady"], m["first"]
    out: dict[str, Any] = {
        "est_total": est.breakdown.total, "est_first": est.first_step.total if est.first_step else None,
        "est_reserve": est.allocator_reserve_bytes, "est_peak_phase": est.peak_phase,
        "est_breakdown": est.breakdown.model_dump(),
        "meter_total": steady["breakdown"]["total"], "meter_first": first["breakdown"]["total"],
        "meter_breakdown": steady["breakdown"], "meter_peak": f"{steady['phase']}: {steady['op']}",
        "baseline_allocated": base_alloc, "baseline_reserved": base_res,
        "step_time_s": m["step_time_s"],
    }
    # what max_memory_allocated reports: the allocator's blocks (cuda_allocator, simulated),
    # else the tensors' bytes
    ca = est.cuda_allocator
    out["est_blocks"] = ca.allocated_bytes if ca is not None else out["est_total"]
    out["est_blocks_first"] = ca.first_step_allocated_bytes if ca is not None else out["est_first"]
    out["err_meter"] = _rel(out["est_total"], out["meter_total"])
    out["err_meter_first"] = _rel(out["est_first"], out["meter_first"])
    cat_errs = {k: _rel(est.breakdown.model_dump()[k], steady["breakdown"][k]) for k in CATS}
    out["err_categories"] = cat_errs
    if c.cuda:
        alloc = steady["cuda_allocated"] - base_alloc
        alloc_first = first["cuda_allocated"] - base_alloc
        reserved = m["max_reserved_bytes"] - base_res
        out.update(alloc_steady=alloc, alloc_first=alloc_first, reserved=reserved,
                   alloc_retries=m["num_alloc_retries"],
                   err_alloc=_rel(out["est_blocks"], alloc),
                   err_alloc_first=_rel(out["est_blocks_first"], alloc_first),
                   err_reserved=_rel(out["est_total"] + out["est_reserve"], reserved),
                   alloc_minus_meter=alloc - out["meter_total"])
    return out


def _hw(mem: int) -> HardwareSpec:
    return HardwareSpec(memory_bytes=mem, allocator="replay")


def _vreq(c: Campaign, model: dict, training: dict, steps: int = 3) -> ValidationRequest:
    return ValidationRequest(model=model, training=training, mode="real", steps=steps,
                             device="cuda" if c.cuda else "cpu")


# ---- section 1: single device ---------------------------------------------------------------------
def single_device(c: Campaign) -> None:
    opts, bnb_reason = optimizer_levels()
    n = 12 if c.quick else 36
    rows = design(n, factors(opts))
    c.header["design"] = {"rows": n, "factors": {f: [str(v) for v in lv] for f, lv in factors(opts)}}
    models = TINY_MODELS if c.dry else DEVICE_MODELS
    sizes = TINY_SIZES if c.dry else DEVICE_SIZES
    for r in rows:
        b, s = sizes[r["size"]]
        label = (f"{r['family']}-{r['size']} {r['precision']} {r['optimizer']} "
                 f"ckpt={r['checkpointing']} {r['attention']} dropout={r['dropout']:g} b{b} s{s}")
        training = _t(r["precision"], r["optimizer"], b, s, r["checkpointing"],
                      attention=r["attention"], dropout=r["dropout"])
        req = _vreq(c, models[(r["family"], r["size"])], training)
        guarded(c, "single-device", label,
                lambda req=req, r=r: {"factors": dict(r), **measure_row(c, req)})
    if bnb_reason is not None:
        c.rows.append({"section": "single-device", "label": "adam-8bit (every row)",
                       "status": "skipped", "reason": bnb_reason})
        c.write()


# ---- section 2: full size -------------------------------------------------------------------------
def usable_bytes(c: Campaign) -> int | None:
    """Bytes this process can still get on the device: free memory plus what the allocator holds."""
    if not c.cuda:
        return None
    _cleanup(c)
    free, _ = torch.cuda.mem_get_info(c.dev)
    return free + torch.cuda.memory_reserved(c.dev)


def run_table(c: Campaign, section: str, table: list[tuple], row_fn: Callable[..., dict],
              quick_rows: int) -> None:
    """One guarded row per entry of ``table``: (label, model, training, tiny model, tiny training)."""
    for label, model, training, tiny_model, tiny_training in table[: quick_rows if c.quick else None]:
        guarded(c, section, c.pick(label, label + " (tiny stand-in)"),
                functools.partial(row_fn, c, c.pick(model, tiny_model), c.pick(training, tiny_training)))


def full_size_row(c: Campaign, model: dict, training: dict) -> dict:
    req = _vreq(c, model, training)
    mem = usable_bytes(c)
    if mem is not None:
        fit = estimate_memory(req.model_copy(update={"hardware": _hw(mem)}),
                              device=c.est_device).fit
        if fit is not None and not fit.fits:
            return {"status": "skipped", "usable_bytes": mem,
                    "reason": f"the planner says it does not fit: headroom "
                              f"{fit.headroom_bytes:,} B of {mem:,} B usable"}
    return {"usable_bytes": mem, **measure_row(c, req)}


# ---- section 3: the largest micro-batch that fits ---------------------------------------------------
def max_batch_row(c: Campaign, model: dict, training: dict) -> dict:
    base = MemoryRequest(model=model, training=training)

    def need(b: int) -> int:
        tr = base.training.model_copy(update={"micro_batch_size": b})
        r = estimate_memory(base.model_copy(update={"training": tr}), device=c.est_device,
                            allocator=True)
        return r.breakdown.total + r.allocator_reserve_bytes

    # On the CPU nothing runs out of memory: a budget just under the need of b=3 stands in for the
    # device (the planner then answers 2) and "fits" is the measured peak <= budget.
    mem = usable_bytes(c) if c.cuda else need(3) - 1
    est = estimate_memory(base.model_copy(update={"hardware": _hw(mem)}),
                          device=c.est_device)
    bstar = est.fit.max_micro_batch_size if est.fit else None
    out: dict[str, Any] = {"memory_bytes": mem, "max_micro_batch": bstar}
    if bstar is None:
        return {**out, "status": "skipped", "reason": "the planner says not even 1 fits"}
    out["need_at_max"], out["need_at_next"] = need(bstar), need(bstar + 1)
    for key, b in (("at_max", bstar), ("at_next", bstar + 1)):
        tr = {**training, "micro_batch_size": b}
        try:
            r = measure_row(c, _vreq(c, model, tr, steps=2))
            out[key] = {k: r.get(k) for k in ("alloc_steady", "alloc_first", "reserved",
                                              "alloc_retries", "meter_total", "meter_first",
                                              "est_total", "err_alloc", "err_meter")}
            if c.cuda:
                out[key]["oom"] = False
            else:
                out[key]["oom"] = max(r["meter_total"], r["meter_first"]) > mem  # the device's answer
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            out[key] = {"oom": True, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            traceback.clear_frames(exc.__traceback__)
            del exc
        _cleanup(c)
    out["verdict"] = ("exact" if not out["at_max"]["oom"] and out["at_next"]["oom"] else
                      "too optimistic" if out["at_max"]["oom"] else "too cautious")
    return out


def _is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or an OOM a library reports as a RuntimeError (cuBLAS, cuDNN)."""
    msg = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in msg.lower() or \
        "ALLOC_FAILED" in msg


# ---- section 4: CPU offload (FSDP2 CPUOffloadPolicy, one rank) -------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        for st in _storages(t):
            if st.device.type == "cpu":
                seen[st.data_ptr()] = int(st.nbytes())
    return sum(seen.values())


def offload_row(c: Campaign, model: dict, training: dict) -> dict:
    import torch.distributed as dist

    from service.validation import distributed as D

    par = ParallelSpec(zero_stage=3, offload_optimizer=True, offload_parameters=True)
    req = ValidationRequest(model=model, training=training, parallelism=par, mode="real", steps=3,
                            device="cuda" if c.cuda else "cpu")
    # the planner: POST /v1/zero's last row (stage 3, parameters and optimizer on the CPU)
    zr = zero_stages(MemoryRequest(model=model, training=training))
    row = next(s for s in zr.stages if s.stage == 3 and s.offload_optimizer)
    ms = shard_model_states(resolve_model(ModelSpec(**model)), TrainingSpec(**training), par)
    est_device, est_host = row.breakdown.total, ms.offloaded_bytes
    # the rank program, in this process; S.build / S.optimizer_step wrapped only to read the
    # host-resident parameters, gradients and optimizer states it keeps
    host = {"parameters": 0, "gradients": 0, "optimizer_states": 0}
    setups: list[Any] = []
    orig_build, orig_step = S.build, S.optimizer_step

    def build(*a: Any, **k: Any) -> Any:
        s = orig_build(*a, **k)
        setups.append(s)
        return s

    def optimizer_step(s: Any) -> None:
        params = list(s.model.parameters())
        host["gradients"] = max(host["gradients"], _host_bytes([p.grad for p in params if p.grad is not None]))
        orig_step(s)
        states = [v for st in s.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        host["optimizer_states"] = max(host["optimizer_states"], _host_bytes(states))
        host["parameters"] = max(host["parameters"], _host_bytes(params))

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    S.build, S.optimizer_step = build, optimizer_step
    base_alloc, _ = _baseline(c)
    try:
        with tempfile.TemporaryDirectory(prefix="memplan-offload-") as tmp:
            spec, out = Path(tmp, "spec.json"), Path(tmp, "out.json")
            spec.write_text(req.model_dump_json())
            D.rank_main(str(spec), str(out))
            data = json.loads(out.read_text())
    finally:
        S.build, S.optimizer_step = orig_build, orig_step
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        setups.clear()
    r0 = data["ranks"][0]
    host_total = sum(host.values())
    res: dict[str, Any] = {
        "implementation": row.implementation, "est_device": est_device, "est_host": est_host,
        "est_breakdown": row.breakdown.model_dump(), "host_measured": host,
        "host_total": host_total, "err_host": _rel(est_host, host_total),
        "meter_total": r0["steady"]["breakdown"]["total"],
        "meter_breakdown": r0["steady"]["breakdown"], "meter_peak": f"{r0['steady']['phase']}: {r0['steady']['op']}",
    }
    if c.cuda:
        dev = r0["steady"]["cuda_allocated"] - base_alloc
        res.update(device_alloc=dev, device_alloc_first=r0["first"]["cuda_allocated"] - base_alloc,
                   err_device=_rel(est_device, dev))
    return res


# ---- section 5: step time per block ---------------------------------------------------------------
def gpu_catalog_name(c: Campaign) -> str:
    if not c.cuda:
        return "h100-80gb"
    name = torch.cuda.get_device_name(c.dev).upper()
    mem = torch.cuda.get_device_properties(c.dev).total_memory
    if "H200" in name:
        return "h200-141gb"
    if "A100" in name:
        return "a100-80gb" if mem > 50 * 2**30 else "a100-40gb"
    if "B200" in name:
        return "b200-192gb"
    return "h100-80gb"


def step_time_row(c: Campaign, model: dict, training: dict) -> dict:
    from service.validation.model import Block, rope_for, rope_tables

    n = 3 if c.dry else 10  # timed iterations, after two warm-up ones
    cfg = resolve_model(ModelSpec(**model))
    tr = TrainingSpec(**training)
    param_dtype, amp_dtype, _, _ = PRECISIONS[tr.precision]
    dt = S.TORCH_DTYPE[param_dtype]
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(c.dev):
            block = Block(cfg, tr.attention, 0.0)
    finally:
        torch.set_default_dtype(prev)
    block.train()
    B, T, h = tr.micro_batch_size, tr.sequence_length, cfg.hidden_size
    x = torch.randn(B, T, h, dtype=dt, device=c.dev, requires_grad=True)
    tables = rope_tables(cfg.max_sequence_length, cfg.head_dim) if cfg.family == "llama" else None
    tables = tuple(t.to(c.dev) for t in tables) if tables else None

    def autocast() -> Any:
        return (torch.autocast(c.dev.type, dtype=S.TORCH_DTYPE[amp_dtype]) if amp_dtype
                else contextlib.nullcontext())

    def forward() -> torch.Tensor:
        with autocast():
            rope = rope_for(tables[0], tables[1], T, x.dtype) if tables else None
            return block(x, rope)

    g = torch.randn_like(forward().detach())

    def timed(prep: Callable[[], Any], run: Callable[[Any], Any]) -> float:
        ts = []
        for i in range(n + 2):  # two warm-up iterations
            block.zero_grad(set_to_none=True)
            x.grad = None
            arg = prep()
            if c.cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(c.dev)
                e0.record()
                run(arg)
                e1.record()
                e1.synchronize()
                dt_s = e0.elapsed_time(e1) / 1e3
            else:
                t = time.perf_counter()
                run(arg)
                dt_s = time.perf_counter() - t
            if i >= 2:
                ts.append(dt_s)
            del arg
        return statistics.median(ts)

    f_s = timed(lambda: None, lambda _: forward())
    b_s = timed(forward, lambda y: torch.autograd.backward(y, g))
    i_s = timed(forward, lambda y: torch.autograd.grad(y, x, g))
    w_s = max(b_s - i_s, 0.0)
    gpu = gpu_catalog_name(c)
    setup = MemoryRequest(model=model, training=training, hardware=HardwareSpec(gpu=gpu))
    rf, ri, rw, *_ = roofline_costs(setup, cfg.num_layers, DEFAULT_MFU)
    pf, pi, pw, *_ = roofline_costs(setup, cfg.num_layers, 1.0)
    measured = f_s + b_s
    return {
        "gpu_catalog": gpu, "mfu_assumed": DEFAULT_MFU, "timer": "cuda events" if c.cuda else "perf_counter",
        "forward_s": f_s, "backward_s": b_s, "backward_input_s": i_s, "backward_weight_s": w_s,
        "roof_forward_s": rf[0], "roof_backward_input_s": ri[0], "roof_backward_weight_s": rw[0],
        "err_forward": _rel(rf[0], f_s), "err_backward_input": _rel(ri[0], i_s),
        "err_backward_weight": _rel(rw[0], w_s) if w_s > 0 else None,
        "err_total": _rel(rf[0] + ri[0] + rw[0], measured),
        "implied_mfu": (pf[0] + pi[0] + pw[0]) / measured if measured > 0 else None,
    }


# ---- header and tables ------------------------------------------------------------------------------
def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
            return f"CUDA driver API {v.value // 1000}.{v.value % 1000 // 10} (nvidia-smi unavailable)"
    except OSError:
        pass
    return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sdpa_kernels(dev: torch.device) -> dict[str, str]:
    """The attention kernel F.scaled_dot_product_attention dispatches to here, per dtype, with and
    without grouped-query heads (what the reference model's sdpa rows run; it decides what the
    forward saves), read from the aten ops a dispatch mode sees."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.add(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    out: dict[str, str] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for gqa in (False, True):
            key = name + (" gqa" if gqa else "")
            try:
                q = torch.randn(2, 8, 128, 64, device=dev, dtype=dt)  # (B, nh, T, hd)
                kv = torch.randn(2, 2 if gqa else 8, 128, 64, device=dev, dtype=dt)
                with Ops() as ops:
                    F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=gqa)
                fused = sorted(n for n in ops.names
                               if n.startswith(("_scaled_dot_product", "_flash", "_efficient")))
                out[key] = ", ".join(fused) or "math (" + ", ".join(sorted(ops.names)) + ")"
            except Exception as exc:  # noqa: BLE001 - a header detail, never fatal
                out[key] = f"probe failed: {type(exc).__name__}: {str(exc)[:100]}"
    return out


def make_header(dev: torch.device, mode: str) -> dict:
    import pydantic

    h: dict[str, Any] = {
        "mode": mode, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda, "pydantic": pydantic.VERSION,
        "cpu_count": os.cpu_count(), "commit": _commit(),
        "bitsandbytes": None if _bnb_missing() else __import__("bitsandbytes").__version__,
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        h.update(device=torch.cuda.get_device_name(dev), driver=_driver_version(),
                 device_memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                 cudnn=torch.backends.cudnn.version())
    else:
        h.update(device=f"cpu ({platform.machine()})", driver=None)
    h["sdpa_kernels"] = sdpa_kernels(dev)
    h["torch_note"] = (
        f"The replay (planner/) follows torch {REPLAY_TORCH}'s allocations and was validated "
        f"byte-exact against torch {REPLAY_TORCH} on the CPU; this run used torch "
        f"{torch.__version__}. A difference seen only here can come from that version gap "
        "(optimizer kernels, autograd's saved tensors) as well as from CUDA-only kernels.")
    return h


def _b(x: Any) -> str:
    return "n/a" if x is None else f"{int(x):,}"


def _p(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None else f"{100 * x:+.{digits}f}%"


def _s(x: Any) -> str:
    if x is None:
        return "n/a"
    return f"{1e3 * x:.3f} ms" if x >= 1e-3 else f"{1e6 * x:.2f} µs"


def _status(r: dict) -> str:
    return r["status"] if r["status"] == "ok" else f"**{r['status']}**"


def _worst_cat(r: dict) -> float | None:
    errs = [abs(v) for v in (r.get("err_categories") or {}).values() if v is not None]
    return max(errs) if errs else None


def _memory_table(rows: list[dict]) -> list[str]:
    lines = [("| config | status | est peak | est blocks | alloc steady | alloc - blocks | err | "
              "est first blocks | alloc first | err | est + reserve | reserved | err | retries | "
              "meter peak | est vs meter | worst cat | peak (meter) | s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {_status(r)} |" + " |" * 17)
            continue
        er = r["est_total"] + r["est_reserve"]
        blocks = r.get("est_blocks", r["est_total"])
        diff = None if r.get("alloc_steady") is None else r["alloc_steady"] - blocks
        lines.append(
            f"| {r['label']} | ok | {_b(r['est_total'])} | {_b(blocks)} | "
            f"{_b(r.get('alloc_steady'))} | "
            f"{_b(diff)} | {_p(r.get('err_alloc'))} | {_b(r.get('est_blocks_first', r['est_first']))} | "
            f"{_b(r.get('alloc_first'))} | {_p(r.get('err_alloc_first'))} | {_b(er)} | "
            f"{_b(r.get('reserved'))} | {_p(r.get('err_reserved'), 1)} | "
            f"{r.get('alloc_retries', 'n/a')} | {_b(r['meter_total'])} | {_p(r['err_meter'])} | "
            f"{_p(_worst_cat(r))} | {r['meter_peak']} | {r['seconds']} |")
    return lines


def _summary(rows: list[dict], cuda: bool) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    n_fail = sum(r["status"] == "failed" for r in rows)
    n_skip = sum(r["status"] == "skipped" for r in rows)
    out = [f"{len(ok)} rows ok, {n_fail} failed, {n_skip} skipped."]
    key = "err_alloc" if cuda else "err_meter"
    errs = [abs(r[key]) for r in ok if r.get(key) is not None]
    if errs:
        exact = sum(e == 0 for e in errs)
        within = sum(e <= 0.01 for e in errs)
        what = "allocated peak (max_memory_allocated)" if cuda else "meter peak (CPU dry run)"
        out.append(f"Steady-state {what} vs estimate: {exact}/{len(errs)} byte-exact, "
                   f"{within}/{len(errs)} within 1% (goal), worst {100 * max(errs):.3f}%, "
                   f"median {100 * statistics.median(errs):.3f}%.")
    if cuda:
        res = [abs(r["err_reserved"]) for r in ok if r.get("err_reserved") is not None]
        if res:
            out.append(f"Reserved (max_memory_reserved) vs estimate + allocator reserve: "
                       f"{sum(e <= 0.10 for e in res)}/{len(res)} within 10% (goal), worst "
                       f"{100 * max(res):.1f}%.")
    return out


def _factor_table(rows: list[dict], cuda: bool) -> list[str]:
    key = "err_alloc" if cuda else "err_meter"
    ok = [r for r in rows if r["status"] == "ok" and "factors" in r]
    if not ok:
        return []
    lines = ["", "Error by factor level (|steady-state error|):", "",
             "| factor | level | rows | failed | byte-exact | worst | median |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = list(ok[0]["factors"])
    for f in names:
        levels: dict[str, list] = {}
        for r in rows:
            if "factors" in r:
                levels.setdefault(str(r["factors"][f]), []).append(r)
        for lv, rs in levels.items():
            errs = [abs(r[key]) for r in rs if r["status"] == "ok" and r.get(key) is not None]
            lines.append(f"| {f} | {lv} | {len(rs)} | {sum(r['status'] == 'failed' for r in rs)} | "
                         f"{sum(e == 0 for e in errs)} | "
                         f"{'n/a' if not errs else f'{100 * max(errs):.3f}%'} | "
                         f"{'n/a' if not errs else f'{100 * statistics.median(errs):.3f}%'} |")
    return lines


def render_markdown(h: dict, rows: list[dict]) -> str:
    cuda = h.get("device_memory_bytes") is not None
    by = {s: [r for r in rows if r["section"] == s] for s in SECTIONS}
    L = ["# Accuracy on CUDA: planner estimate (device cuda) vs the measured reference step", ""]
    L += [(f"- device: {h.get('device')}, driver {h.get('driver')}, capability {h.get('capability', 'n/a')}, "
          f"memory {_b(h.get('device_memory_bytes'))} B"),
          (f"- torch {h['torch']}, CUDA {h.get('cuda_runtime')}, cuDNN {h.get('cudnn', 'n/a')}, "
          f"Python {h['python']}, pydantic {h['pydantic']}, bitsandbytes {h.get('bitsandbytes')}, "
          f"{h['cpu_count']} CPU cores"),
          f"- mode: {h['mode']}; started {h['started_utc']} UTC; commit {h.get('commit')}",
          f"- note: {h['torch_note']}",
          "- scaled_dot_product_attention kernels: "
          + "; ".join(f"{k}: {v}" for k, v in (h.get("sdpa_kernels") or {}).items())]
    if h.get("warm_up_errors"):
        L.append(f"- warm-up errors: {h['warm_up_errors']}")
    if h.get("elapsed_s") is not None:
        L.append(f"- campaign time: {h['elapsed_s']} s")
    if not cuda:
        L.append("- **CPU dry run**: tiny stand-in models, estimates for device cpu, CUDA meters "
                 "skipped; this checks that every row runs, not the CUDA figures.")
    L += ["", ("Errors are (estimate - measured) / measured. \"alloc\" columns are "
          "`torch.cuda.max_memory_allocated` of the step minus what was allocated before the row "
          "(cuBLAS workspaces are created by a warm-up before the first row); \"reserved\" likewise "
          "`max_memory_reserved`; \"meter\" is the storage meter of service/validation/meter.py "
          "(counts host tensors too, e.g. foreach optimizers' CPU `step` scalars, which the cuda "
          "estimate leaves out). \"est peak\" is the tensors' bytes (breakdown.total); \"est blocks\" "
          "what the caching allocator hands out for them (`cuda_allocator.allocated_bytes`, the "
          "step's allocations replayed through planner/machine/cuda_allocator.py), which is what "
          "`max_memory_allocated` counts; \"reserve\" is `allocator_reserve_bytes`.")]

    L += ["", "## 1. Single device: fractional-factorial matrix", ""]
    d = h.get("design")
    if d:
        L.append(f"{d['rows']} rows over " + "; ".join(f"{k}: {', '.join(v)}" for k, v in d["factors"].items())
                 + ". Steps: 3 (step 1 = first, the highest of steps 2-3 = steady state).")
        L.append("")
    L += _summary(by["single-device"], cuda) + [""] + _memory_table(by["single-device"])
    L += _factor_table(by["single-device"], cuda)

    L += ["", "## 2. Full size", ""] + _summary(by["full-size"], cuda) + [""] + _memory_table(by["full-size"])

    L += ["", "## 3. Largest micro-batch the planner says fits", "",
          ("memory = free device memory + what the allocator holds, before the row (CPU dry run: a "
          "budget just under the planner's need at micro-batch 3). need = estimate + allocator reserve."),
          "", ("| setup | status | memory | max micro-batch | need at max | need at max+1 | max runs? | "
          "alloc at max | reserved at max | max+1 OOM? | verdict | s |"),
          "|---|---|---:|---:|---:|---:|---|---:|---:|---|---|---:|"]
    for r in by["max-micro-batch"]:
        if r["status"] != "ok":
            L.append(f"| {r['label']} | {_status(r)} |" + " |" * 10)
            continue
        a, nx = r["at_max"], r["at_next"]
        L.append(f"| {r['label']} | ok | {_b(r['memory_bytes'])} | {r['max_micro_batch']} | "
                 f"{_b(r['need_at_max'])} | {_b(r['need_at_next'])} | {'no (OOM)' if a['oom'] else 'yes'} | "
                 f"{_b(a.get('alloc_steady') if cuda else a.get('meter_total'))} | {_b(a.get('reserved'))} | "
                 f"{'yes' if nx['oom'] else 'no'} | {r['verdict']} | {r['seconds']} |")

    L += ["", "## 4. CPU offload: FSDP2 CPUOffloadPolicy, one rank", "",
          ("Estimate: the offload row of POST /v1/zero (stage 3, parameters and optimizer on the "
          "CPU) for device bytes, `planner.layouts.sharding.shard_model_states(...).offloaded_bytes` for host "
          "bytes. Measured host bytes: sharded parameters + gradients (before the optimizer step) "
          "+ optimizer states in host memory."), "",
          ("| setup | status | est device | alloc steady | err | alloc first | est host | host measured "
          "| err | host params / grads / states | meter (host + device) | s |"),
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in by["offload"]:
        if r["status"] != "ok":
            L.append(f"| {r['label']} | {_status(r)} |" + " |" * 10)
            continue
        hm = r["host_measured"]
        L.append(f"| {r['label']} | ok | {_b(r['est_device'])} | {_b(r.get('device_alloc'))} | "
                 f"{_p(r.get('err_device'))} | {_b(r.get('device_alloc_first'))} | {_b(r['est_host'])} | "
                 f"{_b(r['host_total'])} | {_p(r['err_host'])} | {_b(hm['parameters'])} / "
                 f"{_b(hm['gradients'])} / {_b(hm['optimizer_states'])} | {_b(r['meter_total'])} | "
                 f"{r['seconds']} |")

    L += ["", "## 5. Step time of one block vs the roofline of POST /v1/pipeline", "",
          (f"Roofline: `planner.routes.pipeline.roofline_costs` for one block at MFU {DEFAULT_MFU:g} (the "
          "default). F = forward, I = input-gradient backward, W = full backward - I. Median of 10 "
          "after 2 warm-ups. implied MFU = roofline at MFU 1 / measured F + B."), "",
          ("| block | status | F | F roof | err | I | I roof | err | W | W roof | err | F+I+W err | "
          "implied MFU | s |"),
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in by["step-time"]:
        if r["status"] != "ok":
            L.append(f"| {r['label']} | {_status(r)} |" + " |" * 12)
            continue
        mfu = r.get("implied_mfu")
        L.append(f"| {r['label']} | ok | {_s(r['forward_s'])} | {_s(r['roof_forward_s'])} | "
                 f"{_p(r['err_forward'], 1)} | {_s(r['backward_input_s'])} | {_s(r['roof_backward_input_s'])} | "
                 f"{_p(r['err_backward_input'], 1)} | {_s(r['backward_weight_s'])} | "
                 f"{_s(r['roof_backward_weight_s'])} | {_p(r['err_backward_weight'], 1)} | "
                 f"{_p(r['err_total'], 1)} | {'n/a' if mfu is None else f'{mfu:.2f}'} | {r['seconds']} |")

    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        L += ["", "## Rows not measured", "", "| section | row | status | why |", "|---|---|---|---|"]
        for r in bad:
            why = (r.get("error") or r.get("reason") or "").replace("|", "\\|").replace("\n", " ")
            L.append(f"| {r['section']} | {r['label']} | {r['status']} | {why} |")
    return "\n".join(L) + "\n"


# ---- main ----------------------------------------------------------------------------------------
def _warm_up(c: Campaign) -> None:
    """Create what the process keeps once made (cuBLAS / cuBLASLt workspaces, kernels' lazy
    state) before any row, so that no row's allocated peak includes it: a few matmuls in every
    dtype, then two tiny reference steps that are not recorded."""
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(256, 256, device=c.dev, dtype=dt, requires_grad=True)
        b = torch.randn(256, device=c.dev, dtype=dt)
        torch.nn.functional.linear(a, a, b).sum().backward()
        (a @ a).sum().backward()
    steps = [(TINY_MODELS[("gpt2", "small")], _t("amp-fp16", "adamw", 2, 32, "selective", dropout=0.1)),
             (TINY_MODELS[("llama", "small")], _t("mixed-bf16", "sgd-momentum", 2, 32, "full",
                                                  attention="eager"))]
    for model, training in steps:
        try:
            measure(_vreq(c, model, training, steps=2))
        except Exception as exc:  # noqa: BLE001 - the rows will show it again, recorded
            c.header.setdefault("warm_up_errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
    _cleanup(c)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows (about 2 minutes on a GPU)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every row on the CPU at tiny sizes, CUDA meters skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-campaign-out",
                    help="output folder (default $OUT, else ./gpu-campaign-out)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset of: " + ", ".join(SECTIONS))
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    if args.dry_run:  # tiny ops: one thread (spinning intra-op threads only cost time here)
        torch.set_num_threads(1)
    dev = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    mode = ("dry-run" if args.dry_run else "device") + (" quick" if args.quick else "")
    c = Campaign(out=Path(args.out), dry=args.dry_run, quick=args.quick, dev=dev,
                 header=make_header(dev, mode))
    if c.cuda:
        torch.cuda.set_device(dev)
    _warm_up(c)
    budgets = BUDGET_S["quick" if args.quick else "full"]
    acc = c.t0
    for s in SECTIONS:
        acc += budgets[s]
        c.deadlines[s] = acc
    c.write()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    run = {"single-device": single_device,
           "full-size": lambda c: run_table(c, "full-size", FULL_SIZE, full_size_row, 1),
           "max-micro-batch": lambda c: run_table(c, "max-micro-batch", MAX_BATCH, max_batch_row, 1),
           "offload": lambda c: run_table(c, "offload", OFFLOAD, offload_row, 1),
           "step-time": lambda c: run_table(c, "step-time", STEP_TIME, step_time_row, 2)}
    for s in SECTIONS:
        if s in wanted:
            try:
                run[s](c)
            except Exception as exc:  # noqa: BLE001 - a broken section must not stop the others
                c.rows.append({"section": s, "label": "(section)", "status": "failed",
                               "error": f"{type(exc).__name__}: {str(exc)[:600]}",
                               "traceback": traceback.format_exc()[-3000:]})
                c.write()
    c.header["elapsed_s"] = round(time.perf_counter() - c.t0, 1)
    c.write()
    failed = sum(r["status"] == "failed" for r in c.rows)
    print(f"done in {c.header['elapsed_s']} s: {len(c.rows)} rows, {failed} failed; "
          f"tables in {c.out}/accuracy-cuda.md", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A gloo/NCCL group's worker threads can abort the interpreter's exit; every table is written.
    os._exit(code)
