"""Data-parallel ranks in classes: which ranks hold the same bytes, which may be the worst, and
one replay (planner/layouts/data_parallel.py: ``ParallelProgram``) per class of ranks that hold the
same bytes, so a million-rank plan costs a few replays."""

from __future__ import annotations

from planner.catalog.optimizers import optimizer_state_bytes
from planner.catalog.specs import ParallelSpec, ResolvedModel, TrainingSpec
from planner.layouts.data_parallel import ParallelProgram
from planner.layouts.parameter_tensors import parameter_shapes
from planner.layouts.sharding import (
    RankTable,
    fsdp_local_shard_shape,
    fsdp_row_classes,
    zero1_partition,
)
from planner.step.peaks import StepPeaks
from planner.step.program import ReferenceProgram


def _numel(s: tuple[int, ...]) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def simulate_rank(model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec, rank: int,
                  device: str, checkpointed: set[int] | None = None) -> StepPeaks:
    """First-step and steady-state peaks of one data-parallel rank."""
    return ParallelProgram(model, training, parallel, rank, device=device,
                           checkpointed=checkpointed).run()


def trainable_shapes(model: ResolvedModel, training: TrainingSpec) -> list[tuple[int, ...]]:
    """Shapes of the tensors the optimizer steps, registration order (tied once)."""
    if training.lora is not None:  # the optimizer holds the trainable tensors only
        return [s for _, s in ReferenceProgram(model, training, compress=True).trainable_specs()]
    return list(parameter_shapes(model))



def empty_shard_rule(model: ResolvedModel, training: TrainingSpec,
                     parallel: ParallelSpec) -> str | None:
    """Why torch cannot run the step, when it cannot: Adafactor divides by a tensor's element
    count (torch/optim/_adafactor.py, ``p.numel() ** 0.5``), so it raises ZeroDivisionError on an
    FSDP2 rank whose shard of a trained tensor has no rows (more ranks than the chunks of its
    first dimension)."""
    n = parallel.data_parallel
    if training.optimizer != "adafactor" or parallel.zero_stage < 2 or n < 2:
        return None
    for shape in trainable_shapes(model, training):
        if shape and fsdp_local_shard_shape(shape, n, n - 1)[0] == 0:
            return (f"optimizer 'adafactor' with zero_stage {parallel.zero_stage} (FSDP2) over "
                    f"data_parallel {n}: a rank's shard of a trained tensor of shape "
                    f"{tuple(shape)} has no rows, and torch's Adafactor divides by its element "
                    "count (ZeroDivisionError); use fewer ranks, zero_stage 0-1 or another "
                    "optimizer")
    return None

def fsdp_rank_keys(model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec
                   ) -> RankTable[tuple[int, ...]]:
    """Under FSDP2: per rank, the rows of every distinct dim 0 it holds unpadded (ranks with
    equal keys hold the same bytes). Rank 0 holds the most rows of every tensor."""
    dims = sorted({s[0] for s in trainable_shapes(model, training) if s})
    return fsdp_row_classes(dims, parallel.data_parallel)


def ranks_that_differ(model: ResolvedModel, training: TrainingSpec,
                      parallel: ParallelSpec) -> list[int]:
    """One rank per distinct memory layout: ZeroRedundancyOptimizer's whole-tensor shards make
    every rank its own case; under FSDP2 the ranks that hold fewer rows of a tensor whose dim 0
    N does not divide differ from rank 0; DDP's ranks are all alike."""
    z = parallel.zero_stage
    if z == 0:
        return [0]
    keys = zero1_ownership(model, training, parallel)[0] if z == 1 else fsdp_rank_keys(
        model, training, parallel)
    first: dict[tuple, int] = {}
    for r, key in keys.runs():  # one entry per class of ranks, not per rank
        first.setdefault(key, r)
    return sorted(first.values())


def fsdp_mixed_precision_refusal(training: TrainingSpec, parallel: ParallelSpec) -> str | None:
    """Why ``parallelism.fsdp_mixed_precision`` does not apply (None when it does): FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on fp32 sharded parameters is
    mixed-bf16 on ZeRO-3 ranks, replayed without offload, tensor or pipeline parallelism."""
    p = parallel
    if not p.fsdp_mixed_precision:
        return None
    if (training.precision == "mixed-bf16" and p.zero_stage == 3 and p.data_parallel >= 2
            and not (p.offload_optimizer or p.offload_parameters)
            and p.tensor_parallel == 1 and p.pipeline_parallel == 1
            and training.precision_overrides is None):
        return None
    return ("parallelism.fsdp_mixed_precision (FSDP2 MixedPrecisionPolicy on fp32 sharded "
            "parameters) needs training.precision 'mixed-bf16' without precision_overrides, "
            "zero_stage 3, data_parallel >= 2, no offload and no tensor or pipeline parallelism "
            f"(got precision {training.precision!r}, zero_stage {p.zero_stage}, data_parallel "
            f"{p.data_parallel})")


def unsupported_reason(training: TrainingSpec, parallel: ParallelSpec) -> str | None:
    """Why this data-parallel setup is outside the replay (None when it is replayed exactly)."""
    mp = fsdp_mixed_precision_refusal(training, parallel)
    if mp is not None:
        return mp
    if parallel.tensor_parallel != 1 or parallel.pipeline_parallel != 1:
        return "tensor and pipeline parallelism are not replayed rank by rank"
    if training.precision == "amp-fp16" and parallel.zero_stage >= 1:
        return (f"precision 'amp-fp16' with ZeRO stage {parallel.zero_stage}: torch's GradScaler "
                "is not run across sharded optimizers (DDP, stage 0, runs it)")
    if training.precision_overrides is not None:
        return "precision overrides are not run by the multi-rank step"
    if training.lora is not None and training.lora.base_dtype is not None:
        return ("LoRA with a frozen base in its own dtype (16-bit or quantized) is not run by the "
                "multi-rank step; leave lora.base_dtype unset")
    if parallel.offload_optimizer or parallel.offload_parameters:
        return "CPU offload is not replayed rank by rank"
    if training.optimizer in ("adam-8bit", "lion"):
        return f"optimizer {training.optimizer!r} has no torch.optim implementation"
    return None


def zero1_ownership(model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec):
    """Under ZeroRedundancyOptimizer: per rank, the numels it owns (ranks with equal keys hold
    the same bytes), and the candidates for the worst rank (the ranks owning the most state
    bytes and the most elements)."""
    if training.lora is not None:  # the optimizer holds the trainable tensors only
        numels = [n for n, _ in ReferenceProgram(model, training, compress=True).trainable_specs()]
    else:
        numels = [_numel(s) for s in parameter_shapes(model)]  # registration order, tied once
    parts = zero1_partition(numels, parallel.data_parallel)
    dtype = "bf16" if training.precision == "bf16" else "fp32"  # mixed-*: fp32 masters
    keys = RankTable(parts.starts, [tuple(sorted(numels[i] for i in p)) for p in parts.values],
                     parts.world_size)
    worst = sorted({keys.worst(lambda k: optimizer_state_bytes(training, list(k), dtype)),
                    keys.worst(sum)})
    return keys, worst


def data_parallel_peaks(model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec,
                        device: str, checkpointed: set[int] | None = None, *,
                        every_rank: bool = True, simulate=simulate_rank, ownership=None
                        ) -> list[tuple[int, StepPeaks]]:
    """(rank, peaks) per rank; ranks that hold the same bytes are simulated once. With
    ``every_rank=False`` only the candidates for the worst rank are returned (under
    ZeroRedundancyOptimizer: the ranks owning the most state bytes and the most elements; under
    FSDP2 rank 0, which holds the most rows of every tensor), so a thousand-rank plan costs at
    most two replays. ``simulate``: simulate_rank's signature, and ``ownership``:
    zero1_ownership's (the planner passes memoised, templated ones)."""
    n = parallel.data_parallel
    if parallel.zero_stage == 0 or (parallel.zero_stage >= 2 and not every_rank):
        pk = simulate(model, training, parallel, 0, device, checkpointed)
        return [(r, pk) for r in (range(n) if every_rank else [0])]
    if parallel.zero_stage >= 2:  # every rank: one replay per distinct unpadded shard layout
        keys, worst = fsdp_rank_keys(model, training, parallel), [0]
    else:
        keys, worst = (ownership or zero1_ownership)(model, training, parallel)
    ranks = list(range(n)) if every_rank else worst
    sims: dict[tuple, StepPeaks] = {}
    out = []
    for r in ranks:
        if keys[r] not in sims:
            sims[keys[r]] = simulate(model, training, parallel, r, device, checkpointed)
        out.append((r, sims[keys[r]]))
    return out


__all__ = ["data_parallel_peaks", "fsdp_mixed_precision_refusal", "fsdp_rank_keys", "ranks_that_differ", "simulate_rank",
           "unsupported_reason", "zero1_ownership"]
