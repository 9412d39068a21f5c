"""Faster paths over the step simulator against the straightforward ones: same answers exactly.

The largest fitting micro-batch (``planner.routes.memory._max_micro_batch``, secant-guided probes)
against the exponential + binary search over one estimate per probe
(``_max_micro_batch_search``), on both families, several precisions, checkpointing strategies,
sequence lengths and memory sizes, including sizes where nothing fits and where only a few fit."""

from __future__ import annotations

import pytest

from planner.routes import memory as M
from planner.routes.checkpoint_blocks import checkpointed_blocks
from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest

GIB = 2**30

CASES = [
    ("gpt2", "amp-bf16", "none", 256, "sdpa"),
    ("gpt2", "fp32", "full", 1024, "sdpa"),
    ("gpt2", "mixed-bf16", "every-k", 512, "eager"),
    ("gpt2", "amp-fp16", "none", 128, "eager"),
    ("llama-3.2-1b", "amp-bf16", "full", 256, "sdpa"),
    ("llama-3.2-1b", "bf16", "none", 512, "eager"),
]


def _request(preset: str, precision: str, ckpt: str, seq: int, attention: str) -> MemoryRequest:
    ac = {"strategy": ckpt, **({"every_k": 3} if ckpt == "every-k" else {})}
    return MemoryRequest.model_validate({
        "model": {"preset": preset},
        "training": {"sequence_length": seq, "precision": precision, "attention": attention,
                     "activation_checkpointing": ac}})


@pytest.mark.parametrize("preset,precision,ckpt,seq,attention", CASES)
def test_max_micro_batch_matches_search(preset: str, precision: str, ckpt: str, seq: int,
                                        attention: str) -> None:
    req = _request(preset, precision, ckpt, seq, attention)
    model = resolve_model(req.model)
    blocks = checkpointed_blocks(req.training, model.num_layers)
    one = M._estimate(req, model, "cuda", blocks)
    need1 = one.breakdown.total + one.allocator_reserve_bytes
    # nothing fits, exactly one fits, a few, many
    for mem in (need1 - 1, need1, need1 + GIB // 8, 3 * GIB, 24 * GIB, 80 * GIB):
        fast = M._max_micro_batch(req, model, "cuda", blocks, mem)
        slow = M._max_micro_batch_search(req, model, "cuda", blocks, mem)
        assert fast == slow, (mem, fast, slow)
