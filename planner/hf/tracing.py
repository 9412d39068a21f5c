"""What a traced transformers step changes so that, under FakeTensorMode, it runs the ops a real
run runs (planner/hf/step.py ``run``, ``traced=True``).

A fake tensor has no data: the places where torch or transformers read a value, or where a
collective would hand one back, take another path than on a real device. Each piece below puts
back the real run's path for this step, and nothing more:

- ``_as_real_run``: transformers' packed-sequence check (its answer, from the real check's ops)
  and the meta kernel of MoE experts' ``_grouped_mm`` for the dtypes the CPU kernel runs;
- ``_fake_rank_checks``, ``_in_place_allreduce``, ``_NoRebuild``: DistributedDataParallel on the
  fake process group (its constructor's shape check, its gradient buckets' all-reduce hook, the
  reducer's one bucket rebuild).

``_as_real_run`` and ``_fake_rank_checks`` patch modules process-wide, so one trace runs at a
time: it holds ``_trace_slot`` while it runs.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable

_TRACE_LOCK = threading.Lock()


@contextmanager
def _trace_slot(check: Callable[[], None]):
    """The one trace slot, waited for under the request's work limit."""
    while not _TRACE_LOCK.acquire(timeout=0.1):
        check()
    try:
        yield
    finally:
        _TRACE_LOCK.release()


@contextmanager
def _as_real_run():
    """Under FakeTensorMode transformers takes its tracing path (``is_tracing`` is true of a
    FakeTensor): it cannot read values, so it materialises the causal mask a real run skips.
    The one value a real run reads for this step's batch (input_ids and labels, positions
    0..s-1) is whether the positions are packed sequences: they are not. This runs the ops the
    real check runs (transformers 5.x ``find_packed_sequence_indices``) and gives its answer."""
    import torch
    from transformers import masking_utils

    def find_packed_sequence_indices(position_ids: torch.Tensor) -> None:
        first = position_ids[:, :1] - 1
        diff = torch.diff(position_ids, prepend=first, dim=-1)
        packed = (diff != 1).cumsum(-1)
        (packed[:, -1] == 0).all()  # the real run reads this: True, no packed sequences
        return None

    # MoE experts (transformers' grouped_mm path): torch's meta kernel of _grouped_mm checks
    # the CUDA kernel's dtype rule (bf16 only), the CPU kernel also runs fp32/fp16; the output is
    # the same plain tensor either way on a CPU build (_create_grouped_mm_output_tensor)
    import torch._meta_registrations as meta

    orig_common = meta._meta_grouped_mm_common

    def grouped_mm_common(mat_a, mat_b, *args: Any, **kwargs: Any):
        if kwargs.get("scale_a") is None and mat_a.dtype == mat_b.dtype != torch.bfloat16:
            return meta._create_grouped_mm_output_tensor(mat_a, mat_b, kwargs.get("offs"),
                                                         kwargs.get("out_dtype"))
        return orig_common(mat_a, mat_b, *args, **kwargs)

    orig = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    meta._meta_grouped_mm_common = grouped_mm_common
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig
        meta._meta_grouped_mm_common = orig_common


@contextmanager
def _fake_rank_checks(traced: bool):
    """DDP's constructor checks the parameters' shapes across ranks by reading them (a C++
    all-gather of the shapes): a fake tensor has no data to read. Every rank builds the same
    model here, so the check is skipped when traced; the real ranks run it."""
    if not traced:
        yield
        return
    import torch.nn.parallel.distributed as ddp_mod

    orig = ddp_mod._verify_param_shape_across_processes
    ddp_mod._verify_param_shape_across_processes = lambda *a, **k: None
    try:
        yield
    finally:
        ddp_mod._verify_param_shape_across_processes = orig


def _in_place_allreduce(_state, bucket):
    """The fake process group's work has no result for DDP's built-in hook to hand back; this
    hook does what the built-in one does to memory on gloo (divide by the world size, all-reduce
    the bucket in place, return it): no new storage."""
    import torch
    import torch.distributed as dist

    buf = bucket.buffer()
    buf.div_(dist.get_world_size())
    dist.all_reduce(buf)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(buf)
    return fut


class _NoRebuild:
    """The reducer, except that its one bucket rebuild (before the second forward, in the order
    the first backward made the gradients ready) is not run: it syncs the order across ranks by
    reading an index tensor, which a fake tensor cannot give."""

    def __init__(self, reducer: Any) -> None:
        self._reducer = reducer

    def _rebuild_buckets(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)
