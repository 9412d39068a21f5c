"""FSDP2's collectives on gloo, made deterministic for the meter.

gloo runs a collective on a worker thread that keeps its own references to the tensors it was
given until *after* it has signalled completion: ``ProcessGroupGloo::runLoop`` marks the work
finished, then re-takes its lock and only then drops the work. When the calling thread frees a
buffer right after ``wait()`` returns (FSDP2 does, for its all-gather input and output), the
storage dies on the worker thread, a moment later or much later when the machine is loaded. The
CPU meter then sees, now and then, one collective's buffer still alive across the next
allocations, and a rank's peak moves by that buffer from run to run. NCCL holds no such reference
past the stream's order, so the replay (like a CUDA run) has the buffer freed where FSDP2 drops it.

Both comms below hand gloo views of their own making and, before returning, wait until gloo has
dropped them (the storages' use counts are back to where they were), so every buffer FSDP2
allocates lives exactly as long as FSDP2 keeps it. They allocate nothing FSDP2 does not.
"""

from __future__ import annotations

import time

import torch

SETTLE_TIMEOUT_S = 30.0


def _settle(*tensors: torch.Tensor) -> None:
    """Wait until the storages of ``tensors`` are held by no more references than before the
    views handed to gloo were made (the caller has dropped its views)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    for t, base in tensors:
        cdata = t.untyped_storage()._cdata
        while torch._C._storage_Use_Count(cdata) > base:
            if time.monotonic() > deadline:
                raise RuntimeError("gloo kept a collective's buffer past its completion for "
                                   f"{SETTLE_TIMEOUT_S:g} s")
            time.sleep(0.0002)


def _use_count(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    return t, torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _gloo_comm_classes() -> tuple[type, type]:
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultAllGather,
        DefaultReduceScatter,
    )

    class GlooAllGather(DefaultAllGather):
        """torch's all-gather into FSDP2's buffers, returning once gloo has let go of them."""

        def __call__(self, output_tensor, input_tensor, group, async_op=False):  # type: ignore[override]
            import torch.distributed as dist

            counts = [_use_count(output_tensor), _use_count(input_tensor)]
            out, inp = output_tensor.view(-1), input_tensor.view(-1)
            dist.all_gather_into_tensor(out, inp, group=group)
            del out, inp
            _settle(*counts)
            return None

    class GlooReduceScatter(DefaultReduceScatter):
        """FSDP2's reduce-scatter on gloo as an in-place all-reduce of the flat input plus a copy
        of this rank's chunk. gloo's own reduce_scatter copies its input into a flat temporary
        that its worker thread frees at an unpredictable moment; this keeps exactly the buffers
        FSDP2 allocates (input and output) and nothing else. NCCL runs use torch's own."""

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):  # type: ignore[override]
            import torch.distributed as dist

            counts = [_use_count(input_tensor)]
            flat = input_tensor.view(-1)
            dist.all_reduce(flat, op=op, group=group)
            del flat
            _settle(*counts)
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            output_tensor.copy_(input_tensor.view(world, -1)[rank])

    return GlooAllGather, GlooReduceScatter


def install_gloo_comms(modules) -> None:  # type: ignore[no-untyped-def]
    """Give every FSDP2 module of a gloo run the comms above."""
    all_gather_cls, reduce_scatter_cls = _gloo_comm_classes()
    all_gather, reduce_scatter = all_gather_cls(), reduce_scatter_cls()
    for mod in modules:
        mod.set_custom_reduce_scatter(reduce_scatter)
        if hasattr(mod, "set_custom_all_gather"):
            mod.set_custom_all_gather(all_gather)
