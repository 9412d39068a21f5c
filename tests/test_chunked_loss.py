"""Chunked cross-entropy losses (planner/catalog/loss_specs.py): replay against measurement.

Each configuration runs the real reference step on CPU under LiveMemoryMeter with the loss the
estimate describes (service/validation/step.py: chunked_loss) and the planner replays it
(planner/step/loss.py). Tolerance: none, every category of the first-step and steady-state peak
equal to the byte, as tests/test_reference_exact.py holds the standard loss.
"""

from __future__ import annotations

import pytest

from planner.catalog.specs import ValidationRequest
from service.validation.runner import run_validation

TINY = {
    "gpt2": dict(family="gpt2", num_layers=3, hidden_size=64, num_heads=4, vocab_size=512,
                 max_sequence_length=64),
    "llama": dict(family="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=160, vocab_size=512, max_sequence_length=64),
}
FULL = {"activation_checkpointing": {"strategy": "full"}}

# family, precision, optimizer, loss, micro-batch, sequence, extra training fields
CASES = [
    ("llama", "amp-bf16", "adamw", {"kind": "chunked", "chunks": 4}, 2, 32, {}),
    ("llama", "amp-bf16", "adamw", {"kind": "chunked-linear", "chunks": 4}, 2, 32, {}),
    ("gpt2", "fp32", "adamw", {"kind": "chunked", "chunks": 3}, 2, 32, {}),
    ("gpt2", "fp32", "sgd", {"kind": "chunked-linear", "chunks": 3}, 2, 32, {}),
    ("gpt2", "amp-bf16", "adamw", {"kind": "chunked-linear", "chunks": 8}, 3, 21, FULL),
    ("llama", "bf16", "sgd", {"kind": "chunked", "chunks": 5}, 1, 37, FULL),
    ("llama", "mixed-bf16", "adam", {"kind": "chunked-linear", "chunks": 2}, 2, 16, {}),
    ("gpt2", "amp-fp16", "sgd-momentum", {"kind": "chunked", "chunks": 2}, 2, 32, {}),
    ("llama", "amp-bf16", "adamw", {"kind": "chunked-linear", "chunks": 1}, 2, 32,
     {"activation_checkpointing": {"strategy": "selective"}}),
    ("gpt2", "bf16", "adamw", {"kind": "chunked", "chunks": 64}, 1, 48, {"dropout": 0.1}),
    ("llama", "amp-bf16", "adamw", {"kind": "chunked-linear", "chunks": 4}, 2, 32,
     {"gradient_accumulation_steps": 2}),
    ("llama", "mixed-fp16", "sgd-momentum", {"kind": "chunked-linear", "chunks": 3}, 2, 24, FULL),
]


@pytest.mark.parametrize("family,precision,optimizer,loss,batch,seq,extra", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]['kind']}{c[3]['chunks']}-b{c[4]}s{c[5]}"
                              f"{'-' + '-'.join(c[6]) if c[6] else ''}" for c in CASES])
@pytest.mark.parametrize("vocab", [512, 64])
def test_chunked_loss_step_equals_measured(family, precision, optimizer, loss, batch, seq, extra,
                                           vocab):
    model = dict(TINY[family], vocab_size=vocab)
    training = dict(precision=precision, optimizer=optimizer, micro_batch_size=batch,
                    sequence_length=seq, loss=loss, **extra)
    r = run_validation(ValidationRequest(model=model, training=training, steps=3))
    assert r.estimate == r.measured, (r.peak_op, r.peak_phase)
    assert r.first_step_estimate == r.first_step_measured


@pytest.mark.parametrize("loss", [{"kind": "chunked", "chunks": 8},
                                  {"kind": "chunked-linear", "chunks": 8}])
def test_traced_full_size_chunked_equals_estimate(loss):
    """FakeTensorMode: TinyLlama 1.1B (vocabulary 32,000), 4 x 512 tokens, without allocating it."""
    req = ValidationRequest(model={"preset": "tinyllama-1.1b"}, mode="traced", steps=2,
                            training=dict(precision="amp-bf16", optimizer="adamw",
                                          micro_batch_size=4, sequence_length=512, loss=loss))
    r = run_validation(req)
    assert r.measured.total > 10 * 2**30
    assert r.estimate == r.measured
    assert r.first_step_estimate == r.first_step_measured


def test_served_estimates_equal_the_replay():
    """Chunk row counts round (ceil(B·T / chunks)), so no template is compiled for a chunked
    loss (the compile raises Undecided): the estimate the service answers, setup templates and
    structure templates on, is the op-by-op replay at every size."""
    from planner.catalog.presets import resolve_model
    from planner.catalog.specs import ModelSpec, TrainingSpec
    from planner.step import simulate as step_cache
    from planner.step.program import ReferenceProgram

    model = resolve_model(ModelSpec(**TINY["llama"]))
    with step_cache.structure_mode("sync"):
        for kind in ("chunked", "chunked-linear"):
            for b, t in [(2, 32), (3, 32), (2, 17), (5, 40), (3, 32)]:
                tr = TrainingSpec(precision="amp-bf16", micro_batch_size=b, sequence_length=t,
                                  loss={"kind": kind, "chunks": 3})
                served = step_cache.simulate(model, tr, "cpu", frozenset())
                replay = ReferenceProgram(model, tr, device="cpu", checkpointed=set()).run()
                assert served.steady == replay.steady and served.first == replay.first
