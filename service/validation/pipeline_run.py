"""The real pipelined training step with ``torch.distributed.pipelining``, measured per rank.

Launch: ``python -m torch.distributed.run --standalone --nproc-per-node N
service/validation/pipeline_run.py --schedule 1f1b --microbatches 4 --out result.json``, or
``--request spec.json`` with a ValidationRequest (gloo on CPU, NCCL on GPUs). The reference model
(``service.validation.model.Transformer``) is cut into ``N * v`` stages along its blocks as the
planner cuts it (``planner.layouts.sharding.pipeline_stage_layers``): stage 0 owns the embeddings, the last
stage the final norm, the output projection and the loss. A training step is the schedule's step
over the micro-batches, then the optimizer step on the rank's own stages. Per rank it records, for
the timed step (step 2, after a warm-up step), every compute action in execution order with
timestamps around the stage computation and the micro-batches whose activations the stage holds
after each action (read from the stage's own caches); then, over the following steps, the peak
live memory by category (``service.validation.meter.LiveMemoryMeter``; on CUDA also the
allocator's peak).

``compare_with_simulator`` feeds the measured per-stage F, I and W medians to the planner's
simulator and compares: action order and in-flight counts exactly, times reported.
``run_pipelined`` is what a validation job with ``pipeline_parallel > 1`` runs: the ranks under
torchrun in their own process group with a wall-clock limit, and the result as a
``ValidationResult`` with its ``pipeline`` comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.catalog.presets import resolve_model
from planner.routes.pipeline import PipelineCosts, PipelineRequest, plan_pipeline
from planner.layouts.pipeline_schedules import build_schedule
from planner.catalog.specs import ModelSpec, TrainingSpec, ValidationRequest
from planner.catalog.validation_specs import ValidationResult
from service.validation.model import Transformer, rope_for

TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B", "zb-h1": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble", "dualpipe-v": "ScheduleDualPipeV",
}
SINGLE_STAGE = ("gpipe", "1f1b")


class StagePart(nn.Module):
    """Blocks [lo, hi) of the reference model, plus embeddings (first) or head (last).

    Runs the forward of ``service.validation.step.forward_loss`` for its blocks: under autocast
    for the amp precisions (the backward runs outside it, as in the reference step), with the
    rotary tables of a llama model (registered on every stage that has blocks)."""

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.autocast_dtype = autocast_dtype
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary = model.pos_emb is None and hi > lo
        if self.rotary:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self._forward(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if self.first:
            x = self.tok_emb(x)  # (B, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(T, device=x.device))
        rope = rope_for(self.rope_cos, self.rope_sin, T, x.dtype) if self.rotary else None
        for block in self.blocks:
            x = block(x, rope)
        if self.last:
            x = self.lm_head(self.norm_f(x))  # (B, T, V)
        return x


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # as the reference step: fp32 logits into the loss (torch's schedule divides the gradients
    # by the number of micro-batches, where the reference step divides the loss)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten())


class _Recorder:
    """Wraps a stage's compute methods: timestamps and retained activation sets per action."""

    def __init__(self, stages: list, t0: float, sync) -> None:
        self.events: list[list[Any]] = []
        self.stages, self.t0, self.sync = stages, t0, sync
        self.on = False
        self.meter: Any = None  # a memory meter: its phase follows the action being run
        for st in stages:
            self._wrap(st)

    def live(self) -> int:
        # activation sets a stage still holds: forwards awaiting a backward, plus inputs kept
        # for a pending weight gradient after a split backward
        # (torch keeps a placeholder in dw_runner after W unless a dw_builder is given; the
        # tensors a pending W needs live in backward_state)
        return sum(len(st.fwd_cache) + (len(st.dw_runner) if st.dw_builder else
                                         len(st.backward_state)) for st in self.stages)

    def _wrap(self, st) -> None:
        fwd, bwd, wgt = st.forward_one_chunk, st.backward_one_chunk, st.backward_weight_one_chunk

        def timed(kind, fn, mb, *a, **k):
            if self.meter is not None:
                with self.meter.in_phase("forward" if kind == "F" else "backward"):
                    return fn(mb, *a, **k)
            if not self.on:
                return fn(mb, *a, **k)
            self.sync()
            start = time.perf_counter() - self.t0
            out = fn(mb, *a, **k)
            self.sync()
            end = time.perf_counter() - self.t0
            self.events.append([kind if isinstance(kind, str) else kind(k), st.stage_index, mb,
                                start, end, self.live()])
            return out

        st.forward_one_chunk = lambda mb, *a, **k: timed("F", fwd, mb, *a, **k)
        st.backward_one_chunk = lambda mb, *a, **k: timed(
            lambda kw: "B" if kw.get("full_backward", True) else "I", bwd, mb, *a, **k)
        st.backward_weight_one_chunk = lambda mb, *a, **k: timed("W", wgt, mb, *a, **k)


def _recv_buffers(stages: list) -> list[torch.Tensor]:
    """The receive buffers torch's stages keep for the whole step: one per micro-batch for the
    stage input (which is also the input saved for backward) and one per micro-batch for the
    output gradient. Allocated in the first step and reused."""
    out: list[torch.Tensor] = []
    for st in stages:
        for infos in list(getattr(st, "args_recv_info", {}).values()) + list(
                getattr(st, "grad_recv_info", {}).values()):
            out += [i.buffer for i in infos if getattr(i, "buffer", None) is not None]
    return out


def run(schedule: str, virtual_stages: int, model_spec: dict[str, Any],
        training: TrainingSpec, steps: int = 3,
        report: Callable[[int], None] | None = None) -> dict[str, Any] | None:
    """``steps`` training steps inside an initialised process group (see ``main``); returns the
    gathered result on rank 0, None elsewhere.

    A training step is the schedule's ``step`` over ``training.gradient_accumulation_steps``
    micro-batches of ``training.micro_batch_size`` sequences, then the optimizer step on this
    rank's stages and ``zero_grad(set_to_none=True)``. Step 1 warms up (metadata inference,
    receive buffers, optimizer states), step 2 is timed action by action (no meter), steps 3 to
    ``max(steps, 3)`` run under the memory meter; the steady-state peak is the highest of those.
    """
    from torch.distributed.pipelining import PipelineStage, schedules

    from planner.layouts.sharding import pipeline_stage_layers
    from service.validation import step as S
    from service.validation.meter import LiveMemoryMeter

    cuda = torch.cuda.is_available()
    rank, p = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    microbatches = training.gradient_accumulation_steps
    v = 1 if schedule in SINGLE_STAGE else virtual_stages
    plan = build_schedule(schedule, p, microbatches, v)  # also checks the constraints
    n_stages = plan.num_stages
    cfg = resolve_model(ModelSpec(**model_spec))
    param_dtype, amp_dtype, master, scaling = S.PRECISIONS[training.precision]
    if master or scaling:
        raise ValueError(f"precision {training.precision!r} is not run pipelined")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(S.TORCH_DTYPE[param_dtype])
    try:
        with torch.device(device):
            model = Transformer(cfg, attention=training.attention)
    finally:
        torch.set_default_dtype(prev)
    model.train()
    # the planner's split: the first L mod S stages take one more block (planner.layouts.sharding)
    bounds = [0]
    for n in pipeline_stage_layers(cfg.num_layers, n_stages):
        bounds.append(bounds[-1] + n)
    mine = [s for s in range(n_stages) if plan.stage_to_rank[s] == rank]
    amp = S.TORCH_DTYPE[amp_dtype] if amp_dtype else None
    stages = []
    for s in mine:
        part = StagePart(model, bounds[s], bounds[s + 1], s == 0, s == n_stages - 1, amp)
        stages.append(PipelineStage(part, s, n_stages, device))
    params = [q for st in stages for q in st.submod.parameters() if q.requires_grad]
    opt = S.make_optimizer(training, params)
    del model  # each rank keeps only its stages' modules alive
    cls = getattr(schedules, TORCH_SCHEDULES[schedule])
    sched = cls(stages[0] if schedule in SINGLE_STAGE else stages, microbatches, loss_fn=_loss)
    g = torch.Generator().manual_seed(1)
    batch = training.micro_batch_size * microbatches
    seq = training.sequence_length
    idx = torch.randint(cfg.vocab_size, (batch, seq), generator=g).to(device)
    target = torch.randint(cfg.vocab_size, (batch, seq), generator=g).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report = report or (lambda i: None)

    def pipelined() -> None:
        args = (idx,) if 0 in mine else ()
        kwargs = {"target": target} if n_stages - 1 in mine else {}
        sched.step(*args, **kwargs)

    def optimizer_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    report(1)
    pipelined()  # warm-up: metadata inference, receive buffers, optimizer states
    optimizer_step()
    dist.barrier()
    report(2)
    rec = _Recorder(stages, time.perf_counter(), sync)
    rec.on = True
    t0 = time.perf_counter()
    pipelined()  # the timed step: actions, timestamps and retained activation sets
    rec.on = False
    optimizer_step()
    sync()
    step_s = time.perf_counter() - t0
    dist.barrier()
    # Memory: live tensor storages (LiveMemoryMeter) by category, on every device; on CUDA also
    # the allocator's peak. MemTracker refuses a module that runs several times per step, which
    # every pipeline stage does. Metering does not disturb the timestamps: it runs after them.
    meter = LiveMemoryMeter()
    for st in stages:  # a module, not a list of them: its parameters and buffers
        meter.register(st.submod, "parameters")
    meter.register(_recv_buffers(stages), "activations")
    meter.register([idx, target], "activations")
    meter.register(opt, "optimizer_states")
    rec.meter = meter
    peaks: list[dict[str, Any]] = []
    with meter:
        for i in range(3, max(steps, 3) + 1):
            report(i)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            meter.reset_peak()
            pipelined()
            meter.mark([q.grad for q in params if q.grad is not None], "gradients")
            with meter.in_phase("optimizer"):
                optimizer_step()
            meter.mark(opt, "optimizer_states")
            sync()
            pk = meter.peak
            if os.environ.get("MEMPLAN_PEAK_RECORDS"):  # diagnosis: every live storage
                print(f"rank {rank} step {i} peak {pk.op}/{pk.phase}:", sorted(
                    (r.resolved(), r.op, r.phase, r.nbytes) for r in pk.records), flush=True)
            peaks.append({"breakdown": pk.breakdown(), "op": pk.op, "phase": pk.phase,
                          "cuda_allocated": int(torch.cuda.max_memory_allocated()) if cuda
                          else None})
    rec.meter = None
    steady = max(peaks, key=lambda d: d["breakdown"]["total"])
    mine_out = {"rank": rank, "stages": mine, "events": rec.events, "steady": steady,
                "peak_memory_bytes": steady["breakdown"]["total"], "step_s": step_s}
    gathered: list[Any] = [None] * p if rank == 0 else None
    dist.gather_object(mine_out, gathered, dst=0)
    if rank != 0:
        return None
    dev = f"cuda:{device.index} ({torch.cuda.get_device_name(device)})" if cuda else "cpu"
    return {"schedule": schedule, "stages": p, "microbatches": microbatches, "virtual_stages": v,
            "device": dev, "backend": "nccl" if cuda else "gloo", "model": model_spec,
            "micro_batch_size": training.micro_batch_size, "sequence_length": seq,
            "ranks": gathered}


def compare_with_simulator(result: dict[str, Any]) -> dict[str, Any]:
    """Measured run against the planner: order and in-flight exactly, times reported."""
    name, p, m, v = (result[k] for k in ("schedule", "stages", "microbatches", "virtual_stages"))
    plan = build_schedule(name, p, m, v)
    S = plan.num_stages
    per: dict[tuple[str, int], list[float]] = {}
    for rk in result["ranks"]:
        for kind, st, _, start, end, _ in rk["events"]:
            per.setdefault((kind, st), []).append(end - start)

    def med(kind: str, st: int) -> float:
        xs = per.get((kind, st))
        return statistics.median(xs) if xs else 0.0

    split = any(k == "I" for k, _ in per)
    f_s = [med("F", s) for s in range(S)]
    if split:
        i_s, w_s = [med("I", s) for s in range(S)], [med("W", s) for s in range(S)]
    else:  # a full backward is measured as one B: charge it to I, W = 0
        i_s, w_s = [med("B", s) for s in range(S)], [0.0] * S
    sim = plan_pipeline(PipelineRequest(
        schedule=name, stages=p, microbatches=m, virtual_stages=v, include_timeline=False,
        costs=PipelineCosts(forward_s=f_s, backward_input_s=i_s, backward_weight_s=w_s)))
    ranks = []
    t_first = min(e[3] for rk in result["ranks"] for e in rk["events"])
    t_last = max(e[4] for rk in result["ranks"] for e in rk["events"])
    measured_makespan = t_last - t_first
    for rk in sorted(result["ranks"], key=lambda r: r["rank"]):
        r = rk["rank"]
        order = [(k, st, mb) for k, st, mb, *_ in rk["events"]]
        expected = plan.actions(r)
        busy = sum(e[4] - e[3] for e in rk["events"])
        peak = max((e[5] for e in rk["events"]), default=0)
        ranks.append({
            "rank": r, "order_equal": order == expected,
            "first_mismatch": next((i for i, (a, b) in enumerate(zip(order, expected)) if a != b),
                                   None if len(order) == len(expected) else min(len(order),
                                                                                 len(expected))),
            "peak_in_flight_measured": peak,
            "peak_in_flight_simulated": sim.ranks[r].peak_in_flight_microbatches,
            "busy_s_measured": busy, "busy_s_simulated": sim.ranks[r].busy_s,
            "idle_s_measured": measured_makespan - busy,
            "idle_s_simulated": sim.ranks[r].idle_s,
            "peak_memory_bytes": rk["peak_memory_bytes"],
            "stages": rk["stages"], "steady": rk["steady"], "step_s": rk["step_s"],
        })
    return {
        "schedule": name, "stages": p, "microbatches": m, "virtual_stages": v,
        "device": result["device"],
        "order_equal": all(r["order_equal"] for r in ranks),
        "in_flight_equal": all(r["peak_in_flight_measured"] == r["peak_in_flight_simulated"]
                               for r in ranks),
        "makespan_s_measured": measured_makespan, "makespan_s_simulated": sim.makespan_s,
        "makespan_relative_error": (sim.makespan_s - measured_makespan) / measured_makespan
        if measured_makespan > 0 else None,
        "bubble_fraction_simulated": sim.bubble_fraction,
        "stage_costs_s": {"forward": f_s, "backward_input": i_s, "backward_weight": w_s},
        "ranks": ranks,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--request", help="a ValidationRequest as JSON (what a validation job runs); "
                    "the other setup options are then ignored")
    ap.add_argument("--schedule", action="append",
                    help="repeat to run several schedules in one launch")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--virtual-stages", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--sequence-length", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    steps = 3
    if a.request:
        with open(a.request) as fh:
            req = ValidationRequest.model_validate_json(fh.read())
        spec = req.model.model_dump(exclude_none=True)
        training, steps = req.training, req.steps
        names = [req.parallelism.pipeline_schedule]
        virtual = req.parallelism.virtual_pipeline_stages
    else:
        if not a.schedule:
            ap.error("give --request or at least one --schedule")
        spec = {"family": "gpt2", "num_layers": a.layers, "hidden_size": a.hidden,
                "num_heads": a.heads, "vocab_size": a.vocab,
                "max_sequence_length": a.sequence_length, "tie_embeddings": False}
        training = TrainingSpec(precision="fp32", optimizer="sgd",
                                micro_batch_size=a.micro_batch_size,
                                sequence_length=a.sequence_length,
                                gradient_accumulation_steps=a.microbatches)
        names, virtual = a.schedule, a.virtual_stages
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    progress_path = os.environ.get("MEMPLAN_PROGRESS")

    def report(step: int) -> None:
        if dist.get_rank() == 0 and progress_path:
            with open(progress_path, "w") as fh:
                json.dump({"step": step}, fh)

    results = []
    try:
        for name in names:
            res = run(name, virtual, spec, training, steps, report)
            if res is not None:
                results.append({"run": res, "comparison": compare_with_simulator(res)})
    finally:
        dist.destroy_process_group()
    if results:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)



# ---- validation jobs (runs in the job's process) -----------------------------------------------
PIPELINE_PRECISIONS = ("fp32", "amp-bf16", "bf16")


def check_pipeline(req: ValidationRequest) -> None:
    """Refuse, with the reason, what the pipelined reference step does not run."""
    from service.validation.runner import ValidationUnsupported

    try:
        _check_pipeline(req)
    except ValidationUnsupported as exc:
        raise ValidationUnsupported(f"pipeline_parallel > 1: {exc}") from None


def _check_pipeline(req: ValidationRequest) -> None:
    from planner.layouts.pipeline_schedules import ScheduleConstraintError
    from service.validation.runner import ValidationUnsupported

    par, tr = req.parallelism, req.training
    if req.mode == "traced":
        raise ValidationUnsupported("pipelined validation runs real ranks (gloo/NCCL "
                                    "point-to-point has no FakeTensorMode); use mode 'real'")
    if par.data_parallel > 1 or par.tensor_parallel > 1:
        raise ValidationUnsupported("pipelined validation runs pipeline parallelism alone: set "
                                    "data_parallel = tensor_parallel = 1")
    if par.zero_stage or par.offload_optimizer or par.offload_parameters:
        raise ValidationUnsupported("ZeRO stages and offload shard over data-parallel ranks; "
                                    "pipelined validation runs zero_stage 0 without offload")
    if par.pipeline_schedule not in TORCH_SCHEDULES:
        raise ValidationUnsupported(
            f"schedule {par.pipeline_schedule!r} has no torch.distributed.pipelining "
            f"implementation to run; one of {', '.join(TORCH_SCHEDULES)}")
    if par.pipeline_schedule in SINGLE_STAGE and par.virtual_pipeline_stages != 1:
        raise ValidationUnsupported(f"{par.pipeline_schedule} runs one stage per rank: set "
                                    "virtual_pipeline_stages 1")
    if tr.implementation != "reference":
        raise ValidationUnsupported("only implementation 'reference' can be measured")
    if tr.precision not in PIPELINE_PRECISIONS or tr.precision_overrides is not None:
        raise ValidationUnsupported(
            f"pipelined validation runs precision {', '.join(PIPELINE_PRECISIONS)} without "
            "overrides (master weights and loss scaling are not wired into torch's schedules)")
    if tr.activation_checkpointing.strategy != "none":
        raise ValidationUnsupported("pipelined validation runs without activation checkpointing")
    if tr.lora is not None:
        raise ValidationUnsupported("pipelined validation runs without LoRA")
    if tr.dropout > 0:
        raise ValidationUnsupported("pipelined validation runs without dropout (set dropout 0)")
    if tr.optimizer in ("adam-8bit", "lion"):
        raise ValidationUnsupported(f"optimizer {tr.optimizer!r} has no torch.optim implementation")
    model = resolve_model(req.model)
    if not model.architecture_known:
        raise ValidationUnsupported("a bare num_parameters model cannot be built; give the "
                                    "architecture")
    if model.tie_embeddings:
        raise ValidationUnsupported(
            "tied embeddings share one weight between the first and the last stage, which "
            "torch.distributed.pipelining cannot split: set tie_embeddings false")
    v = 1 if par.pipeline_schedule in SINGLE_STAGE else par.virtual_pipeline_stages
    try:
        plan = build_schedule(par.pipeline_schedule, par.pipeline_parallel,
                              tr.gradient_accumulation_steps, v)
    except ScheduleConstraintError as exc:
        raise ValidationUnsupported(f"pipeline schedule: {exc} (micro-batches are "
                                    "training.gradient_accumulation_steps)") from None
    if plan.num_stages > model.num_layers:
        raise ValidationUnsupported(f"{plan.num_stages} pipeline stages need at least as many "
                                    f"blocks; the model has {model.num_layers}")


def launch(req: ValidationRequest, timeout_s: float,
           progress: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run the pipelined step for ``req`` under torchrun in a new process group, killing the
    group at ``timeout_s``; returns rank 0's run and comparison."""
    from service.validation.launch import torchrun

    return torchrun("service.validation.pipeline_run", req.parallelism.pipeline_parallel, req,
                    timeout_s, lambda spec, out: ["--request", str(spec), "--out", str(out)],
                    max(req.steps, 3), progress, what="pipeline ranks")[0]


def run_pipelined(req: ValidationRequest, progress: Callable[[Any], None] | None = None,
                  timeout_s: float | None = None) -> ValidationResult:
    """A pipelined validation job: the real pipelined step per rank against the simulator (action
    order and in-flight micro-batches exactly; F/I/W medians measured here fed to it for times)
    and the worst measured rank's memory against the planner's estimate."""
    from planner.routes.memory import estimate_memory
    from planner.catalog.specs import Breakdown
    from planner.catalog.validation_specs import (
        PipelineRankComparison,
        PipelineValidation,
        Progress,
        relative_error,
    )

    check_pipeline(req)
    total = max(req.steps, 3)
    if progress:
        progress(Progress(phase="building", step=0, total_steps=total))
    data = launch(req, timeout_s or req.timeout_s, progress)
    if progress:
        progress(Progress(phase="comparing", step=total, total_steps=total))
    run_, cmp_ = data["run"], data["comparison"]
    cuda = run_["backend"] == "nccl"
    est = estimate_memory(req, device="cuda" if cuda else "cpu")
    ranks = [PipelineRankComparison(
        rank=r["rank"], stages=r["stages"], action_order_matches=r["order_equal"],
        first_mismatch=r["first_mismatch"],
        in_flight_measured=r["peak_in_flight_measured"],
        in_flight_simulated=r["peak_in_flight_simulated"],
        busy_s_measured=r["busy_s_measured"], busy_s_simulated=r["busy_s_simulated"],
        idle_s_measured=r["idle_s_measured"], idle_s_simulated=r["idle_s_simulated"],
        step_s_measured=r["step_s"],
        peak_memory=Breakdown(**r["steady"]["breakdown"]),
        peak_op=r["steady"]["op"], peak_phase=r["steady"]["phase"],
        cuda_allocated_bytes=r["steady"]["cuda_allocated"]) for r in cmp_["ranks"]]
    worst = max(ranks, key=lambda r: (r.peak_memory.total, -r.rank))
    costs = cmp_["stage_costs_s"]
    per_rank = _per_rank_estimates(req, "cuda" if cuda else "cpu")
    rank_results = None
    if per_rank is not None:  # the planner replays every rank: compare rank by rank
        from planner.catalog.validation_specs import RankResult

        rank_results = [RankResult(rank=r.rank, estimate=per_rank[r.rank],
                                   measured=r.peak_memory,
                                   relative_error=relative_error(per_rank[r.rank], r.peak_memory))
                        for r in ranks]
    note = ("estimate: the planner's replay of every pipeline rank (planner.layouts.pipeline_memory): "
            "each rank's stages, torch's receive buffers and the schedule's actions op by op; "
            "estimate is the planner's worst rank, measured the measured worst rank, and ranks "
            "compares each rank with its own replay." if rank_results is not None else
            "estimate: the planner's pipeline path for its worst rank: per-tensor model states "
            "of the stage with the most, plus the single-device activation and temporary peaks "
            "scaled by the stage's share of blocks and the first stage's in-flight micro-batches "
            "(a composition, not a replay of the pipelined step; torch's per-micro-batch receive "
            "buffers, measured as activations, are not in it). measured: the rank with the "
            "highest steady-state peak. The planner gives no per-rank pipeline estimate, so only "
            "that rank is compared; every rank's measured peak is in pipeline.ranks.")
    pv = PipelineValidation(
        schedule=cmp_["schedule"], stages=cmp_["stages"], virtual_stages=cmp_["virtual_stages"],
        microbatches=cmp_["microbatches"],
        action_order_matches=cmp_["order_equal"], in_flight_matches=cmp_["in_flight_equal"],
        makespan_s_measured=cmp_["makespan_s_measured"],
        makespan_s_simulated=cmp_["makespan_s_simulated"],
        makespan_relative_error=cmp_["makespan_relative_error"],
        bubble_fraction_simulated=cmp_["bubble_fraction_simulated"],
        forward_s=costs["forward"], backward_input_s=costs["backward_input"],
        backward_weight_s=costs["backward_weight"], ranks=ranks,
        memory_note=note)
    return ValidationResult(
        device=f"{run_['device']} x {len(ranks)} pipeline ranks ({run_['backend']})",
        mode=req.mode, estimate=est.breakdown, measured=worst.peak_memory,
        relative_error=relative_error(est.breakdown, worst.peak_memory),
        peak_op=worst.peak_op, peak_phase=worst.peak_phase,
        step_time_s=max(r.step_s_measured for r in ranks),
        max_reserved_bytes=None, ranks=rank_results, worst_rank=next(
            (int(a.value) for a in est.assumptions if a.name == "worst_rank"), worst.rank),
        worst_measured_rank=worst.rank, pipeline=pv)


def _per_rank_estimates(req: ValidationRequest, device: str) -> dict[int, Any] | None:
    """The planner's steady-state breakdown of every pipeline rank, when it replays them."""
    from planner.catalog.presets import resolve_model as _resolve
    from planner.layouts.pipelined import pipelined_estimate
    from planner.catalog.specs import Breakdown

    pp = pipelined_estimate(_resolve(req.model), req.training, req.parallelism, device)
    if pp is None:
        return None
    return {pk.rank: Breakdown(**pk.steady.as_dict()) for pk in pp[1]}


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown: gloo's worker threads can abort it ("terminate
    # called without an active exception") after every result is written (as distributed.py).
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
