"""The training loss: how the output head and the cross-entropy are computed.

Three variants, each run by the reference step (service/validation/step.py) and replayed op by
op (planner/step/loss.py):

- ``standard``: ``F.cross_entropy(lm_head(x).float(), targets)`` over all B·T tokens at once;
  the [B·T, V] logits exist whole, in the compute dtype and upcast to fp32.
- ``chunked``: torchtune's chunked output (``CEWithChunkedOutputLoss``): the tokens are split
  into ``chunks`` row blocks (``torch.chunk`` on the flattened B·T tokens), the head runs per
  chunk and each chunk's logits are upcast to fp32 and reduced (``reduction="sum"``) on their
  own; the chunks' logits are kept until the loss is summed and their log-softmax outputs are
  saved for backward, so only the fp32 upcast and the backward's temporaries shrink to a chunk.
- ``chunked-linear``: the head and the cross-entropy of each chunk run under
  ``torch.utils.checkpoint`` (non-reentrant), so nothing of the logits is kept to backward:
  each chunk's logits are recomputed when backward reaches it. The [B·T, V] logits never exist
  whole; the memory of fused linear-cross-entropy kernels (Liger Kernel's
  ``LigerFusedLinearCrossEntropyLoss``), without their custom kernel.

The loss is the mean over tokens in every variant (the chunked ones: the chunk sums added, then
divided by B·T).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOSS_CHUNKS = 4096
LossKind = Literal["standard", "chunked", "chunked-linear"]


class LossSpec(BaseModel):
    """The output head and cross-entropy loss of the training step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: LossKind = Field(
        "standard", description="'standard': logits of all tokens at once, upcast to fp32. "
        "'chunked': torchtune-style chunked output, per-chunk fp32 upcast (logits still saved for "
        "backward). 'chunked-linear': head + cross-entropy recomputed per chunk in backward "
        "(Liger-style fused linear cross-entropy memory: the logits never exist whole).")
    chunks: int = Field(8, ge=1, le=MAX_LOSS_CHUNKS, description="Token chunks (torch.chunk of "
                        "the B*T tokens) of the chunked kinds; ignored by 'standard'.")


def chunk_sizes(n: int, chunks: int) -> list[int]:
    """Row counts of ``torch.chunk`` of ``n`` rows into ``chunks``: ceil(n / chunks) each, the
    last one shorter; fewer chunks when the rows run out (aten/src/ATen/native/TensorShape.cpp,
    ``chunk``: split with ``split_size = ceil(n / chunks)``)."""
    size = -(-n // chunks)
    full, rest = divmod(n, size)
    return [size] * full + ([rest] if rest else [])
