"""The estimate of ``training.implementation: "transformers"``: the real model's step traced.

The step of ``planner/hf/step.py`` is traced under FakeTensorMode (no memory allocated, exact
storage sizes) on proxies of the model with the first k, k+p and k+2p decoder blocks, where p is
the period of the blocks' kinds (attention type, sparse or dense MLP; 1 for most models, 2 for
Gemma 2, 6 for Gemma 3) and k the smallest count >= p with L - k a multiple of p. Every
category of each phase's peak (forward, backward, optimizer) of the first and the steady step
is then extrapolated to the model's L blocks: exact when the two differences agree (checked for
every category) and the peak falls at the same op in all three proxies; otherwise once more from
k+p, k+2p, k+3p (under FSDP2 the one-block proxy's backward peaks at the loss, more blocks' in a
layer's backward); otherwise, or when the
model has no more blocks than the three proxies together (3k + 3p; Gemma 3 1B: 26 blocks against
8 + 14 + 20), the whole model is traced, once, which is then the lesser work. The step's peak is
the highest phase peak. tests/test_hf_estimate.py holds the extrapolated estimate equal to
real CPU runs of the whole model, to the byte.

Traces are memoised per (config without its layer count, training setting, proxy size), so
another layer count of a seen setup costs no trace. Every gradient accumulation count from 2 up
is traced as 2: the micro-batches after the first run with every gradient live, the same in
each, so their windows' peaks are the same, and the step's peak is the highest window's
(tests/test_hf_estimate.py holds accumulation 3 and 4 equal to the real step's).

First-request cost: three traces of one to three blocks, 6-8 s in all for 7-8B models at
sequence 1024 on one CPU core (benchmarks/results/accuracy-hf-cpu.md).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

from planner.catalog.hf_config import layer_field
from planner.catalog.specs import TrainingSpec
from planner.hf import step as S

_CACHE: OrderedDict = OrderedDict()
_CACHE_MAX = 256
_LOCK = threading.Lock()
MAX_PERIOD = 12


@dataclass(frozen=True)
class HFPeak:
    breakdown: dict[str, int]
    op: str
    phase: str


@dataclass(frozen=True)
class HFEstimate:
    first: HFPeak
    steady: HFPeak
    steady_phases: dict[str, HFPeak]
    traced_layers: tuple[int, ...]
    extrapolated: bool


def _key(config: dict, tr: TrainingSpec, n: int, ddp: int = 1, kernels: str = "cpu",
         zero: tuple[int, int] = (0, 0)) -> str:
    c = {k: v for k, v in config.items() if k not in (layer_field(config["model_type"]),
                                                     "layer_types")}
    return json.dumps([c, tr.model_dump(mode="json"), n, ddp, kernels, list(zero)],
                      sort_keys=True, default=str)


def _trace(config: dict, tr: TrainingSpec, n: int | None, kinds: list[tuple],
           ddp: int = 1, kernels: str = "cpu", zero: tuple[int, int] = (0, 0)) -> list[dict]:
    # a proxy is its first n blocks: the key holds their kinds (layer_types is cut to them);
    # zero: (zero_stage, traced rank)
    key = _key(config, tr, n if n is not None else -1, ddp, kernels, zero) + json.dumps(
        [list(k) for k in (kinds if n is None else kinds[:n])])
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    if ddp > 1:
        with fake_group(ddp, zero[1]):
            out = S.run(config, tr, "cpu", traced=True, steps=2, num_layers=n, ddp=True,
                        kernels=kernels, zero_stage=zero[0])
    else:
        out = S.run(config, tr, "cpu", traced=True, steps=2, num_layers=n, kernels=kernels)
    with _LOCK:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return out


_PG_LOCK = threading.Lock()


@contextmanager
def fake_group(world_size: int, rank: int = 0):
    """``rank`` of ``world_size`` on torch's fake process group (collectives return at once,
    nothing sent); the default group for the duration, one at a time."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    with _PG_LOCK:
        if dist.is_initialized():
            raise RuntimeError("a default process group is already initialised")
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            yield
        finally:
            dist.destroy_process_group()


def parameter_numels(config: dict) -> list[int]:
    """The numel of every trainable parameter of the whole model (built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(S.make_config(config))
    return [p.numel() for p in model.parameters() if p.requires_grad]


def clear() -> None:
    with _LOCK:
        _CACHE.clear()


def _period(kinds: list[tuple]) -> tuple[int, int] | None:
    """(k, p): the proxies' first size and period, or None when no period fits."""
    L = len(kinds)
    for p in range(1, MAX_PERIOD + 1):
        k = p + (L - p) % p
        if k + 2 * p > L:
            return None
        if all(kinds[i] == kinds[i - p] for i in range(k, L)):
            return k, p
    return None


def _extrapolate(points: list[tuple[dict, str]], n: int, k: int, p: int):
    """The phase peak at n blocks from those at k, k+p, k+2p; None when not linear."""
    (a, op0), (b, op1), (c, op2) = points
    if not op0 == op1 == op2:
        return None
    steps = (n - k) // p
    out = {}
    for cat in a:
        d1, d2 = b[cat] - a[cat], c[cat] - b[cat]
        if d1 != d2:
            return None
        out[cat] = a[cat] + steps * d1
    return out, op0


def _peak(phases: dict[str, tuple[dict, str]]) -> HFPeak:
    best = None
    for name in S.PHASES:
        if name in phases and (best is None or phases[name][0]["total"] > best.breakdown["total"]):
            best = HFPeak(phases[name][0], phases[name][1], name)
    return best


def _extrapolated(config: dict, tr: TrainingSpec, kinds: list[tuple], ddp: int, kernels: str,
                  zero: tuple[int, int], k: int, p: int, L: int) -> HFEstimate | None:
    """The estimate from the proxies of k, k+p and k+2p blocks; None when not linear."""
    traces = [_trace(config, tr, n, kinds, ddp, kernels, zero) for n in (k, k + p, k + 2 * p)]
    steps = {}
    for i, which in ((0, "first"), (1, "steady")):
        phases = {}
        for name in S.PHASES:
            pts = [t[i]["phases"][name] for t in traces]
            got = _extrapolate(pts, L, k, p)
            if got is None:
                break
            phases[name] = got
        else:
            steps[which] = phases
            continue
        break
    if len(steps) == 2:
        return HFEstimate(first=_peak(steps["first"]), steady=_peak(steps["steady"]),
                          steady_phases={n: HFPeak(bd, op, n) for n, (bd, op)
                                         in steps["steady"].items()},
                          traced_layers=(k, k + p, k + 2 * p), extrapolated=True)
    return None


def estimate(config: dict, tr: TrainingSpec, ddp: int = 1, device: str = "cpu",
             zero_stage: int = 0, rank: int = 0) -> HFEstimate:
    """The step's first and steady peaks for the whole model (see module docstring); ``ddp``
    > 1: one rank of that many under DistributedDataParallel (``zero_stage`` 0) or FSDP2
    (``zero_stage`` 2 or 3, planner/hf/fsdp.py; ``rank``: which rank, their shards differ when
    a dimension does not divide), traced on a fake process group; ``device`` "cuda": with the
    attention kernels a CUDA device runs."""
    zero = (zero_stage, rank) if ddp > 1 else (0, 0)
    kernels = "cpu" if device == "cpu" else "cuda"
    if tr.gradient_accumulation_steps > 2:  # the same windows as 2 (module docstring)
        tr = tr.model_copy(update={"gradient_accumulation_steps": 2})
    kinds = S.block_kinds(config)
    L = len(kinds)
    kp = _period(kinds)
    if kp is not None:
        k0, p = kp
        # the proxies k, k+p, k+2p; when their peaks are not linear (e.g. FSDP2: one block's
        # backward peaks elsewhere than more blocks'), once more from k+p
        for k in (k0, k0 + p):
            if 3 * k + 3 * p >= L:  # else one whole trace is less work
                break
            got = _extrapolated(config, tr, kinds, ddp, kernels, zero, k, p, L)
            if got is not None:
                return got
    full = _trace(config, tr, None, kinds, ddp, kernels, zero)
    return HFEstimate(first=_peak(full[0]["phases"]), steady=_peak(full[1]["phases"]),
                      steady_phases={n: HFPeak(bd, op, n) for n, (bd, op)
                                     in full[1]["phases"].items()},
                      traced_layers=(L,), extrapolated=False)

