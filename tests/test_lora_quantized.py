"""QLoRA-style bases: the parameters category counts int8/nf4 block projections at their packed
size (planner/catalog/precision.tensor_bytes: bitsandbytes' packing, Dettmers et al. 2023 §3) and every
other tensor at its dtype; gradients and optimizer states exist for the adapters only."""

from __future__ import annotations

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.errors import PlanningError
from planner.routes.memory import estimate_memory
from planner.catalog.parameters import lora_parameters
from planner.catalog.precision import tensor_bytes
from planner.catalog.specs import LoraSpec, MemoryRequest, ModelSpec
from planner.layouts.parameter_tensors import parameter_shapes


@pytest.mark.parametrize("base", ["int8", "nf4", "bf16"])
def test_parameter_bytes_of_a_quantized_base(base):
    model = ModelSpec(preset="llama-2-7b")
    lora = LoraSpec(rank=16, target_modules=["q", "v"], base_dtype=base)
    req = MemoryRequest(model=model, training=dict(precision="amp-bf16", optimizer="adamw",
                                                   micro_batch_size=1, sequence_length=512,
                                                   lora=lora))
    r = estimate_memory(req)
    m = resolve_model(model)
    expected = 0
    for shape in parameter_shapes(m):
        n = 1
        for d in shape:
            n *= d
        is_block_linear = len(shape) == 2 and shape not in ((m.vocab_size, m.hidden_size),)
        if is_block_linear:
            expected += tensor_bytes(n, base, rows=shape[0])
        else:
            expected += 4 * n  # fp32 parameters (amp-bf16): embeddings, norms, output layer
    adapters = lora_parameters(m, lora)
    expected += 4 * adapters
    rope = 2 * m.max_sequence_length * (m.hidden_size // m.num_heads) * 4  # fp32 rotary tables
    assert r.breakdown.parameters == expected + rope
    # Adam keeps two fp32 moments (+ a 4-byte step on the host, not on the GPU) per adapter
    assert r.breakdown.optimizer_states in (0, 8 * adapters)


def test_base_dtype_must_match_without_autocast():
    req = MemoryRequest(model=ModelSpec(preset="gpt2"),
                        training=dict(precision="fp32", lora=LoraSpec(base_dtype="bf16")))
    with pytest.raises(PlanningError) as e:
        estimate_memory(req)
    assert e.value.field == "training.lora.base_dtype"
