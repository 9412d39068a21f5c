"""A random small model and training spec for a pipeline schedule, as the pipeline replay tests
draw them (tests/test_pipeline_actions.py, tests/test_pipeline_tape.py): both families, stages of
1-2 blocks or of 7-9 (whose middle blocks are stood in for), every replayed precision and
several optimizers."""

from __future__ import annotations

import random

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest


def random_setup(rng: random.Random, sched):
    """(resolved model, training spec) for ``sched``, drawn from ``rng``."""
    S = sched.num_stages
    family = rng.choice(["gpt2", "llama"])
    long = rng.random() < 0.3
    layers = S * rng.randint(7, 9) + rng.randint(0, S - 1) if long else rng.randint(S, 2 * S + 1)
    model = {"family": family, "num_layers": layers, "hidden_size": 32, "num_heads": 4,
             "vocab_size": 96, "max_sequence_length": 64}
    if family == "llama":
        model["num_kv_heads"] = rng.choice([1, 2, 4])
    training = {"micro_batch_size": rng.choice([1, 2, 3]),
                "sequence_length": rng.choice([8, 16, 24]),
                "gradient_accumulation_steps": sched.microbatches,
                "precision": rng.choice(["fp32", "amp-bf16", "bf16"]),
                "optimizer": rng.choice(["adamw", "sgd", "adagrad", "rmsprop"])}
    req = MemoryRequest.model_validate({"model": model, "training": training})
    return resolve_model(req.model), req.training
