"""The real pipelined training step with ``torch.distributed.pipelining``, measured per rank.

Launch: ``python -m torch.distributed.run --standalone --nproc-per-node N
service/validation/pipeline_run.py --schedule 1f1b --microbatches 4 --out result.json``
(gloo on CPU, NCCL on GPUs). The reference model (``service.validation.model.Transformer``) is
cut into ``N * v`` stages along its blocks: stage 0 owns the embeddings, the last stage the final
norm, the output projection and the loss. Per rank it records, for the measured step (step 2,
after a warm-up step), every compute action in execution order with timestamps around the stage
computation, the micro-batches whose activations the stage holds after each action (read from the
stage's own caches), and, over one more step, the peak live memory (live tensor storages via
``service.validation.meter.LiveMemoryMeter`` on CPU, the CUDA allocator on GPUs).

``compare_with_simulator`` feeds the measured per-stage F, I and W medians to the planner's
simulator and compares: action order and in-flight counts exactly, times reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from planner.catalog import resolve_model
from planner.pipeline import PipelineCosts, PipelineRequest, plan_pipeline
from planner.pipeline_schedules import build_schedule
from planner.specs import ModelSpec
from service.validation.model import Transformer

TORCH_SCHEDULES = {
    "gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B", "zb-h1": "ScheduleInterleavedZeroBubble",
    "zb-v": "ScheduleZBVZeroBubble", "dualpipe-v": "ScheduleDualPipeV",
}
SINGLE_STAGE = ("gpipe", "1f1b")


class StagePart(nn.Module):
    """Blocks [lo, hi) of the reference model, plus embeddings (first) or head (last)."""

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        self.norm_f = model.norm_f if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            T = x.shape[1]
            x = self.tok_emb(x)  # (B, T, C)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(T, device=x.device))
        for block in self.blocks:
            x = block(x, None)
        if self.last:
            x = self.lm_head(self.norm_f(x))  # (B, T, V)
        return x


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class _Recorder:
    """Wraps a stage's compute methods: timestamps and retained activation sets per action."""

    def __init__(self, stages: list, t0: float, sync) -> None:
        self.events: list[list[Any]] = []
        self.stages, self.t0, self.sync = stages, t0, sync
        self.on = False
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


def run(schedule: str, microbatches: int, virtual_stages: int, model_spec: dict[str, Any],
        micro_batch_size: int, sequence_length: int) -> dict[str, Any] | None:
    """One measured step inside an initialised process group (see ``main``); returns the gathered
    result on rank 0, None elsewhere."""
    from torch.distributed.pipelining import PipelineStage, schedules

    cuda = torch.cuda.is_available()
    rank, p = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    v = 1 if schedule in SINGLE_STAGE else virtual_stages
    plan = build_schedule(schedule, p, microbatches, v)  # also checks the constraints
    S = plan.num_stages
    cfg = resolve_model(ModelSpec(**model_spec))
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    L = cfg.num_layers
    mine = [s for s in range(S) if plan.stage_to_rank[s] == rank]
    stages = []
    for s in mine:
        part = StagePart(model, s * L // S, (s + 1) * L // S, s == 0, s == S - 1)
        stages.append(PipelineStage(part, s, S, device))
    cls = getattr(schedules, TORCH_SCHEDULES[schedule])
    sched = cls(stages[0] if schedule in SINGLE_STAGE else stages, microbatches, loss_fn=_loss)
    g = torch.Generator().manual_seed(1)
    batch = micro_batch_size * microbatches
    idx = torch.randint(cfg.vocab_size, (batch, sequence_length), generator=g).to(device)
    target = torch.randint(cfg.vocab_size, (batch, sequence_length), generator=g).to(device)

    def step() -> None:
        args = (idx,) if 0 in mine else ()
        kwargs = {"target": target} if S - 1 in mine else {}
        sched.step(*args, **kwargs)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()  # warm-up: metadata inference, allocator warm-up
    dist.barrier()
    rec = _Recorder(stages, time.perf_counter(), sync)
    rec.on = True
    step()  # the timed step: actions, timestamps and retained activation sets
    rec.on = False
    dist.barrier()
    if cuda:  # a further step for memory, so that metering does not disturb the timestamps
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_bytes = int(torch.cuda.max_memory_allocated())
    else:
        # Live tensor storages under a dispatch mode (MemTracker refuses a module that runs
        # several times per step, which every pipeline stage does).
        from service.validation.meter import LiveMemoryMeter
        meter = LiveMemoryMeter()
        meter.register([st.submod for st in stages], "parameters")
        with meter:
            step()
        peak_bytes = int(meter.peak.total_bytes)
    mine_out = {"rank": rank, "stages": mine, "events": rec.events, "peak_memory_bytes": peak_bytes}
    gathered: list[Any] = [None] * p if rank == 0 else None
    dist.gather_object(mine_out, gathered, dst=0)
    if rank != 0:
        return None
    return {"schedule": schedule, "stages": p, "microbatches": microbatches, "virtual_stages": v,
            "device": str(device), "model": model_spec, "micro_batch_size": micro_batch_size,
            "sequence_length": sequence_length, "ranks": gathered}


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
    ap.add_argument("--schedule", action="append", required=True,
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
    spec = {"family": "gpt2", "num_layers": a.layers, "hidden_size": a.hidden,
            "num_heads": a.heads, "vocab_size": a.vocab, "max_sequence_length": a.sequence_length,
            "tie_embeddings": False}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    results = []
    try:
        for name in a.schedule:
            res = run(name, a.microbatches, a.virtual_stages, spec, a.micro_batch_size,
                      a.sequence_length)
            if res is not None:
                results.append({"run": res, "comparison": compare_with_simulator(res)})
    finally:
        dist.destroy_process_group()
    if results:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
