"""Run the reference training step for a validation request and compare it with the estimate.

``run_validation`` is what a validation job executes (in its own process): it builds the reference
model for the request, runs ``steps`` optimizer steps under ``LiveMemoryMeter`` (and, on CUDA, the
caching allocator's own counters), and returns estimate, measurement and relative error per
category for the first step and the steady state (the highest step peak from step 2 on).

``mode="traced"`` runs the same step under FakeTensorMode on the CPU device: every tensor has
shape, dtype and storage size but no data, so full-size models are measured to the byte without
allocating them. Nothing is timed in traced mode.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from typing import Callable

import torch

from planner.catalog.presets import resolve_model
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.routes.memory import estimate_memory
from planner.catalog.specs import (
    ActivationCheckpointing,
    Breakdown,
    ValidationRequest,
)
from planner.catalog.validation_specs import (
    Progress,
    ValidationResult,
    relative_error,
)
from service.validation import step as S
from service.validation.meter import LiveMemoryMeter
# What the step does not run is decided without torch (the API checks it at submission).
from service.validation.support import ValidationUnsupported, check_supported

ProgressFn = Callable[[Progress], None]


def _device(req: ValidationRequest) -> torch.device:
    if req.mode == "traced":
        return torch.device("cpu")
    if req.device == "cuda" or (req.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValidationUnsupported("device 'cuda' requested but this worker has no CUDA device")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda:{dev.index} ({torch.cuda.get_device_name(dev)})"
    return "cpu"


def resolve_plan(req: ValidationRequest, dev: torch.device | None = None):
    """The request with its checkpoint plan resolved, and the planner's answer for it.

    A 'budget' without ``blocks`` is placed by the planner for the device the step runs on
    (POST /v1/checkpointing with that device); every other plan is evaluated as given."""
    from planner.routes.checkpoint_specs import CheckpointRequest
    from planner.routes.checkpointing import plan_checkpointing

    dev = dev or _device(req)
    plan = plan_checkpointing(CheckpointRequest(
        model=req.model, training=req.training, parallelism=req.parallelism,
        hardware=req.hardware, device="cuda" if dev.type == "cuda" else "cpu"))
    ac = req.training.activation_checkpointing
    if ac.strategy == "budget" and ac.blocks is None:
        tr = req.training.model_copy(update={"activation_checkpointing": plan.plan})
        req = req.model_copy(update={"training": tr})
    return req, plan


def measure(req: ValidationRequest, progress: ProgressFn | None = None) -> dict:
    """Run the step; returns the first-step and steady-state breakdowns, the op at the peak and
    timings. Pure measurement: a 'budget' plan must be resolved first (``resolve_plan``)."""
    cfg = resolve_model(req.model)
    tr = req.training
    dev = _device(req)
    ac = tr.activation_checkpointing
    if ac.strategy == "budget" and ac.blocks is None:
        raise ValidationUnsupported("an unresolved 'budget' plan: resolve_plan(req) first")
    traced = req.mode == "traced"
    ckpt = checkpointed_blocks(tr, cfg.num_layers)
    report = progress or (lambda p: None)
    with ExitStack() as stack:
        if traced:
            from torch._subclasses.fake_tensor import FakeTensorMode

            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=False))
        torch.manual_seed(0)
        report(Progress(phase="building", step=0, total_steps=req.steps))
        s = S.build(cfg, tr, dev, ckpt)
        idx, tgt = S.make_batch(cfg, tr, dev) if not traced else _fake_batch(cfg, tr, dev)
        meter = LiveMemoryMeter()
        meter.register(s.model, "parameters")
        meter.register([idx, tgt], "activations")
        if isinstance(s.optimizer, S.MasterWeightOptimizer):
            meter.register(s.optimizer.masters, "optimizer_states")
        if tr.optimizer == "adagrad":  # Adagrad creates its state in the constructor
            meter.register(s.optimizer, "optimizer_states")
        cuda = dev.type == "cuda"
        steps: list[dict] = []
        times: list[float] = []
        reserved, retries = 0, 0
        with meter:
            for i in range(req.steps):
                report(Progress(phase="running", step=i + 1, total_steps=req.steps))
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                meter.reset_peak()
                t0 = time.perf_counter()
                for _ in range(tr.gradient_accumulation_steps):
                    with meter.in_phase("forward"):
                        loss = S.forward_loss(s, idx, tgt, on_recompute=lambda: meter.in_phase("recompute"))
                    with meter.in_phase("backward"):
                        S.backward(s, loss)
                    del loss
                meter.mark([p.grad for p in s.model.parameters() if p.grad is not None], "gradients")
                with meter.in_phase("optimizer"):
                    S.optimizer_step(s)
                meter.mark(s.optimizer, "optimizer_states")
                if cuda:
                    torch.cuda.synchronize(dev)
                    stats = torch.cuda.memory_stats(dev)
                    reserved = max(reserved, torch.cuda.max_memory_reserved(dev))
                    retries = int(stats.get("num_alloc_retries", 0))
                times.append(time.perf_counter() - t0)
                pk = meter.peak
                steps.append({"breakdown": pk.breakdown(), "op": pk.op, "phase": pk.phase,
                              "cuda_allocated": torch.cuda.max_memory_allocated(dev) if cuda else None})
    steady = max(steps[1:], key=lambda d: d["breakdown"]["total"])
    warm = times[1:]
    return {
        "device": describe_device(dev) + (" (FakeTensorMode)" if traced else ""),
        "first": steps[0], "steady": steady,
        "step_time_s": None if traced or not warm else statistics.median(warm),
        "max_reserved_bytes": reserved if cuda else None,
        "num_alloc_retries": retries if cuda else None,
        "checkpointed_blocks": sorted(ckpt),
    }


def _fake_batch(cfg, tr, dev):
    shape = (tr.micro_batch_size, tr.sequence_length)
    return (torch.zeros(shape, dtype=torch.long, device=dev),
            torch.zeros(shape, dtype=torch.long, device=dev))


def run_validation(req: ValidationRequest, progress: ProgressFn | None = None) -> ValidationResult:
    """Measure the reference step for ``req`` and compare with the planner's estimate."""
    check_supported(req)
    if req.parallelism.pipeline_parallel > 1:  # one process per pipeline rank under torchrun
        from service.validation.pipeline_run import run_pipelined

        return run_pipelined(req, progress, req.timeout_s)
    if req.parallelism.data_parallel > 1 and req.training.implementation == "transformers":
        from service.validation.hf_ranks import run_hf_ranks

        return run_hf_ranks(req, progress)
    if req.parallelism.data_parallel > 1:  # one process per rank under torchrun
        from service.validation.distributed import run_multi_rank

        return run_multi_rank(req, progress, req.timeout_s)
    if req.training.implementation == "transformers":
        return _run_transformers(req, progress)
    dev = _device(req)
    req, plan = resolve_plan(req, dev)
    est = estimate_memory(req, device="cuda" if dev.type == "cuda" else "cpu")
    m = measure(req, progress)
    ratio = None
    if m["checkpointed_blocks"] and req.mode == "real":
        ratio = _unchecked_ratio(req, dev)
    measured = Breakdown(**m["steady"]["breakdown"])
    first_measured = Breakdown(**m["first"]["breakdown"])
    if progress:
        progress(Progress(phase="comparing", step=req.steps, total_steps=req.steps))
    return ValidationResult(
        device=m["device"], mode=req.mode,
        estimate=est.breakdown, measured=measured,
        relative_error=relative_error(est.breakdown, measured),
        first_step_estimate=est.first_step, first_step_measured=first_measured,
        peak_op=m["steady"]["op"], peak_phase=m["steady"]["phase"],
        step_time_s=m["step_time_s"], max_reserved_bytes=m["max_reserved_bytes"],
        num_alloc_retries=m["num_alloc_retries"],
        checkpointed_blocks=m["checkpointed_blocks"], step_time_ratio=ratio,
        planned_step_time_ratio=1 + plan.recompute_time_fraction,
    )


def _run_transformers(req: ValidationRequest, progress: ProgressFn | None) -> ValidationResult:
    """The transformers model's step (planner/hf/step.py), the whole model, real or traced,
    against the estimate (its proxies traced and extrapolated)."""
    from planner.hf.step import run

    from service.validation.support import check_transformers

    cfg = check_transformers(req)
    dev = _device(req)
    est = estimate_memory(req, device="cuda" if dev.type == "cuda" else "cpu")
    report = progress or (lambda p: None)
    traced = req.mode == "traced"
    report(Progress(phase="building", step=0, total_steps=req.steps))
    steps = run(cfg, req.training, str(dev), traced=traced, steps=req.steps,
                on_step=lambda i: report(Progress(phase="running", step=i + 1,
                                                  total_steps=req.steps)))
    steady = max(steps[1:], key=lambda s: s["peak"][0]["total"])
    measured, first = Breakdown(**steady["peak"][0]), Breakdown(**steps[0]["peak"][0])
    warm = [s["time_s"] for s in steps[1:]]
    report(Progress(phase="comparing", step=req.steps, total_steps=req.steps))
    return ValidationResult(
        device=describe_device(dev) + (" (FakeTensorMode)" if traced else ""), mode=req.mode,
        estimate=est.breakdown, measured=measured,
        relative_error=relative_error(est.breakdown, measured),
        first_step_estimate=est.first_step, first_step_measured=first,
        peak_op=steady["peak"][1], peak_phase=steady["peak"][2],
        step_time_s=None if traced else statistics.median(warm))


def _unchecked_ratio(req: ValidationRequest, dev: torch.device, steps: int = 5) -> float | None:
    """Step time of the plan over that of the same setup without checkpointing, both timed here
    without the memory meter (its per-op dispatch would dominate small models): the fastest of
    ``steps - 2`` steps after two warm-up steps (the least disturbed by other load), one setup
    after the other. None when the unchecked step does not fit the device."""
    tr = req.training
    none = tr.model_copy(update={"activation_checkpointing": ActivationCheckpointing()})
    try:
        ckpt_s = _timed_step_s(req, tr, dev, steps)
        none_s = _timed_step_s(req, none, dev, steps)
    except torch.OutOfMemoryError:
        return None
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return ckpt_s / none_s if none_s > 0 else None


def _timed_step_s(req: ValidationRequest, tr, dev: torch.device, steps: int) -> float:
    cfg = resolve_model(req.model)
    torch.manual_seed(0)
    s = S.build(cfg, tr, dev, checkpointed_blocks(tr, cfg.num_layers))
    idx, tgt = S.make_batch(cfg, tr, dev)
    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(tr.gradient_accumulation_steps):
            S.backward(s, S.forward_loss(s, idx, tgt))
        S.optimizer_step(s)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    return min(times[2:])
