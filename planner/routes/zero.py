"""POST /v1/zero: one setup under ZeRO stages 0-3 and the two offload variants, side by side.

Each stage's per-rank model states and communication come from ``planner/layouts/sharding.py``;
its full breakdown (activations and the step's peak) is the very estimate POST /v1/memory gives
for that layout (``planner/routes/memory.py``).
"""

from __future__ import annotations

from contextlib import nullcontext

from planner.catalog.errors import PlanningError
from planner.catalog.presets import hf_config_of, resolve_model
from planner.catalog.specs import MemoryRequest, ParallelSpec
from planner.catalog.zero_specs import ZeroResult, ZeroStage
from planner.layouts.expert import validate as validate_expert_parallel
from planner.layouts.sharding import shard_model_states
from planner.machine import cache
from planner.machine.cache import setup_memo
from planner.routes.activation_floor import build_floor, shared_floor
from planner.routes.checkpoint_blocks import checkpointed_blocks_of
from planner.routes.memory import estimate_memory, hardware_bytes
from planner.routes.plan_suggest import keeps_activations

__all__ = ["FLOOR_FROM", "zero_stages"]

# The request's micro-batch from which the six layouts share an activation floor. Its compile
# (the single-device step's template, which the offload layouts estimate anyway) costs about
# two replays more than the replay it stands for; from b = 3 up, where b = 2 is already over the
# memory it spares each of the five steps its sizes 2..b-1, and b = 1 where the single-device
# step at 1 is over too (a 256-block step fitting no layout at b = 4: 15 replays, then 5 and a
# compile). A single setup's own search compiles ahead only from b = 5 (compile_ahead_pays).
FLOOR_FROM = 3


def _variants(parallel: ParallelSpec) -> list[ParallelSpec]:
    """Stages 0-3, then ZeRO-Offload (stage 2, optimizer on CPU) and stage 3 with parameters and
    optimizer offloaded (FSDP2 CPUOffloadPolicy)."""
    base = {"offload_optimizer": False, "offload_parameters": False,
            "fsdp_mixed_precision": False}
    # FSDP2's MixedPrecisionPolicy applies to stage 3 without offload only (the others keep
    # mixed-bf16's 16-bit parameters and fp32 master copies)
    mp = {"fsdp_mixed_precision": parallel.fsdp_mixed_precision}
    out = [parallel.model_copy(update={**base, "zero_stage": z, **(mp if z == 3 else {})})
           for z in range(4)]
    out.append(parallel.model_copy(update={**base, "zero_stage": 2, "offload_optimizer": True}))
    out.append(parallel.model_copy(update={**base, "zero_stage": 3, "offload_optimizer": True,
                                           "offload_parameters": True}))
    return out


def zero_stages(request: MemoryRequest, estimate=None) -> ZeroResult:
    """The request's setup under ZeRO stages 0, 1, 2, 3 and the two offload variants.

    ``estimate``: a ``MemoryRequest -> MemoryResult`` function giving each stage's full breakdown
    (activations and the step's peak); defaults to ``estimate_memory`` without its notes.
    """
    assert isinstance(request, MemoryRequest)
    if request.parallelism.expert_parallel > 1:  # a dense model's: 422
        validate_expert_parallel(hf_config_of(request.model), request.parallelism)
    if request.training.implementation == "transformers":
        raise PlanningError("implementation 'transformers' is estimated on one device (POST "
                            "/v1/memory); ZeRO stages describe the reference step",
                            "training.implementation")
    model = resolve_model(request.model)
    notes: list[str] = []
    if estimate is None:
        def estimate(req):  # the figures only: each stage's notes are not returned
            return estimate_memory(req, explain=False)
    stages: list[ZeroStage] = []
    variants = _variants(request.parallelism)
    if request.training.loss.kind != "standard":  # the offload layouts are not replayed
        variants = variants[:4]
        notes.append(f"loss kind {request.training.loss.kind!r}: the offload variants are left "
                     "out (a chunked loss is estimated where the step is replayed rank by rank)")
    floor, hold = None, None
    if request.hardware is not None and request.training.micro_batch_size >= FLOOR_FROM \
            and keeps_activations(request.training, request.parallelism) \
            and request.training.loss.kind == "standard":
        # the single-device step's activation floor, shared by the six layouts
        # (planner/routes/activation_floor.py; the offload variants estimate that step anyway)
        ckpt = checkpointed_blocks_of(request.training, model)
        mem = hardware_bytes(request.hardware)[1]
        if ckpt is not None and mem is not None:
            floor = build_floor(model, request.training, "cuda", ckpt, mem)
            # no size from 2 up fits any variant: each setup is estimated at the request's
            # micro-batch alone in that domain, where a template would not pay
            if floor is not None and floor.first_over(mem) == 2:
                hold = 3
    for par in variants:
        # memoised per setup: each stage's estimate below asks for the same model states
        ms = setup_memo(shard_model_states, model, request.training, par)
        with shared_floor(floor), cache.compile_after(hold) if hold else nullcontext():
            result = estimate(request.model_copy(update={"parallelism": par}))
        breakdown, fit = result.breakdown, result.fit
        stages.append(ZeroStage(stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
                                implementation=ms.implementation,
                                communication_bytes_per_step=ms.comm_bytes_per_step,
                                breakdown=breakdown, fit=fit))
        for note in ms.notes:
            if note not in notes:
                notes.append(note)
    if request.parallelism.data_parallel == 1:
        notes.append("data_parallel is 1: ZeRO shards over data-parallel ranks, so stages 1-3 "
                     "save nothing here; stages 1-3 without offload are replayed as their "
                     "implementation runs on one rank (DDP + ZeroRedundancyOptimizer owning every "
                     "tensor; FSDP2's world-size-1 path, which copies the shards into unsharded "
                     "parameters)")
    return ZeroResult(model=model, stages=stages, notes=notes)
