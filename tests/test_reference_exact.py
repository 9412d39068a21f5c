"""The step simulator against the measured reference step, byte for byte.

For each configuration the real step runs on CPU under LiveMemoryMeter and the planner replays it
(planner/step/program.py). Tolerance: none — every category of the first-step and the
steady-state peak must be equal to the byte, the claim behind memplan's 1% goal.
"""

from __future__ import annotations

import itertools

import pytest

from planner.catalog.specs import ValidationRequest
from service.validation.runner import run_validation

TINY = {
    "gpt2": dict(family="gpt2", num_layers=3, hidden_size=64, num_heads=4, vocab_size=512,
                 max_sequence_length=64),
    "llama": dict(family="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=160, vocab_size=512, max_sequence_length=64),
}

CASES = [
    # family, precision, attention, optimizer, extra training fields
    *[(f, p, a, "adamw", {}) for f, p, a in itertools.product(
        ("gpt2", "llama"), ("fp32", "amp-bf16", "amp-fp16", "mixed-bf16", "bf16"), ("sdpa", "eager"))],
    ("gpt2", "amp-bf16", "sdpa", "adamw", {"activation_checkpointing": {"strategy": "full"}}),
    ("llama", "bf16", "eager", "sgd", {"activation_checkpointing": {"strategy": "full"}}),
    ("llama", "amp-bf16", "sdpa", "adam", {"activation_checkpointing": {"strategy": "every-k", "every_k": 2}}),
    ("gpt2", "fp32", "eager", "sgd-momentum", {"activation_checkpointing": {"strategy": "sqrt"}}),
    ("gpt2", "amp-bf16", "eager", "adamw", {"activation_checkpointing": {"strategy": "selective"}}),
    ("llama", "bf16", "sdpa", "sgd", {"activation_checkpointing": {"strategy": "selective"}}),
    ("gpt2", "bf16", "sdpa", "adamw", {"dropout": 0.1}),
    ("llama", "fp32", "eager", "adamw", {"dropout": 0.1}),
    ("gpt2", "amp-bf16", "sdpa", "adamw", {"lora": {"rank": 4, "target_modules": ["q", "v", "up"]}}),
    ("llama", "mixed-bf16", "sdpa", "adamw", {"lora": {"rank": 4, "target_modules": ["q", "k", "v", "o", "gate", "up", "down"]}}),
    ("llama", "amp-bf16", "sdpa", "adamw", {"gradient_accumulation_steps": 3}),
    ("llama", "amp-bf16", "sdpa", "adamw", {"lora": {"rank": 4, "target_modules": ["q", "v", "down"], "base_dtype": "bf16"}}),
    ("gpt2", "amp-fp16", "eager", "adamw", {"lora": {"rank": 4, "target_modules": ["q", "up"], "base_dtype": "fp16"}}),
    ("llama", "mixed-bf16", "sdpa", "adamw", {"precision_overrides": {"gradients": "fp32"}}),
    ("gpt2", "mixed-fp16", "sdpa", "adam", {"precision_overrides": {"gradients": "fp32"}, "gradient_accumulation_steps": 2}),
    ("gpt2", "bf16", "eager", "adagrad", {}),
    ("llama", "fp32", "sdpa", "rmsprop", {"rmsprop_centered": True}),
    ("gpt2", "amp-bf16", "sdpa", "adadelta", {}),
    ("llama", "fp32", "sdpa", "adafactor", {}),
    ("gpt2", "fp32", "sdpa", "adam", {"optimizer_implementation": "for-loop"}),
    ("llama", "fp32", "sdpa", "adamw", {"optimizer_implementation": "fused"}),
]


# vocab 512 puts the peak at the loss (log-softmax backward) or the optimizer step; vocab 64 moves
# it into the blocks' forward/backward, which checks the per-block events.
PARAMS = [(*c, 512) for c in CASES] + [(*c, 64) for c in CASES[::3]]

# Momentum SGD steps in place (no step temporaries of its own), so what else the step does shows:
# mixed-fp16's overflow check (isfinite per fp32 gradient, with the states live from step 2 on)
# and, under full checkpointing, the recomputed tensors a backward node frees as its apply()
# returns, before the engine reduces the bias gradient (dropout puts the peak there).
FULL = {"activation_checkpointing": {"strategy": "full"}}
PARAMS += [
    ("llama", "mixed-fp16", "sdpa", "sgd-momentum", {}, 512),
    ("llama", "mixed-fp16", "sdpa", "sgd-momentum", {**FULL, "dropout": 0.1}, 64),
    ("gpt2", "mixed-fp16", "eager", "sgd-momentum", {"dropout": 0.1}, 64),
    ("gpt2", "mixed-fp16", "sdpa", "sgd", {}, 512),
    ("gpt2", "fp32", "sdpa", "sgd-momentum", {**FULL, "dropout": 0.1}, 64),
    ("gpt2", "amp-fp16", "eager", "sgd-momentum", {**FULL, "dropout": 0.1}, 64),
    ("gpt2", "fp32", "eager", "sgd-momentum", {"activation_checkpointing": {"strategy": "sqrt"}}, 64),
    ("llama", "fp32", "sdpa", "sgd-momentum", {**FULL, "dropout": 0.1}, 64),
    ("llama", "mixed-bf16", "sdpa", "sgd-momentum", {**FULL, "dropout": 0.1}, 512),
    ("gpt2", "mixed-bf16", "sdpa", "sgd-momentum", FULL, 512),
    ("gpt2", "amp-bf16", "sdpa", "sgd-momentum", {"activation_checkpointing": {"strategy": "selective"}, "dropout": 0.1}, 512),
    ("llama", "amp-fp16", "sdpa", "sgd-momentum", {"dropout": 0.1}, 64),
]


@pytest.mark.parametrize("family,precision,attention,optimizer,extra,vocab", PARAMS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{'-'.join(c[4]) or 'plain'}-V{c[5]}" for c in PARAMS])
def test_simulated_step_equals_measured(family, precision, attention, optimizer, extra, vocab):
    model = dict(TINY[family], vocab_size=vocab)
    training = dict(precision=precision, attention=attention, optimizer=optimizer,
                    micro_batch_size=2, sequence_length=32, **extra)
    r = run_validation(ValidationRequest(model=model, training=training, steps=3))
    assert r.estimate == r.measured, (r.peak_op, r.peak_phase)
    assert r.first_step_estimate == r.first_step_measured


# Autocast casts a linear's arguments right to left (bias, weight, input), so the engine runs the
# input's cast backward first, then the weight's, then the bias's: at sequence 16 the peak is the
# fp32 weight gradient's copy while the fp16 bias gradient is still uncast. Replaying the casts in
# the opposite order put the peak 3,584 bytes lower (gradients +1,024, temporaries -4,608).
@pytest.mark.parametrize("family,seq", [("gpt2", 16), ("gpt2", 32), ("llama", 16)])
def test_autocast_cast_order_equals_measured(family, seq):
    model = dict(TINY[family], vocab_size=64)
    training = dict(precision="amp-fp16", attention="sdpa", optimizer="sgd-momentum",
                    micro_batch_size=2, sequence_length=seq)
    r = run_validation(ValidationRequest(model=model, training=training, steps=3))
    assert r.estimate == r.measured, (r.peak_op, r.peak_phase)
    assert r.first_step_estimate == r.first_step_measured


def test_traced_full_size_equals_estimate():
    """FakeTensorMode: a full-size model (TinyLlama 1.1B, 4 x 512 tokens) without allocating it."""
    req = ValidationRequest(model={"preset": "tinyllama-1.1b"}, mode="traced", steps=2,
                            training=dict(precision="amp-bf16", optimizer="adamw",
                                          micro_batch_size=4, sequence_length=512))
    r = run_validation(req)
    assert r.measured.total > 10 * 2**30
    assert r.estimate == r.measured
    assert r.step_time_s is None and "FakeTensorMode" in r.device


# Checkpoint plans that repeat (every-k, sqrt) on enough blocks that the estimate simulates the
# first three periods and the last two and accounts for the ones between (planner.step.program
# plan_period): still equal to the measured step.
PERIODIC = [
    ("llama", "amp-bf16", "sdpa", "adamw", {"activation_checkpointing": {"strategy": "every-k", "every_k": 2}}, 14),
    ("gpt2", "fp32", "eager", "sgd-momentum", {"activation_checkpointing": {"strategy": "sqrt"}, "dropout": 0.1}, 49),
    ("llama", "mixed-bf16", "sdpa", "adamw", {"activation_checkpointing": {"strategy": "every-k", "every_k": 3},
                                              "lora": {"rank": 4}}, 22),
]


@pytest.mark.parametrize("family,precision,attention,optimizer,extra,layers", PERIODIC,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}-L{c[5]}" for c in PERIODIC])
def test_periodic_checkpoint_plans_equal_measured(family, precision, attention, optimizer, extra,
                                                  layers):
    from planner.catalog.presets import resolve_model
    from planner.routes.checkpointing import named_plan
    from planner.step.program import ReferenceProgram
    from planner.catalog.specs import ModelSpec, TrainingSpec

    model = dict(TINY[family], vocab_size=64, num_layers=layers)
    training = dict(precision=precision, attention=attention, optimizer=optimizer,
                    micro_batch_size=2, sequence_length=32, **extra)
    ck = extra["activation_checkpointing"]
    plan = set(named_plan(ck["strategy"], layers, ck.get("every_k")))
    prog = ReferenceProgram(resolve_model(ModelSpec(**model)), TrainingSpec(**training),
                            checkpointed=plan)
    assert prog.n_phantom and prog.period > 1  # the estimate is the compressed replay
    r = run_validation(ValidationRequest(model=model, training=training, steps=3))
    assert r.estimate == r.measured, (r.peak_op, r.peak_phase)
    assert r.first_step_estimate == r.first_step_measured
