"""The activation floor POST /v1/zero shares between its layouts (planner/routes/activation_floor.py)
changes what is estimated, never an answer: over random setups and memories around the floor, the
whole ZeRO comparison equals the one made without it, and the floor is at most every variant's
need (peak plus reserve) at the sizes it rules on."""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.machine import cache
from planner.routes import activation_floor as AF
from planner.routes import zero as Z
from planner.routes.checkpoint_blocks import checkpointed_blocks_of
from planner.routes.memory import estimate_memory


def _setup(rng: random.Random) -> dict:
    family = rng.choice(["gpt2", "llama"])
    heads = rng.choice([2, 4])
    model = {"family": family, "num_layers": rng.randint(1, 6), "hidden_size": 16 * heads,
             "num_heads": heads, "vocab_size": rng.choice([96, 500]), "max_sequence_length": 256}
    ac = rng.choice([{"strategy": "none"}, {"strategy": "full"}, {"strategy": "sqrt"},
                     {"strategy": "every-k", "every_k": 2}])
    return {"model": model,
            "training": {"micro_batch_size": rng.randint(Z.FLOOR_FROM, 48),
                         "sequence_length": rng.choice([16, 64, 128]),
                         "gradient_accumulation_steps": rng.choice([1, 2, 4]),
                         "precision": rng.choice(["fp32", "amp-bf16", "mixed-bf16"]),
                         "attention": rng.choice(["sdpa", "eager"]),
                         "dropout": rng.choice([0.0, 0.1]),
                         "activation_checkpointing": ac,
                         **({"lora": {"rank": 4}} if rng.random() < 0.2 else {})},
            "parallelism": {"data_parallel": rng.choice([1, 2, 3, 8]),
                            "zero_stage": rng.randint(0, 3)}}


def _resolved(body: dict):
    """The request, its model, training and checkpointed blocks, with the caches cleared."""
    req = MemoryRequest.model_validate(body)
    model, tr = resolve_model(req.model), req.training
    cache.clear()
    return req, model, tr, checkpointed_blocks_of(tr, model)


def _compare(body: dict, monkeypatch: pytest.MonkeyPatch, floor_on: bool) -> str:
    cache.clear()
    with monkeypatch.context() as mp:
        if not floor_on:
            mp.setattr(Z, "build_floor", lambda *a, **k: None)
        return Z.zero_stages(MemoryRequest.model_validate(body)).model_dump_json()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_comparison_equals_the_one_without_the_floor(seed: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(1400 + seed)
    kinds = {"all of 2 up ruled out": 0, "template": 0}
    for _ in range(6):
        body = _setup(rng)
        req, model, tr, ckpt = _resolved(body)
        floor = AF.ActivationFloor(model, tr, "cuda", ckpt)
        two = floor.measure(2)
        one = estimate_memory(req.model_copy(update={"training": tr.model_copy(
            update={"micro_batch_size": 1})}), explain=False).breakdown.total
        low = floor.measure(1)
        # memories below, at and above the floor at 2, where only b = 1 could fit, and around
        # the floor at 1 (which rules b = 1 out below it)
        for mem in sorted({two - 1, two, two + 1, (one + two) // 2, 3 * two, one, low - 1, low,
                           (low + one) // 2}):
            if mem < 1:
                continue
            q = {**body, "hardware": {"memory_bytes": mem}}
            with_floor = _compare(q, monkeypatch, True)
            assert with_floor == _compare(q, monkeypatch, False), q
            built = AF.build_floor(model, tr, "cuda", ckpt, mem)
            if built is not None:
                kinds["all of 2 up ruled out" if built.first_over(mem) == 2 else "template"] += 1
    assert all(kinds.values()), kinds  # both ways the floor is built were exercised


@pytest.mark.parametrize("seed", [0, 1])
def test_the_floor_is_at_most_every_variants_need(seed: int) -> None:
    """At every size (1, replayed, and from 2 up, from the template), the single-device step's
    activation maximum plus its reserve is at most the need of each of the six layouts POST
    /v1/zero estimates."""
    rng = random.Random(1500 + seed)
    checked = 0
    for _ in range(5):
        body = _setup(rng)
        req, model, tr, ckpt = _resolved(body)
        floor = AF.build_floor(model, tr, "cuda", ckpt, 1 << 50)  # the template way
        if floor is None:  # a setup whose template does not come: no floor, nothing to hold
            continue
        checked += 1
        for b in (1, 2, 3, tr.micro_batch_size, 2 * tr.micro_batch_size):
            for par in Z._variants(req.parallelism):
                q = req.model_copy(update={"parallelism": par, "training": tr.model_copy(
                    update={"micro_batch_size": b})})
                r = estimate_memory(q, explain=False)
                f = floor.measure(1) if b == 1 else floor(b)  # b = 1: replayed where used
                assert f <= r.breakdown.total + r.allocator_reserve_bytes, (body, b, par)
    assert checked >= 3
