"""POST /v1/plan for MoE models (Hugging Face mixtral, qwen2_moe, qwen3_moe configs): the layouts
searched over data parallelism d = N and expert parallelism ep (every divisor of d that divides
the experts), micro-batch and checkpoint strategy ('none', 'full'). A layout whose peak floor
(``planner/layouts/expert_bounds.py``: model states under ep, the optimizer step's scratch, an
activation floor; closed forms) plus the allocator reserve is over the GPU's memory is rejected
without a trace; the rest get POST /v1/memory's peak. Every accumulation count from 2 up shares
one trace (``planner/hf/estimate.py``), every ep of a micro-batch and strategy one trace.

MoE models are estimated only through ``training.implementation: "transformers"``, one DDP
rank's trace (data parallelism at ZeRO 0) that composes with expert parallelism
(``planner/layouts/expert.py``) and with nothing else: tensor and pipeline parallelism stay 1 and
ZeRO 0 here (stated in the answer's notes). Each layout's peak is POST /v1/memory's for it (the
very function). Step time, per device (stated in the assumptions):

- compute: FLOPs per token forward 2·P_active + 4·s·h·L, P_active the matmul parameters a token
  uses (all but the input embedding; of the routed experts k/E of them), backward twice the
  forward, 'full' checkpointing one more forward of the blocks; at the cluster's rate;
- expert parallelism: per sparse block and micro-batch the dispatched tokens b·s·k·h·a bytes,
  (ep-1)/ep of them crossing, in two all-to-alls (dispatch, combine) forward and two backward
  (two more in a recomputed forward), over the group's link, not overlapped;
- data parallelism: the dense gradients all-reduced over d ranks and the experts' over the d/ep
  ranks holding the same experts, overlapped with the last micro-batch's backward (only the
  excess exposed).
"""

from __future__ import annotations

import time

from planner.catalog.errors import PlanningError
from planner.catalog.hf_config import dims, expert_tensor_numels, num_experts
from planner.catalog.plan_specs import (
    PlanClusterResult,
    PlanLayout,
    PlanRequest,
    PlanSearch,
    StepTime,
)
from planner.catalog.precision import DTYPE_BYTES, PRESETS
from planner.catalog.presets import GPU, allocator_reserve, hf_config_of
from planner.catalog.specs import (
    ActivationCheckpointing,
    Assumption,
    MemoryRequest,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.expert_bounds import peak_floor
from planner.machine.deadline import check
from planner.routes.plan_time import Links, all_reduce_s

STRATEGIES = ("none", "full")  # what the transformers step runs
MAX_MOE_LAYOUTS = 4096

ASSUMPTIONS = [
    Assumption(name="moe_layouts", value="data x expert parallel, ZeRO 0",
               note="MoE models are estimated through implementation 'transformers' (one DDP "
               "rank's trace composed with expert_parallel): tensor and pipeline parallel 1"),
    Assumption(name="moe_compute", value="2*P_active + 4*s*h*L FLOPs per token forward",
               note="P_active: matmul parameters a token uses (routed experts: top_k of E); "
               "backward 2x forward; 'full' checkpointing adds the blocks' forward"),
    Assumption(name="expert_parallel_all_to_all",
               value="b*s*top_k*hidden*bytes, (ep-1)/ep crossing",
               note="per sparse block and micro-batch: dispatch and combine in forward, both "
               "again in backward (and in a recomputed forward); balanced routing; not "
               "overlapped; over the expert-parallel group's link"),
    Assumption(name="moe_data_parallel", value="dense grads over d, expert grads over d/ep",
               note="all-reduces overlapped with the last micro-batch's backward"),
]


def moe_config(req: PlanRequest) -> dict | None:
    """The normalised config of an MoE model, else None."""
    cfg = hf_config_of(req.model)
    return cfg if cfg is not None and num_experts(cfg) else None


def training_spec(req: PlanRequest, b: int, ga: int, ckpt: str) -> TrainingSpec:
    from planner.hf.step import unsupported

    tr = req.training
    try:
        spec = TrainingSpec(precision=tr.precision, optimizer=tr.optimizer, micro_batch_size=b,
                            sequence_length=tr.sequence_length, gradient_accumulation_steps=ga,
                            activation_checkpointing=ActivationCheckpointing(strategy=ckpt),
                            implementation="transformers")
    except ValueError as exc:  # pydantic: a field the transformers step cannot take
        raise PlanningError(f"training: {exc}", "training") from None
    why = unsupported(spec)
    if why is not None:
        raise PlanningError(f"MoE models are planned through implementation 'transformers': "
                            f"{why[1]}", why[0])
    return spec


def memory_request(req: PlanRequest, d: int, ep: int, b: int, ga: int, ckpt: str,
                   hardware: bool = True) -> MemoryRequest:
    """The POST /v1/memory request of one MoE layout."""
    return MemoryRequest(model=req.model, training=training_spec(req, b, ga, ckpt),
                         parallelism=ParallelSpec(data_parallel=d, expert_parallel=ep),
                         hardware={"gpu": req.cluster.gpu} if hardware else None)


def _sizes(cfg: dict, model: ResolvedModel) -> tuple[float, int, int]:
    """(active matmul parameters per token, dense parameters, expert parameters)."""
    d = dims(cfg)
    x = sum(expert_tensor_numels(cfg))
    dense = model.num_parameters - x
    k, E = cfg.get("num_experts_per_tok") or 0, num_experts(cfg)
    embed = d["vocab"] * d["hidden"]  # the input lookup (the tied head is a matmul: kept)
    matmul = model.num_parameters - (0 if model.tie_embeddings else embed)
    return matmul - x + x * k / E, dense, x


def step_time(cfg: dict, model: ResolvedModel, req: PlanRequest, links: Links, d: int, ep: int,
              b: int, ga: int, ckpt: str) -> tuple[StepTime, float]:
    """(the step's time parts, model FLOPs per token) of one layout (module docstring)."""
    dd = dims(cfg)
    s, h, L = req.training.sequence_length, dd["hidden"], dd["layers"]
    a = 4 if req.training.precision == "fp32" else 2
    g = int(DTYPE_BYTES[PRESETS[req.training.precision].grad_dtype])  # 2 for bf16 and mixed-*
    active, dense, x = _sizes(cfg, model)
    head = dd["vocab"] * h
    tokens = b * s
    fwd = tokens * (2 * active + 4 * s * h * L)
    blocks_fwd = tokens * (2 * (active - head) + 4 * s * h * L)
    rec = blocks_fwd if ckpt == "full" else 0.0
    compute = ga * (3 * fwd + rec) / links.flops_per_s
    sparse = len(expert_tensor_numels(cfg)) // 2
    k = cfg.get("num_experts_per_tok") or 0
    one = tokens * h * a * k * (ep - 1) / ep / links.bandwidth(ep) if ep > 1 else 0.0
    a2a = ga * sparse * one * (4 + (2 if ckpt == "full" else 0))
    back = (2 * fwd + rec) / links.flops_per_s + sparse * one * (2 + (2 if ckpt == "full" else 0))
    grads = all_reduce_s(dense * g, d, links.bandwidth(d)) + all_reduce_s(
        x / ep * g, d // ep, links.bandwidth(d // ep, ep))
    dp = max(0.0, grads - back)
    total = compute + a2a + dp
    parts = StepTime(compute_s=compute, tensor_parallel_s=0.0, data_parallel_s=dp,
                     pipeline_p2p_s=0.0, expert_parallel_s=a2a, offload_s=0.0, bubble_s=0.0,
                     step_s=total)
    return parts, 6 * active + 12 * L * h * s


def plan_cluster(req: PlanRequest, cfg: dict, model: ResolvedModel, gpu: GPU, links: Links,
                 n: int) -> PlanClusterResult:
    from planner.routes.memory import estimate_memory

    t0 = time.perf_counter()
    tr = req.training
    rejected: dict[str, int] = {}
    E, B = num_experts(cfg), tr.sequences
    if B % n:
        rejected["batch_not_divisible"] = 1
        search = PlanSearch(space_size=1, pruned_by_bound=0, evaluated=0, rejected=rejected,
                            seconds=time.perf_counter() - t0)
        return PlanClusterResult(num_gpus=n, layouts=[], pareto_front=[], search=search)
    local = B // n
    ckpts = [c for c in tr.checkpoint_strategies if c in STRATEGIES]
    if not ckpts:
        raise PlanningError("MoE models are planned through implementation 'transformers', "
                            f"which runs checkpoint strategies {', '.join(STRATEGIES)}",
                            "training.checkpoint_strategies")
    eps = [e for e in range(1, n + 1) if n % e == 0 and E % e == 0]
    mbs = [b for b in range(1, min(local, tr.max_micro_batch_size) + 1) if local % b == 0]
    if len(eps) * len(mbs) * len(ckpts) > MAX_MOE_LAYOUTS:
        raise PlanningError(f"the MoE search would evaluate more than {MAX_MOE_LAYOUTS} layouts: "
                            "narrow training.max_micro_batch_size", "training.max_micro_batch_size")
    found: list[PlanLayout] = []
    over = evaluated = pruned = 0
    tokens = B * tr.sequence_length
    mem = gpu.memory_bytes
    for ck in ckpts:
        for b in mbs:
            ga = local // b
            spec = training_spec(req, b, ga, ck)
            for ep in eps:
                check()
                floor = peak_floor(cfg, model.num_parameters, spec, ep, n)
                if floor + allocator_reserve(floor, "cuda") > mem:
                    pruned += 1
                    continue
                r = estimate_memory(memory_request(req, n, ep, b, ga, ck, hardware=False),
                                    explain=False)
                evaluated += 1
                total, reserve = r.breakdown.total, r.allocator_reserve_bytes
                if total + reserve > mem:
                    over += 1
                    continue
                parts, mflops = step_time(cfg, model, req, links, n, ep, b, ga, ck)
                tps = tokens / parts.step_s
                found.append(PlanLayout(
                    num_gpus=n, data_parallel=n, tensor_parallel=1, pipeline_parallel=1,
                    virtual_pipeline_stages=1, pipeline_schedule="1f1b", expert_parallel=ep,
                    zero_stage=0, offload_optimizer=False, offload_parameters=False,
                    activation_checkpointing=ck, micro_batch_size=b,
                    gradient_accumulation_steps=ga, peak_bytes=total, breakdown=r.breakdown,
                    allocator_reserve_bytes=reserve, fits=True,
                    headroom_bytes=gpu.memory_bytes - total - reserve, time=parts,
                    tokens_per_s=tps, model_flops_utilization=mflops * tps / (
                        n * gpu.peak_bf16_flops),
                    time_to_train_s=(tr.train_tokens / tps) if tr.train_tokens else None,
                    cost_to_train=cost_to_train(req, n, tps)))
    if pruned:
        rejected["peak_floor_exceeds_memory"] = pruned
    if over:
        rejected["peak_exceeds_memory"] = over
    found.sort(key=lambda e: (e.time.step_s, e.peak_bytes))
    front: list[PlanLayout] = []
    for e in sorted(found, key=lambda e: (e.peak_bytes, e.time.step_s)):
        if not front or e.time.step_s < front[-1].time.step_s:
            front.append(e)
    on = {id(e) for e in front}
    front = [e.model_copy(update={"pareto": True}) for e in front]
    top = [e.model_copy(update={"pareto": id(e) in on}) for e in found[:req.constraints.top_k]]
    search = PlanSearch(space_size=evaluated + pruned, pruned_by_bound=pruned,
                        evaluated=evaluated,
                        rejected=rejected, seconds=time.perf_counter() - t0)
    return PlanClusterResult(num_gpus=n, layouts=top, pareto_front=front, search=search)


def cost_to_train(req: PlanRequest, n: int, tokens_per_s: float) -> float | None:
    """n GPUs for train_tokens / tokens_per_s seconds at cluster.price_per_gpu_hour."""
    price, tokens = req.cluster.price_per_gpu_hour, req.training.train_tokens
    if price is None or tokens is None:
        return None
    return n * tokens / tokens_per_s / 3600 * price
