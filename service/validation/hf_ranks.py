"""Data-parallel ranks of ``training.implementation: "transformers"``, measured for real.

Rank program (one process per rank, started by torchrun with the launcher of
service/validation/launch.py, gloo on CPU)::

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m service.validation.hf_ranks SPEC.json OUT.json

Every rank runs the step of planner/hf/step.py on the whole model for real, wrapped in
DistributedDataParallel(gradient_as_bucket_view=True) at zero_stage 0 (plus torch's
ZeroRedundancyOptimizer at zero_stage 1), in FSDP2 at zero_stage 2
and 3 (planner/hf/fsdp.py, with its deterministic gloo collectives), metered by the same meter
(resize_-aware under FSDP2); rank
0 gathers every rank's first and steady (highest of steps 2..) phase peaks into OUT.json. The
estimate (planner/hf/estimate.py with ``ddp``) traces one rank of the same step on torch's fake
process group (under FSDP2 every rank, each with its own shards).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from planner.catalog.specs import Breakdown, ValidationRequest
from planner.catalog.validation_specs import (
    Progress,
    RankResult,
    ValidationResult,
    relative_error,
)


def measure_ranks(req: ValidationRequest, timeout_s: float, progress=None) -> list[dict]:
    """Every rank's ``{"rank", "first", "steady"}`` (phase peaks: {phase: [breakdown, op]})."""
    from service.validation.launch import torchrun

    data = torchrun("service.validation.hf_ranks", req.parallelism.data_parallel, req,
                    timeout_s, lambda spec, out: [str(spec), str(out)], req.steps, progress)
    return sorted(data["ranks"], key=lambda r: r["rank"])


def _top(phases: dict) -> tuple[str, dict, str]:
    name = max(phases, key=lambda n: phases[n][0]["total"])
    return name, phases[name][0], phases[name][1]


def check_hf_ranks(req: ValidationRequest) -> None:
    """Refuse, with the reason, what the transformers rank program does not run."""
    from planner.catalog.hf_config import num_experts
    from planner.catalog.presets import hf_config_of
    from service.validation.runner import ValidationUnsupported
    from service.validation.support import check_transformers

    check_transformers(req)
    if req.mode == "traced":
        raise ValidationUnsupported("multi-rank validation runs real ranks (gloo collectives "
                                    "have no FakeTensorMode); use mode 'real'")
    if num_experts(hf_config_of(req.model)) and req.parallelism.expert_parallel > 1:
        raise ValidationUnsupported("multi-rank validation of implementation 'transformers' "
                                    "runs data-parallel ranks (DDP, every expert on every "
                                    "rank); expert_parallel > 1 is estimated only")
    if req.device == "cuda":
        raise ValidationUnsupported("multi-rank validation of implementation 'transformers' "
                                    "runs gloo ranks on the CPU; use device 'cpu' or 'auto'")


def _rank_estimates(req: ValidationRequest, n: int) -> list[tuple[Breakdown, Breakdown]]:
    """(steady, first step) estimate of each of ``n`` ZeRO-1 / FSDP2 ranks: each rank traced
    (their shares of the optimizer, and FSDP2's shards where a dimension does not divide the
    world size, differ)."""
    from planner.catalog.presets import hf_config_of
    from planner.hf.estimate import estimate

    cfg = hf_config_of(req.model, fill=False)
    out = []
    for rank in range(n):
        e = estimate(cfg, req.training, n, "cpu", zero_stage=req.parallelism.zero_stage,
                     rank=rank)
        out.append((Breakdown(**e.steady.breakdown), Breakdown(**e.first.breakdown)))
    return out


def run_hf_ranks(req: ValidationRequest, progress=None) -> ValidationResult:
    """A validation job of data-parallel transformers ranks: every rank measured (``ranks``)
    against its estimate: under DDP the same on every rank (one rank traced), under ZeRO-1 and
    FSDP2 each rank traced; the top level compares the highest rank estimate (what POST
    /v1/memory reports) with the rank measured highest."""
    from planner.routes.memory import estimate_memory

    check_hf_ranks(req)
    est = estimate_memory(req, device="cpu")
    z = req.parallelism.zero_stage
    if progress:
        progress(Progress(phase="building", step=0, total_steps=req.steps))
    ranks = measure_ranks(req, req.timeout_s, progress)
    if progress:
        progress(Progress(phase="comparing", step=req.steps, total_steps=req.steps))
    per_rank = _rank_estimates(req, len(ranks)) if z else \
        [(est.breakdown, est.first_step)] * len(ranks)
    out = []
    for r in ranks:
        m = Breakdown(**_top(r["steady"])[1])
        e = per_rank[r["rank"]][0]
        out.append(RankResult(rank=r["rank"], estimate=e, measured=m,
                              relative_error=relative_error(e, m)))
    w = max(out, key=lambda rr: (rr.measured.total, -rr.rank)).rank
    e = max(out, key=lambda rr: (rr.estimate.total, -rr.rank)).rank
    phase, bd, op = _top(ranks[w]["steady"])
    kind = {0: "DDP", 1: "DDP + ZeroRedundancyOptimizer"}.get(z, f"FSDP2 ZeRO-{z}")
    return ValidationResult(
        device=f"cpu x {len(ranks)} ranks (gloo, {kind})", mode=req.mode,
        estimate=per_rank[e][0], measured=Breakdown(**bd),
        relative_error=relative_error(per_rank[e][0], Breakdown(**bd)),
        first_step_estimate=per_rank[e][1],
        first_step_measured=Breakdown(**_top(ranks[w]["first"])[1]),
        peak_op=op, peak_phase=phase, ranks=out, worst_rank=e, worst_measured_rank=w)


def _steady(steps: list[dict]) -> dict:
    out: dict = {}
    for s in steps[1:]:
        for name, (bd, op) in s["phases"].items():
            if name not in out or bd["total"] > out[name][0]["total"]:
                out[name] = (bd, op)
    return out


def rank_main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from planner.catalog.presets import hf_config_of
    from planner.hf.step import run

    req = ValidationRequest.model_validate_json(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    progress = os.environ.get("MEMPLAN_PROGRESS")

    def report(step: int) -> None:
        if rank == 0 and progress:
            Path(progress).write_text(json.dumps({"step": step}))

    cfg = hf_config_of(req.model, fill=False)
    steps = run(cfg, req.training, "cpu", traced=False, steps=req.steps, on_step=report,
                ddp=True, zero_stage=req.parallelism.zero_stage)
    mine = {"rank": rank, "first": steps[0]["phases"], "steady": _steady(steps)}
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": got}))
    dist.barrier()  # no rank leaves while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is written: no interpreter teardown of torch's threads
