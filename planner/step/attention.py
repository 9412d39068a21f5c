"""Core attention as each device's kernels run it: which ``scaled_dot_product_attention`` backend
the reference step's call dispatches to, the composite math backend op by op, and the eager
softmax under CUDA autocast.

SDPA backends (torch 2.11-2.13, inputs requiring grad, ``is_causal=True``, no dropout on the
probabilities; benchmarks/results/sdpa-kernels-cuda.json lists what an H200 dispatched to):

- ``cpu``: ``_scaled_dot_product_flash_attention_for_cpu`` (output, fp32 logsumexp);
- ``efficient`` (CUDA, fp32, as many key/value heads as query heads):
  ``_scaled_dot_product_efficient_attention`` (output, fp32 logsumexp; its philox seed and offset
  are host tensors without dropout);
- ``cudnn`` (CUDA, bf16/fp16): ``_scaled_dot_product_cudnn_attention`` (output, fp32 logsumexp,
  and the philox seed and offset, one int64 each on the device, saved for backward);
- ``math`` (CUDA, fp32 with grouped-query heads — no fused kernel takes ``enable_gqa`` in fp32):
  the composite ``_scaled_dot_product_attention_math`` of aten/src/ATen/native/transformers/
  attention.cpp, replayed by :func:`sdpa_math`.
"""

from __future__ import annotations

from typing import Any

from planner.step.ops import F32, T

ReferenceModel = Any  # planner.step.model.ReferenceModel (which imports this module)

BACKENDS = ("cpu", "efficient", "cudnn", "math")
SEED_BYTES = 8  # cudnn's philox seed and offset: one int64 each


def sdpa_backend(device: str, esz: int, gqa: bool, forced: str | None = None) -> str:
    """The backend ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)``
    runs for inputs of element size ``esz`` on ``device``; ``forced`` (one of ``BACKENDS``)
    replaces the choice, as ``torch.nn.attention.sdpa_kernel`` does."""
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"unknown SDPA backend {forced!r}")
        return forced
    if device == "cpu":
        return "cpu"
    if esz == F32:
        return "math" if gqa else "efficient"
    return "cudnn"


def sdpa_math(model: ReferenceModel, q: T, k: T, v: T) -> T:
    """``_scaled_dot_product_attention_math(q, k, v, is_causal=True, enable_gqa=gqa)`` on fp32
    inputs, (B, nh, T, hd) out (contiguous: the caller's ``transpose(1, 2).contiguous()`` copies
    it). The C++ body, line by line::

        query = query_acc * sqrt(scale)                    # mul (saves nothing)
        attn_mask = ones(L, S, bool).tril()                # ones dies after tril
        attn_mask = where(attn_mask, scalar_tensor(0), scalar_tensor(-inf))  # float (L, S)
        key_expanded, value_expanded = repeat_interleave(key), repeat_interleave(value)  # gqa
        attn = matmul(query, key_expanded.transpose(-2, -1) * sqrt(scale))
        attn = attn.add(attn_mask)
        attn = _safe_softmax(attn, -1)                     # saves its output
        return matmul(attn, value_expanded), attn

    ``matmul`` reshapes each 4-D operand to 3-D for ``bmm``: a copy where the layout does not
    fold (the scaled query, laid out as the projections' (B, T, nh, hd); without gqa the scaled
    key and the value too), a view otherwise. The locals die as the function returns, last
    declared first: the expanded key, the scaled query, the mask."""
    o, s = model.ops, model.s
    if q.esz != F32:
        raise NotImplementedError("the math SDPA backend is modelled for fp32 inputs")
    gqa = s.nkv != s.nh
    query = o.scale(q)
    ones = o.new(s.T * s.T, 1, "ones")
    tril = o.new(s.T * s.T, 1, "tril")
    o.drop(ones)
    zero, ninf = o.new(1, q.esz, "scalar_tensor"), o.new(1, q.esz, "scalar_tensor")
    mask = o.new(s.T * s.T, q.esz, "where")
    o.drop(ninf, zero, tril)
    if gqa:
        ke, ve = model._repeat_kv(k), model._repeat_kv(v)
    else:
        ke, ve = o.view(k), o.view(v)
    kts = o.scale(ke)
    qc = o.contiguous_copy(query)
    kc = o.view(kts) if gqa else o.contiguous_copy(kts)
    att = o.bmm(qc, kc, s.B * s.nh * s.T * s.T)
    o.drop(qc, kc, kts)
    att2 = o.add(att, mask)
    o.drop(att)
    p = o.softmax(att2)  # _safe_softmax: its derivative is softmax's
    o.drop(att2)
    vc = o.view(ve) if gqa else o.contiguous_copy(ve)
    y4 = o.bmm(p, vc, s.N * s.h)
    o.drop(vc)
    o.drop(ke, ve, query, mask, p)
    return y4


def cuda_amp_softmax(model: ReferenceModel, x: T) -> T:
    """``F.softmax`` under CUDA autocast: softmax is on CUDA's fp32 list (CPU's has no softmax),
    so a half input is cast to fp32 (a copy that dies as the op returns) and the fp32 output is
    what softmax saves. Returns that fp32 output."""
    o = model.ops
    xf = o.cast(x, F32)
    p = o.softmax(xf)
    o.drop(xf)
    return p
