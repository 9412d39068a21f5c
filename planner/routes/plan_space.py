"""The layouts POST /v1/plan searches at one cluster size: step 1 of ``plan_search``'s search.

``enumerate_layouts`` lists every way of running the request on ``n`` GPUs that its rules
allow: tensor parallel t dividing the heads and KV heads (within a node unless allowed
otherwise), pipeline parallel p up to the layers and the limit, data parallel d = n/(t·p)
dividing the global batch; then, per micro-batch b dividing the per-replica batch (the gradient
accumulation steps follow), the pipeline schedules and virtual stages, ZeRO stages, offloads,
checkpoint strategies and loss kinds. A combination that breaks a rule is not listed but
counted by the rule's reason (the answer's ``search.rejected``); a chunked loss is listed only
where the layout replays it (``planner/routes/loss_rules.py``). A request that would list more
than ``MAX_CANDIDATES`` layouts at one size is refused (422).
"""

from __future__ import annotations

import functools

from planner.catalog.errors import PlanningError
from planner.catalog.loss_specs import LossSpec
from planner.catalog.plan_specs import PlanRequest
from planner.catalog.specs import MAX_STAGE_MICROBATCHES, ParallelSpec, ResolvedModel, TrainingSpec
from planner.machine.deadline import check
from planner.routes.loss_rules import loss_refusal
from planner.routes.plan_time import Layout

__all__ = ["MAX_CANDIDATES", "enumerate_layouts"]

MAX_CANDIDATES = 200_000  # layouts one cluster size may enumerate (422 beyond)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(req: PlanRequest, model: ResolvedModel, n: int,
                      rejected: dict[str, int]) -> list[Layout]:
    """Every layout of ``n`` GPUs the request allows; the rest counted in ``rejected``."""
    tr, con, cl = req.training, req.constraints, req.cluster
    B, L = tr.sequences, model.num_layers
    kv = model.num_kv_heads or model.num_heads
    out: list[Layout] = []

    def reject(reason: str, k: int = 1) -> None:
        rejected[reason] = rejected.get(reason, 0) + k

    ckpts = tr.checkpoint_strategies
    for t in _divisors(n):
        if model.num_heads % t or kv % t:
            reject("tensor_parallel_does_not_divide_heads")
            continue
        if t > con.max_tensor_parallel:
            reject("tensor_parallel_above_limit")
            continue
        if con.tensor_parallel_within_node and t > cl.gpus_per_node:
            reject("tensor_parallel_exceeds_node")
            continue
        for p in _divisors(n // t):
            if p > con.max_pipeline_parallel:
                reject("pipeline_deeper_than_limit")
                continue
            if p > L:
                reject("pipeline_deeper_than_layers")
                continue
            d = n // (t * p)
            if B % d:
                reject("batch_not_divisible")
                continue
            local = B // d
            zeros = [z for z in con.zero_stages if d > 1 or z == 0] or [0]
            scheds = [("1f1b", 1)] if p == 1 else []
            if p > 1:
                if "1f1b" in con.pipeline_schedules:
                    scheds.append(("1f1b", 1))
                if "interleaved-1f1b" in con.pipeline_schedules:
                    v = 2
                    while v <= con.max_virtual_stages and p * v <= L:
                        scheds.append(("interleaved-1f1b", v))
                        v *= 2
            check()
            for b in (x for x in _divisors(local) if x <= tr.max_micro_batch_size):
                ga = local // b
                for sched, v in scheds:
                    if p > 1 and (ga < p or p * v * ga > MAX_STAGE_MICROBATCHES or (
                            v > 1 and ga % max(1, ga // p))):
                        reject("too_few_microbatches_for_schedule", len(zeros) * len(ckpts))
                        continue
                    for z in zeros:
                        offloads = [(False, False)]
                        if con.allow_offload and z >= 1:
                            offloads.append((True, False))
                            if z == 3:
                                offloads.append((True, True))
                        for oo, op in offloads:
                            kinds = _losses(req, d, t, p, z, oo, op)
                            if len(kinds) < len(tr.loss_kinds):
                                reject("loss_not_replayed_by_layout",
                                       (len(tr.loss_kinds) - len(kinds)) * len(ckpts))
                            for ck in ckpts:
                                for loss in kinds:
                                    out.append(Layout(d, t, p, v, sched if p > 1 else "1f1b", z,
                                                      oo, op, ck, b, ga, loss=loss))
                if len(out) > MAX_CANDIDATES:
                    raise PlanningError(f"the search would enumerate more than {MAX_CANDIDATES} "
                                        "layouts: narrow training.max_micro_batch_size or the "
                                        "constraints", "training.max_micro_batch_size")
    return out


def _losses(req: PlanRequest, d: int, t: int, p: int, z: int, oo: bool,
            op: bool) -> list[str]:
    """The request's loss kinds this layout replays ('standard' always; the chunked ones where
    planner/routes/loss_rules.py does not refuse them)."""
    kinds = req.training.loss_kinds
    if kinds == ["standard"]:
        return kinds
    return [k for k in kinds if k == "standard" or _loss_replayed(
        req.training.precision, req.training.optimizer, k, d, t, p, z, oo, op)]


@functools.lru_cache(maxsize=4096)
def _loss_replayed(precision: str, optimizer: str, kind: str, d: int, t: int, p: int, z: int,
                   oo: bool, op: bool) -> bool:
    tr = TrainingSpec(precision=precision, optimizer=optimizer, loss=LossSpec(kind=kind))
    par = ParallelSpec(data_parallel=d, tensor_parallel=t, pipeline_parallel=p, zero_stage=z,
                       offload_optimizer=oo, offload_parameters=op)
    return loss_refusal(tr, par) is None
