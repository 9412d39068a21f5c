"""``optimizer_implementation: "fused"`` in the whole reference step, measured on CPU.

tests/test_optimizers_measured.py holds each fused kernel's states and step temporaries to
torch.optim byte for byte; here the whole step (forward, backward, the fused step with its
master weights or 16-bit parameters, and with a chunked loss) is replayed and measured on CPU.
Tolerance: none, every category of the first-step and steady-state peak.
"""

from __future__ import annotations

import pytest

from planner.catalog.specs import ValidationRequest
from service.validation.runner import run_validation

TINY = {
    "gpt2": dict(family="gpt2", num_layers=3, hidden_size=64, num_heads=4, vocab_size=64,
                 max_sequence_length=64),
    "llama": dict(family="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=160, vocab_size=64, max_sequence_length=64),
}

CASES = [
    ("llama", "bf16", "adamw", {}),
    ("gpt2", "mixed-bf16", "adam", {}),
    ("llama", "amp-bf16", "sgd-momentum", {}),
    ("gpt2", "fp32", "sgd", {}),
    ("llama", "mixed-fp16", "adamw", {}),
    ("llama", "fp32", "adagrad", {}),  # torch's _fused_adagrad (CPU kernels)
    ("gpt2", "bf16", "adagrad", {}),
    ("llama", "mixed-bf16", "adagrad", {}),
    ("llama", "amp-bf16", "adamw", {"loss": {"kind": "chunked-linear", "chunks": 4}}),
    ("gpt2", "bf16", "adam", {"loss": {"kind": "chunked", "chunks": 3},
                              "activation_checkpointing": {"strategy": "full"}}),
]


@pytest.mark.parametrize("family,precision,optimizer,extra", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}{'-' + '-'.join(c[3]) if c[3] else ''}"
                              for c in CASES])
def test_fused_step_equals_measured(family, precision, optimizer, extra):
    training = dict(precision=precision, optimizer=optimizer, optimizer_implementation="fused",
                    micro_batch_size=2, sequence_length=32, **extra)
    r = run_validation(ValidationRequest(model=TINY[family], training=training, steps=3))
    assert r.estimate == r.measured, (r.peak_op, r.peak_phase)
    assert r.first_step_estimate == r.first_step_measured
