"""Multi-rank validation: the reference step under DDP and ZeRO 1/2/3, measured rank by rank.

Rank program (one process per rank, started by torchrun)::

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m service.validation.distributed SPEC.json OUT.json

gloo on CPU, NCCL on CUDA. Every rank builds the reference model of ``service.validation.step``
with the same seed, wraps it as ``parallelism.zero_stage`` says, and runs ``steps`` optimizer
steps on its own batch (seeded by rank). The implementations, one per stage (``planner/layouts/sharding.py``
and ``planner/layouts/data_parallel.py`` describe the same ones):

- 0: ``DistributedDataParallel(gradient_as_bucket_view=True, broadcast_buffers=False)``: the
  reducer's flat buckets are allocated at construction and ``param.grad`` is a view into them.
- 1: the same DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer``: whole tensors are
  assigned to ranks (uneven shards); each rank steps its own and broadcasts them.
- 2: FSDP2 ``fully_shard(reshard_after_forward=False)`` per block and on the root.
- 3: FSDP2 ``fully_shard`` per block and on the root (the next block's all-gather prefetched).
- ``fsdp_mixed_precision`` on stage 3 (mixed-bf16): the model built in fp32 and every
  ``fully_shard`` given ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; the plain
  torch optimizer steps the fp32 shards (torchtitan's recipe: no separate master copy).
- ``offload_parameters`` / ``offload_optimizer`` on stage 3: FSDP2 ``CPUOffloadPolicy`` (sharded
  parameters, gradients and the optimizer step in host memory). ZeroRedundancyOptimizer has no
  offload, so stage 1-2 offload is refused.

Memory per rank: ``DistributedMeter`` (``LiveMemoryMeter`` plus FSDP2's storage resizes, which no
dispatch mode sees) on every device, the caching allocator's peak on CUDA. Categories: sharded
and unsharded parameters -> parameters; ``param.grad`` (DDP bucket views, FSDP sharded grads) ->
gradients; optimizer state -> optimizer_states; everything allocated inside FSDP2's all-gather and
reduce-scatter (flat buffers) -> temporaries; the rest as in the single-device meter.

``run_multi_rank`` is what a validation job with world size > 1 runs: it launches the ranks in
their own process group with a wall-clock limit, reads every rank's breakdowns and compares each
with the planner's per-rank estimate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from planner.catalog.specs import Breakdown, ValidationRequest
from planner.catalog.validation_specs import (
    Progress,
    RankResult,
    ValidationResult,
    relative_error,
)
from planner.hf.fsdp import DistributedMeter
from planner.hf.fsdp import fsdp_collectives_as as _fsdp_collectives_as
from planner.hf.fsdp import fsdp_unsharded as _fsdp_unsharded
from planner.hf.gloo_comms import install_gloo_comms
from service.validation.launch import torchrun

ProgressFn = Callable[[Progress], None]
# Precisions whose optimizer steps the parameters the wrapper owns (no separate fp32 master copy,
# no loss scaler reading gradient values across sharded optimizers).
MULTI_RANK_PRECISIONS = ("fp32", "amp-bf16", "bf16")


# ---- the meter: planner/hf/fsdp.py (DistributedMeter, fsdp_collectives_as) ----------------------
# ---- the rank program ----------------------------------------------------------------------------
def _optimizer_class_and_defaults(training, params) -> tuple[type, dict]:
    import inspect

    from service.validation import step as S

    probe = S.make_optimizer(training, [torch.nn.Parameter(torch.zeros(1))])
    accepted = inspect.signature(type(probe).__init__).parameters
    return type(probe), {k: v for k, v in probe.defaults.items() if k in accepted}


def rank_main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from planner.catalog.presets import resolve_model
    from service.validation import step as S
    from service.validation.runner import _device as device_for

    req = ValidationRequest.model_validate_json(Path(spec_path).read_text())
    cuda = device_for(req).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    par, tr = req.parallelism, req.training
    z = par.zero_stage
    cfg = resolve_model(req.model)
    progress_path = os.environ.get("MEMPLAN_PROGRESS")

    def report(step: int) -> None:
        if rank == 0 and progress_path:
            Path(progress_path).write_text(json.dumps({"step": step}))

    torch.manual_seed(0)
    mp = par.fsdp_mixed_precision  # fp32 model: FSDP2 casts the all-gathered copies to bf16
    s = S.build(cfg, tr.model_copy(update={"precision": "fp32"}) if mp else tr, dev)
    s.optimizer = None  # type: ignore[assignment]  # rebuilt over the wrapped parameters
    model = s.model

    class LossModule(nn.Module):
        """The step's forward and loss as one module call, so the wrappers' hooks run."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
            return S.forward_loss(s, idx, tgt, on_recompute=lambda: meter.in_phase("recompute"))

    idx, tgt = S.make_batch(cfg, tr, dev, seed=rank)
    meter = DistributedMeter()
    steps: list[dict] = []
    with meter:
        with meter.in_phase("other"):
            root: nn.Module = LossModule()
            zero_opt = None
            if z <= 1:
                from torch.nn.parallel import DistributedDataParallel as DDP

                meter.register(model, "parameters")
                root = DDP(root, device_ids=[local] if cuda else None,
                           gradient_as_bucket_view=True, broadcast_buffers=False)
                params = [p for p in model.parameters() if p.requires_grad]
                if z == 0:
                    opt = S.step_optimizer(tr, params, s.loss_scale)
                else:
                    from torch.distributed.optim import ZeroRedundancyOptimizer

                    cls, kw = _optimizer_class_and_defaults(tr, params)
                    if S.PRECISIONS[tr.precision][2]:  # mixed-*: fp32 masters of the shard
                        inner_cls, scale = cls, s.loss_scale

                        class _ShardMasters(S.MasterWeightOptimizer):
                            def __init__(self, ps, **defaults):  # ps: ZeRO's param groups
                                flat = [q for g in ps for q in (
                                    g["params"] if isinstance(g, dict) else [g])]
                                super().__init__(flat, lambda m: inner_cls(m, **defaults),
                                                 loss_scale=scale)

                        cls = _ShardMasters
                    opt = zero_opt = ZeroRedundancyOptimizer(params, optimizer_class=cls, **kw)
            else:
                from torch.distributed.fsdp import (
                    CPUOffloadPolicy,
                    OffloadPolicy,
                    fully_shard,
                )

                offload = CPUOffloadPolicy(pin_memory=cuda) if par.offload_parameters else OffloadPolicy()
                reshard = z == 3
                kw: dict[str, Any] = {}
                if mp:  # torchtitan's recipe: bf16 compute parameters, fp32 gradient reduction
                    from torch.distributed.fsdp import MixedPrecisionPolicy

                    kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                           reduce_dtype=torch.float32)
                for block in model.blocks:
                    fully_shard(block, reshard_after_forward=reshard, offload_policy=offload, **kw)
                fully_shard(root, reshard_after_forward=reshard, offload_policy=offload, **kw)
                if not cuda:  # gloo: buffers freed where FSDP2 drops them (gloo_comms.py)
                    install_gloo_comms([root, *model.blocks])
                meter.register(model, "parameters")
                params = [p for p in model.parameters() if p.requires_grad]
                if mp:  # the fp32 shards are the master weights: a plain fp32 optimizer
                    opt = S.make_optimizer(tr, params)
                else:  # mixed-*: masters of the shards
                    opt = S.step_optimizer(tr, params, s.loss_scale)
            s.optimizer = opt
            local = zero_opt.optim if zero_opt else opt
            if isinstance(local, S.MasterWeightOptimizer):  # the fp32 masters it holds
                meter.register(local.masters, "optimizer_states")
            if tr.optimizer == "adagrad":
                meter.mark(zero_opt.optim if zero_opt else opt, "optimizer_states")
        meter.register([idx, tgt], "activations")
        fsdp_ctx = _fsdp_collectives_as(meter, "comm") if z >= 2 else _null()
        with fsdp_ctx:
            for i in range(req.steps):
                report(i + 1)
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                meter.reset_peak()
                for _ in range(tr.gradient_accumulation_steps):
                    with meter.in_phase("forward"):
                        loss = root(idx, tgt)
                    with meter.in_phase("backward"):
                        S.backward(s, loss)
                    del loss
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                meter.mark(grads, "gradients")
                del grads
                if z >= 2:  # unsharded parameters: the all-gather outputs each FSDPParam keeps
                    meter.mark(_fsdp_unsharded(root), "parameters")
                with meter.in_phase("optimizer"):
                    S.optimizer_step(s)
                meter.mark(zero_opt.optim if zero_opt else opt, "optimizer_states")
                if cuda:
                    torch.cuda.synchronize(dev)
                pk = meter.peak
                if os.environ.get("MEMPLAN_PEAK_RECORDS"):  # diagnosis: every live storage
                    print(f"rank {rank} step {i + 1} peak {pk.op}/{pk.phase}:", sorted(
                        (r.resolved(), r.op, r.phase, r.nbytes) for r in pk.records), flush=True)
                steps.append({"breakdown": pk.breakdown(), "op": pk.op, "phase": pk.phase,
                              "cuda_allocated": torch.cuda.max_memory_allocated(dev) if cuda else None})
    # The steady state is the highest step peak from step 2 on. Except on gloo: its worker
    # threads release a collective's temporary buffers at a moment that varies from run to run,
    # which now and then leaves one alive across the next allocations and inflates that step's
    # peak by a buffer; there the lowest steady step (one the race did not touch) is reported.
    pick = max if cuda else min
    steady = pick(range(1, len(steps)), key=lambda j: steps[j]["breakdown"]["total"])
    mine = {"rank": rank, "first": steps[0], "steady": steps[steady],
            "device": str(dev) if not cuda else f"cuda:{local} ({torch.cuda.get_device_name(dev)})"}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"world_size": world, "ranks": gathered}))
    dist.barrier()


@contextmanager
def _null() -> Iterator[None]:
    yield


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
    # Leave without tearing the gloo group down: its worker threads can abort the interpreter's
    # exit ("terminate called without an active exception"); every result is written already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- launcher (runs in the job's process) ------------------------------------------------------
def check_multi_rank(req: ValidationRequest) -> None:
    """Refuse, with the reason, what the multi-rank step does not run."""
    from planner.catalog.presets import resolve_model
    from planner.layouts.parallel_ranks import unsupported_reason
    from service.validation.runner import ValidationUnsupported

    if req.mode == "traced":
        raise ValidationUnsupported("multi-rank validation runs real ranks (gloo/NCCL "
                                    "collectives have no FakeTensorMode); use mode 'real'")
    model = resolve_model(req.model)
    if not model.architecture_known:
        raise ValidationUnsupported("a bare num_parameters model cannot be built; give the architecture")
    reason = unsupported_reason(req.training, req.parallelism)
    if reason is not None:
        raise ValidationUnsupported(f"multi-rank validation: {reason}")
    if req.training.dropout > 0:
        raise ValidationUnsupported("multi-rank validation runs without dropout (each rank's "
                                    "masks are its own; set dropout 0)")
    if req.training.optimizer == "adafactor":
        raise ValidationUnsupported("adafactor's factored states need whole matrices: not run "
                                    "under sharding")


def per_rank_estimates(req: ValidationRequest, device: str) -> list[tuple[Breakdown, Breakdown]]:
    """(first step, steady state) estimate of every rank."""
    from planner.catalog.presets import resolve_model
    from planner.layouts.parallel_ranks import data_parallel_peaks
    from planner.routes.checkpoint_blocks import checkpointed_blocks

    model = resolve_model(req.model)
    ckpt = checkpointed_blocks(req.training, model.num_layers)
    return [(Breakdown(**pk.first.as_dict()), Breakdown(**pk.steady.as_dict()))
            for _, pk in data_parallel_peaks(model, req.training, req.parallelism, device, ckpt)]


def launch_ranks(req: ValidationRequest, timeout_s: float,
                 progress: ProgressFn | None = None) -> dict:
    """Run the rank program under torchrun in a new process group; kill the group on timeout.
    Returns rank 0's gathered JSON (every rank's breakdowns)."""
    return torchrun("service.validation.distributed", req.parallelism.data_parallel, req,
                    timeout_s, lambda spec, out: [str(spec), str(out)], req.steps, progress)


def run_multi_rank(req: ValidationRequest, progress: ProgressFn | None = None,
                   timeout_s: float | None = None) -> ValidationResult:
    """Measure every rank and compare each with the planner's estimate for that rank (``ranks``).
    The top level compares the per-device peaks of the job: ``estimate`` (and the first step's)
    is the rank with the highest estimated steady-state peak, ``worst_rank`` (what POST
    /v1/memory reports for the setup); ``measured`` (first step, peak op and phase, CUDA
    reserved bytes) is the rank with the highest measured steady-state peak,
    ``worst_measured_rank``. Ties go to the lowest rank."""
    from service.validation.runner import _device

    check_multi_rank(req)
    dev = _device(req)
    if progress:
        progress(Progress(phase="building", step=0, total_steps=req.steps))
    data = launch_ranks(req, timeout_s or req.timeout_s, progress)
    if progress:
        progress(Progress(phase="comparing", step=req.steps, total_steps=req.steps))
    est = per_rank_estimates(req, "cuda" if dev.type == "cuda" else "cpu")
    ranks: list[RankResult] = []
    firsts: dict[int, tuple[Breakdown, Breakdown]] = {}
    peaks: dict[int, dict] = {}
    for r in sorted(data["ranks"], key=lambda x: x["rank"]):
        k = r["rank"]
        first_e, steady_e = est[k]
        steady_m = Breakdown(**r["steady"]["breakdown"])
        ranks.append(RankResult(rank=k, estimate=steady_e, measured=steady_m,
                                relative_error=relative_error(steady_e, steady_m)))
        firsts[k] = (first_e, Breakdown(**r["first"]["breakdown"]))
        peaks[k] = r
    worst_est = max(ranks, key=lambda rr: (rr.estimate.total, -rr.rank))
    worst_meas = max(ranks, key=lambda rr: (rr.measured.total, -rr.rank))
    e, w = worst_est.rank, worst_meas.rank
    cuda_peak = peaks[w]["steady"].get("cuda_allocated")
    return ValidationResult(
        device=f"{peaks[w]['device']} x {len(ranks)} ranks "
               f"({'nccl' if dev.type == 'cuda' else 'gloo'})",
        mode=req.mode, estimate=worst_est.estimate, measured=worst_meas.measured,
        relative_error=relative_error(worst_est.estimate, worst_meas.measured),
        first_step_estimate=firsts[e][0], first_step_measured=firsts[w][1],
        peak_op=peaks[w]["steady"]["op"], peak_phase=peaks[w]["steady"]["phase"],
        max_reserved_bytes=cuda_peak, ranks=ranks, worst_rank=e, worst_measured_rank=w)
