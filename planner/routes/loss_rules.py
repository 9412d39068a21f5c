"""Where the chunked losses (planner/catalog/loss_specs.py) are estimated, and how a response
says which loss it describes.

A chunked loss is replayed op by op on one device and on every data-parallel rank (DDP,
ZeroRedundancyOptimizer, FSDP2): tests/test_chunked_loss.py and
tests/test_chunked_loss_ranks.py hold those replays equal to the measured steps. Layouts that
compose a single-device replay with formulas (tensor and pipeline parallelism, CPU offload, the
multi-rank setups the rank replay leaves out) and Megatron's closed form would describe it
unmeasured, so they are refused.
"""

from __future__ import annotations

import functools

from planner.catalog.loss_specs import LossSpec
from planner.catalog.specs import Assumption, ParallelSpec, TrainingSpec
from planner.layouts.parallel_ranks import unsupported_reason

__all__ = ["loss_assumption", "loss_refusal"]


def loss_refusal(tr: TrainingSpec, par: ParallelSpec) -> str | None:
    """Why ``tr.loss`` cannot be estimated for this layout (None when it is replayed)."""
    kind = tr.loss.kind
    if kind == "standard":
        return None
    if tr.implementation != "reference":
        return (f"loss kind {kind!r} is replayed for implementation 'reference' only (Megatron's "
                "closed form has no chunked loss)")
    if par.tensor_parallel > 1 or par.pipeline_parallel > 1:
        return (f"loss kind {kind!r} is replayed on one device and on data-parallel ranks (DDP, "
                "ZeRO 1-3); tensor and pipeline parallelism take loss kind 'standard'")
    if par.data_parallel > 1 or par.zero_stage > 0:
        why = unsupported_reason(tr, par)
        if why is not None:
            return f"loss kind {kind!r} is replayed rank by rank only, and here {why}"
    return None


def loss_assumption(loss: LossSpec) -> Assumption:
    """The loss an estimate describes (memoised by the spec's two fields: hashing the frozen
    model itself costs more than the rest of a template's answer)."""
    return _loss_assumption(loss.kind, loss.chunks)


@functools.lru_cache(maxsize=64)
def _loss_assumption(kind: str, chunks: int) -> Assumption:
    loss = LossSpec.model_construct(kind=kind, chunks=chunks)
    if loss.kind == "standard":
        return Assumption(name="loss", value="standard",
                          note="F.cross_entropy(logits.float()) over all tokens at once: the "
                          "[tokens, vocab] logits in the compute dtype and in fp32")
    if loss.kind == "chunked":
        return Assumption(name="loss", value=f"chunked, {loss.chunks} chunks",
                          note="torchtune-style chunked output: head per token chunk, each "
                          "chunk's logits upcast to fp32 on their own; the logits are still "
                          "saved for backward")
    return Assumption(name="loss", value=f"chunked-linear, {loss.chunks} chunks",
                      note="head + cross-entropy per token chunk under "
                      "torch.utils.checkpoint(use_reentrant=False): each chunk's logits are "
                      "recomputed in backward and never exist whole (Liger-style fused linear "
                      "cross-entropy memory)")
