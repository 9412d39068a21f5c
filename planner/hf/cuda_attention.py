"""The attention kernel ``scaled_dot_product_attention`` runs on a CUDA device, traced on the CPU.

A transformers estimate traces the model's own code under FakeTensorMode on the CPU, where SDPA
takes the CPU's kernels. An estimate for a GPU must keep what CUDA's kernels keep, so during such
a trace ``F.scaled_dot_product_attention`` dispatches as torch 2.11 does on an H100/H200
(``benchmarks/results/sdpa-kernels-cuda.json``, and the measured rows of
``benchmarks/results/accuracy-hf-cuda.md``): cuDNN attention for 16-bit inputs (grouped-query
heads and masks included), the memory-efficient kernel for fp32 without grouped-query heads, else
the composite math path. The memory-efficient kernel's ATen op
has a meta implementation, so FakeTensorMode traces it, its saved tensors and its backward, on a
CPU build; the math path is a composite the CPU runs alike. With 16-bit inputs (cuDNN on CUDA)
the trace keeps the CPU's own dispatch, not this function (``planner/hf/step.py`` installs it for
fp32 steps only): the CPU's kernels save what cuDNN saves, less its 16-byte device seed per call,
which is what the H200 measured (a wrapper in the way changed transformers' mask path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

MAX_CUDNN_HEAD_DIM = 128


def cuda_kernel(q: Any, k: Any, enable_gqa: bool, dtype: Any) -> str:
    """'cudnn', 'efficient' or 'math' for these inputs, run in ``dtype``."""
    import torch

    gqa = enable_gqa and k.size(-3) != q.size(-3)
    half = dtype in (torch.bfloat16, torch.float16)
    if half and q.size(-1) <= MAX_CUDNN_HEAD_DIM:  # with a mask too (Mistral's sliding window)
        return "cudnn"
    if not gqa:
        return "efficient"
    return "math"


@contextmanager
def cuda_sdpa() -> Iterator[None]:
    """``torch.nn.functional.scaled_dot_product_attention`` dispatching as on CUDA."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    orig = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        args = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
        # the trace's autocast stands for CUDA's, whose lower-precision list casts SDPA's inputs
        amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        kind = cuda_kernel(query, key, enable_gqa, amp or query.dtype)
        if kind == "cudnn":  # the CPU's flash kernel keeps the same tensors but cuDNN's seed
            return orig(query, key, value, **args)
        if amp is not None and amp != query.dtype:
            query, key, value = (t.to(amp) for t in (query, key, value))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if kind == "efficient":
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]
        with sdpa_kernel(SDPBackend.MATH):
            return orig(query, key, value, **args)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig
