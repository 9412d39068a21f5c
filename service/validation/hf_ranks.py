"""Data-parallel ranks of ``training.implementation: "transformers"``, measured for real.

Rank program (one process per rank, started by torchrun with the launcher of
service/validation/launch.py, gloo on CPU)::

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m service.validation.hf_ranks SPEC.json OUT.json

Every rank runs the step of planner/hf/step.py on the whole model for real, wrapped in
DistributedDataParallel(gradient_as_bucket_view=True), metered by the same LiveMemoryMeter; rank
0 gathers every rank's first and steady (highest of steps 2..) phase peaks into OUT.json. The
estimate (planner/hf/estimate.py with ``ddp``) traces one rank of the same step on torch's fake
process group.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from planner.catalog.specs import ValidationRequest


def measure_ranks(req: ValidationRequest, timeout_s: float) -> list[dict]:
    """Every rank's ``{"rank", "first", "steady"}`` (phase peaks: {phase: [breakdown, op]})."""
    from service.validation.launch import torchrun

    data = torchrun("service.validation.hf_ranks", req.parallelism.data_parallel, req,
                    timeout_s, lambda spec, out: [str(spec), str(out)], req.steps)
    return sorted(data["ranks"], key=lambda r: r["rank"])


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
                ddp=True)
    mine = {"rank": rank, "first": steps[0]["phases"], "steady": _steady(steps)}
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"ranks": got}))
    dist.barrier()  # no rank leaves while another is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
