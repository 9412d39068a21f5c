"""Exact parameter counts: published figures, and the PyTorch model's own sum(p.numel())."""

from __future__ import annotations

import pytest
import torch

from planner.catalog.presets import model_presets, resolve_model
from planner.catalog.parameters import count_parameters, lora_parameters
from planner.catalog.specs import LoraSpec, ModelSpec
from service.validation.model import Transformer
from service.validation.step import apply_lora
from planner.catalog.specs import TrainingSpec

# Published totals (exact): GPT-2 XL 1,557,611,200 (OpenAI release, tied embeddings, 1024
# positions); Llama-2-7B 6,738,415,616 and Llama-2-13B 13,015,864,320 (Meta model cards /
# HF config param counts); Llama-2-70B 68,976,648,192; Llama-3-8B 8,030,261,248;
# Mistral-7B 7,241,732,096; TinyLlama-1.1B 1,100,048,384. Tolerance: 0.
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-xl": 1_557_611_200,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_published_counts(name, count):
    assert model_presets()[name].num_parameters == count


SMALL = [
    dict(family="gpt2", num_layers=2, hidden_size=48, num_heads=4, vocab_size=97, max_sequence_length=40),
    dict(family="gpt2", num_layers=1, hidden_size=64, num_heads=2, vocab_size=50, ffn_hidden_size=96,
         tie_embeddings=False),
    dict(family="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, vocab_size=101,
         ffn_hidden_size=176),
    dict(family="llama", num_layers=3, hidden_size=32, num_heads=4, vocab_size=64, tie_embeddings=True),
]


@pytest.mark.parametrize("spec", SMALL)
def test_count_equals_torch_model(spec):
    m = resolve_model(ModelSpec(**spec))
    with torch.device("meta"):
        t = Transformer(m)
    assert m.num_parameters == sum(p.numel() for p in t.parameters())
    assert count_parameters(m).tensor_sizes() == [p.numel() for p in t.parameters()]


@pytest.mark.parametrize("spec", SMALL)
def test_lora_count_equals_trainable(spec):
    m = resolve_model(ModelSpec(**spec))
    lora = LoraSpec(rank=4, target_modules=["q", "v", "o", "up", "down"])
    with torch.device("meta"):
        t = Transformer(m)
    apply_lora(t, TrainingSpec(lora=lora))
    assert lora_parameters(m, lora) == sum(p.numel() for p in t.parameters() if p.requires_grad)
