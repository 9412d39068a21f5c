"""POST /v1/plan: every parallel layout of a cluster searched, ranked by step time.

The search, per cluster size:
1. Enumerate layouts: tensor parallel t (divides the heads and KV heads; within a node unless
   allowed otherwise), pipeline parallel p (at most the layers and the limit), data parallel
   d = N/(t·p) (divides the global batch), ZeRO stage, offload, pipeline schedule and virtual
   stages, checkpoint strategy, loss kind (the chunked ones without TP and PP), micro-batch b (divides the per-replica batch, up to the limit);
   the gradient accumulation steps follow. Layouts that break a rule are counted by reason
   (``plan_space.enumerate_layouts``).
2. Prune with an exact lower bound: the per-rank parameters and optimizer states
   (``shard_model_states``, the bytes /v1/memory places there) stay live through the whole
   steady-state step, so bound + allocator reserve above the GPU's memory cannot fit
   (tests/test_plan.py holds the bound below /v1/memory's peak for every layout it evaluates).
3. Time every survivor (``plan_time.step_time``: analytic, the pipeline simulator memoised) and
   walk them fastest first, computing the planner's peak (``estimate_memory``, the very number
   /v1/memory gives) until ``top_k`` fit. Past that, a slower layout is evaluated only when its
   bound is below the lowest peak found so far: otherwise a faster layout beats it on both axes,
   so it is off the memory/time Pareto front, which is therefore exact. A pipeline layout is
   popped on its analytic lower bound and simulated only when it fits and its peak is below
   the lowest found (or top_k is not full); then it goes back in line on its simulated time.
   A step setup's template is compiled only when the space leaves it sizes to serve
   (``_compile_threshold``).

MoE models (mixtral, qwen2_moe, qwen3_moe configs) are searched by ``plan_moe`` instead: data x
expert parallel layouts of the transformers estimate, the only one that builds them.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import time

from planner.catalog.errors import PlanningError
from planner.catalog.loss_specs import LossSpec
from planner.catalog.plan_specs import (
    MAX_PLAN_CLUSTER_SIZES,
    PlanClusterResult,
    PlanLayout,
    PlanRequest,
    PlanResult,
    PlanSearch,
    StepTime,
)
from planner.catalog.presets import GPU, allocator_reserve, get_gpu, resolve_model
from planner.catalog.precision import resolve_precision
from planner.catalog.specs import (
    ActivationCheckpointing,
    MemoryRequest,
    ModelSpec,
    ParallelSpec,
    ResolvedModel,
    TrainingSpec,
)
from planner.layouts.sharding import shard_model_states
from planner.machine.cache import compile_after
from planner.machine.deadline import check
from planner.routes import plan_moe, plan_time
from planner.routes.memory import estimate_memory
from planner.routes.plan_space import enumerate_layouts
from planner.routes.plan_time import Layout, Links

# Activations kept, least first (the heap's tie-break).
_CKPT_RANK = {"full": 0, "sqrt": 1, "selective": 2, "none": 3}
# A layout's peak with strategy s is at least its peak with any strategy in _KEEPS_LESS[s] at
# the same or a smaller micro-batch: 'full' keeps only block inputs, 'sqrt' and 'selective'
# each keep a part of what 'none' keeps (the two are not ordered: 'sqrt' on 1-3 blocks
# checkpoints none of them).
_KEEPS_LESS = {"full": {"full"}, "sqrt": {"full", "sqrt"}, "selective": {"full", "selective"},
               "none": {"full", "sqrt", "selective", "none"}}


def links_for(req: PlanRequest, gpu: GPU) -> Links:
    c = req.cluster
    mfu = c.model_flops_utilization or plan_time.default_mfu(gpu)
    return Links(gpus_per_node=c.gpus_per_node,
                 intra_bytes_per_s=c.intra_node_bytes_per_s
                 or plan_time.intra_node_bytes_per_s(gpu),
                 inter_bytes_per_s=c.inter_node_bytes_per_s or gpu.network_bytes_per_s,
                 host_bytes_per_s=gpu.host_bytes_per_s, flops_per_s=gpu.peak_bf16_flops * mfu,
                 hbm_bytes_per_s=gpu.memory_bandwidth_bytes_per_s)


def training_spec(req: PlanRequest, lay: Layout) -> TrainingSpec:
    tr = req.training
    return TrainingSpec(precision=tr.precision, optimizer=tr.optimizer,
                        micro_batch_size=lay.b, sequence_length=tr.sequence_length,
                        gradient_accumulation_steps=lay.ga,
                        activation_checkpointing=_ckpt(lay.checkpoint),
                        loss=_loss(lay.loss, tr.loss_chunks))


@functools.lru_cache(maxsize=8)
def _ckpt(strategy: str) -> ActivationCheckpointing:
    return ActivationCheckpointing(strategy=strategy)


@functools.lru_cache(maxsize=64)
def _loss(kind: str, chunks: int) -> LossSpec:
    return LossSpec(kind=kind, chunks=chunks)


def parallel_spec(lay: Layout) -> ParallelSpec:
    return ParallelSpec(data_parallel=lay.dp, tensor_parallel=lay.tp,
                        pipeline_parallel=lay.pp, virtual_pipeline_stages=lay.v,
                        pipeline_schedule=lay.schedule, zero_stage=lay.zero,
                        offload_optimizer=lay.offload_optimizer,
                        offload_parameters=lay.offload_parameters)


def memory_request(req: PlanRequest, lay: Layout, hardware: bool = True) -> MemoryRequest:
    """The POST /v1/memory request of one layout."""
    return MemoryRequest(model=req.model, training=training_spec(req, lay),
                         parallelism=parallel_spec(lay),
                         hardware={"gpu": req.cluster.gpu} if hardware else None)


@functools.lru_cache(maxsize=4096)
def state_bound(model: ResolvedModel, tr: TrainingSpec, par: ParallelSpec) -> int:
    """Per-rank parameters + optimizer states: live through the whole steady-state step."""
    ms = shard_model_states(model, tr, par)
    return ms.parameters + ms.optimizer_states


def plan(req: PlanRequest) -> PlanResult:
    if req.constraints.max_cost is not None:
        for field, value in (("cluster.price_per_gpu_hour", req.cluster.price_per_gpu_hour),
                             ("training.train_tokens", req.training.train_tokens)):
            if value is None:
                raise PlanningError(f"constraints.max_cost needs {field}", field)
    model = resolve_model(req.model)
    moe = plan_moe.moe_config(req)
    if moe is not None:
        return _plan_moe(req, model, moe)
    if not model.architecture_known:
        raise PlanningError("the plan needs architecture fields (a bare parameter count has no "
                            "activations or FLOPs per layer)", "model")
    gpu = get_gpu(req.cluster.gpu)
    links = links_for(req, gpu)
    counts = req.cluster.counts()
    if len(counts) > MAX_PLAN_CLUSTER_SIZES:
        raise PlanningError(f"the range gives {len(counts)} cluster sizes; at most "
                            f"{MAX_PLAN_CLUSTER_SIZES}", "cluster.max_gpus")
    clusters = [_within_budget(req, _plan_cluster(req, model, gpu, links, n)) for n in counts]
    mfu = links.flops_per_s / gpu.peak_bf16_flops
    notes = _budget_notes(req, clusters)
    if not any(c.layouts for c in clusters):
        notes.append("no layout fits at any cluster size searched: see search.rejected for why")
    return PlanResult(clusters=clusters, assumptions=plan_time.assumptions(gpu, links, mfu),
                      notes=notes)


def _plan_moe(req: PlanRequest, model: ResolvedModel, cfg: dict) -> PlanResult:
    """An MoE model: data x expert parallel layouts (planner/routes/plan_moe.py), its
    compute the FLOPs alone (no memory-bound work)."""
    gpu = get_gpu(req.cluster.gpu)
    links = dataclasses.replace(links_for(req, gpu), hbm_bytes_per_s=float("inf"))
    counts = req.cluster.counts()
    if len(counts) > MAX_PLAN_CLUSTER_SIZES:
        raise PlanningError(f"the range gives {len(counts)} cluster sizes; at most "
                            f"{MAX_PLAN_CLUSTER_SIZES}", "cluster.max_gpus")
    clusters = [_within_budget(req, plan_moe.plan_cluster(req, cfg, model, gpu, links, n))
                for n in counts]
    mfu = links.flops_per_s / gpu.peak_bf16_flops
    notes = ["MoE model: layouts over data and expert parallelism only (tensor and pipeline "
             "parallel 1, ZeRO 0; the transformers estimate composes with nothing else)"]
    notes += _budget_notes(req, clusters)
    if not any(c.layouts for c in clusters):
        notes.append("no layout fits at any cluster size searched: see search.rejected for why")
    return PlanResult(clusters=clusters,
                      assumptions=plan_time.assumptions(gpu, links, mfu) + plan_moe.ASSUMPTIONS,
                      notes=notes)


def _within_budget(req: PlanRequest, c: PlanClusterResult) -> PlanClusterResult:
    """The cluster size's answer without the layouts over constraints.max_cost. At one cluster
    size the cost is proportional to the step time, so the layouts left are the fastest ones of
    the ranking, and a layout past top_k (slower than every one kept) is over budget too."""
    cap = req.constraints.max_cost
    if cap is None:
        return c
    over = {_key(e) for e in c.layouts + c.pareto_front if e.cost_to_train > cap}
    if not over:
        return c
    rejected = {**c.search.rejected, "over_budget": len(over)}
    return c.model_copy(update={
        "layouts": [e for e in c.layouts if e.cost_to_train <= cap],
        "pareto_front": [e for e in c.pareto_front if e.cost_to_train <= cap],
        "search": c.search.model_copy(update={"rejected": rejected})})


def _key(e: PlanLayout) -> tuple:
    return (e.data_parallel, e.tensor_parallel, e.pipeline_parallel, e.virtual_pipeline_stages,
            e.pipeline_schedule, e.expert_parallel, e.zero_stage, e.offload_optimizer,
            e.offload_parameters, e.activation_checkpointing, e.loss, e.micro_batch_size)


def _budget_notes(req: PlanRequest, clusters: list[PlanClusterResult]) -> list[str]:
    cap = req.constraints.max_cost
    if cap is None:
        return []
    over = [c.num_gpus for c in clusters if not c.layouts and c.search.rejected.get("over_budget")]
    costs = [(e.cost_to_train, c.num_gpus) for c in clusters for e in c.layouts[:1]]
    notes = [f"no fitting layout trains {req.training.train_tokens:.3g} tokens within the budget "
             f"({cap:g}) on {', '.join(map(str, over))} GPUs"] if over else []
    if costs:
        cost, n = min(costs)
        notes.append(f"cheapest within the budget: {cost:.6g} on {n} GPUs (the fastest layout "
                     "of each size is its cheapest)")
    return notes


def _plan_cluster(req: PlanRequest, model: ResolvedModel, gpu: GPU, links: Links,
                  n: int) -> PlanClusterResult:
    t0 = time.perf_counter()
    rejected: dict[str, int] = {}
    cands = enumerate_layouts(req, model, n, rejected)
    with compile_after(_compile_threshold(cands)):
        return _search(req, model, gpu, links, n, cands, rejected, t0)


def _compile_threshold(cands: list[Layout]) -> int:
    """The distinct size at which a step setup's template is compiled in this search. A setup
    is asked for micro-batch 1 (its own domain) and the sizes >= 2 of the layouts; a compile
    costs about three replays (planner/machine/cache.py), so it pays only when at least two sizes
    are left after it: with n sizes >= 2, compile at the second only when n >= 4, else never
    (n + 1). The answers are the same either way (a template equals the replay)."""
    n = len({lay.b for lay in cands if lay.b >= 2})
    return 2 if n >= 4 else max(2, n + 1)


def _search(req: PlanRequest, model: ResolvedModel, gpu: GPU, links: Links, n: int,
            cands: list[Layout], rejected: dict[str, int], t0: float) -> PlanClusterResult:
    space = len(cands) + sum(rejected.values())
    mem = gpu.memory_bytes
    tr0 = training_spec(req, Layout(1, 1, 1, 1, "1f1b", 0, False, False, "none", 1, 1))
    prec = resolve_precision(tr0)
    act_bytes = 4 if req.training.precision == "fp32" else 2
    grad_bytes = 2 if prec.grad_dtype in ("bf16", "fp16") else 4
    bounds: dict[tuple, int] = {}
    heap: list[tuple] = []  # (step time or its lower bound, b, strategy rank, index, exact, ...)
    seq = req.training.sequence_length
    pruned = 0
    for i, lay in enumerate(cands):
        if i % 512 == 0:
            check()
        key = (lay.dp, lay.tp, lay.pp, lay.zero, lay.offload_optimizer, lay.offload_parameters)
        bound = bounds.get(key)
        if bound is None:
            bound = bounds[key] = state_bound(model, tr0, parallel_spec(lay))
        if bound + allocator_reserve(bound, "cuda") > mem:
            pruned += 1
            continue
        low = plan_time.step_time(model, seq, act_bytes, grad_bytes, lay, links, exact=False)
        heap.append((low.step_s, lay.b, _CKPT_RANK[lay.checkpoint], i, False, lay, bound, low))
    heapq.heapify(heap)
    fits: list[PlanLayout] = []
    front: list[PlanLayout] = []
    lowest = None
    evaluated = over = skipped = 0
    top_k = req.constraints.top_k
    seen: dict[tuple, list[tuple[str, int, int]]] = {}  # family -> (strategy, b, peak)
    implied = 0
    while heap:
        step_s, _, _, i, exact, lay, bound, parts, *known = heapq.heappop(heap)
        fam = (lay.dp, lay.tp, lay.pp, lay.v, lay.schedule, lay.zero, lay.offload_optimizer,
               lay.offload_parameters, lay.loss)
        rank = _CKPT_RANK[lay.checkpoint]
        if not known:
            less = _KEEPS_LESS[lay.checkpoint]
            for s0, b0, peak0 in seen.get(fam, ()):  # peaks monotone in b and strategy
                if s0 in less and b0 <= lay.b and peak0 > bound:
                    bound = peak0
            if bound + allocator_reserve(bound, "cuda") > mem:
                implied += 1
                continue
        # the step time popped is exact or a lower bound: every layout popped before is no
        # slower, so a bound at or above the lowest peak so far is dominated
        if len(fits) >= top_k and lowest is not None and bound >= lowest:
            skipped += 1
            continue
        if known:
            r = known[0]
        else:
            check()
            r = estimate_memory(memory_request(req, lay, hardware=False), explain=False)
            evaluated += 1
            seen.setdefault(fam, []).append((lay.checkpoint, lay.b, r.breakdown.total))
        total = r.breakdown.total
        reserve = r.allocator_reserve_bytes
        if total + reserve > mem:
            over += 1
            continue
        if not exact and lay.pp > 1:  # it fits: now its simulated time, and back in line
            if len(fits) >= top_k and lowest is not None and total >= lowest:
                # popped again, it would be skipped by the test above (its peak is its bound
                # then; lowest only falls): dominated, so not simulated
                skipped += 1
                continue
            parts = plan_time.step_time(model, seq, act_bytes, grad_bytes, lay, links)
            heapq.heappush(heap, (parts.step_s, lay.b, rank, i, True, lay, total, parts, r))
            continue
        on_front = lowest is None or total < lowest
        p2p = plan_time.p2p_exposed_s(model, seq, act_bytes, lay, links)
        parts = dataclasses.replace(parts, pp_s=p2p, bubble_s=max(0.0, parts.bubble_s - p2p))
        entry = _layout(req, model, n, lay, r, mem, parts, on_front)
        if len(fits) < top_k:
            fits.append(entry)
        if on_front:
            front.append(entry)
            lowest = total
    if pruned:
        rejected["model_states_exceed_memory"] = pruned
    if over:
        rejected["peak_exceeds_memory"] = over
    if implied:
        rejected["peak_exceeds_memory_implied"] = implied
    if skipped:
        rejected["dominated_not_evaluated"] = skipped
    front.sort(key=lambda e: (e.peak_bytes, e.time.step_s))
    kept: list[PlanLayout] = []
    for e in front:  # equal step times: only the lowest peak is undominated
        if not kept or e.time.step_s < kept[-1].time.step_s:
            kept.append(e)
    front = kept
    on_front = {id(k) for k in kept}
    fits = [f if f.pareto == (id(f) in on_front) else
            f.model_copy(update={"pareto": id(f) in on_front}) for f in fits]
    search = PlanSearch(space_size=space, pruned_by_bound=pruned, evaluated=evaluated,
                        rejected=rejected, seconds=time.perf_counter() - t0)
    return PlanClusterResult(num_gpus=n, layouts=fits, pareto_front=front, search=search)


def _layout(req: PlanRequest, model: ResolvedModel, n: int, lay: Layout, r, mem: int,
            parts: plan_time.TimeParts, pareto: bool) -> PlanLayout:
    tokens = req.training.sequences * req.training.sequence_length
    tps = tokens / parts.step_s
    gpu = get_gpu(req.cluster.gpu)
    mfu = plan_time.model_flops_per_token(model, req.training.sequence_length) * tps / (
        n * gpu.peak_bf16_flops)
    total, reserve = r.breakdown.total, r.allocator_reserve_bytes
    return PlanLayout(
        num_gpus=n, data_parallel=lay.dp, tensor_parallel=lay.tp, pipeline_parallel=lay.pp,
        virtual_pipeline_stages=lay.v, pipeline_schedule=lay.schedule, zero_stage=lay.zero,
        offload_optimizer=lay.offload_optimizer, offload_parameters=lay.offload_parameters,
        activation_checkpointing=lay.checkpoint, loss=lay.loss, micro_batch_size=lay.b,
        gradient_accumulation_steps=lay.ga, peak_bytes=total, breakdown=r.breakdown,
        allocator_reserve_bytes=reserve, fits=True, headroom_bytes=mem - total - reserve,
        time=StepTime(compute_s=parts.compute_s, tensor_parallel_s=parts.tp_s,
                      data_parallel_s=parts.dp_s, pipeline_p2p_s=parts.pp_s,
                      offload_s=parts.offload_s, bubble_s=parts.bubble_s, step_s=parts.step_s),
        tokens_per_s=tps, model_flops_utilization=mfu,
        time_to_train_s=(req.training.train_tokens / tps) if req.training.train_tokens else None,
        cost_to_train=plan_moe.cost_to_train(req, n, tps), pareto=pareto)


def model_spec_of(model: ResolvedModel) -> ModelSpec:
    """A ModelSpec naming ``model`` by its architecture fields."""
    return ModelSpec(family=model.family, num_layers=model.num_layers,
                     hidden_size=model.hidden_size, num_heads=model.num_heads,
                     num_kv_heads=model.num_kv_heads, ffn_hidden_size=model.ffn_hidden_size,
                     vocab_size=model.vocab_size, tie_embeddings=model.tie_embeddings)
