"""Shortcuts around the per-rank model states (planner/layouts/sharding.py) and the "fits
instead" note's ZeRO-3 ranks (planner/routes/memory_notes.py), against the straightforward
computations:

- LoRA specs do not hash, so their states are memoised by JSON; on what the states do not
  depend on (micro-batch, sequence, checkpoint plan, gradient accumulation but for ZeRO-2/3's
  per-micro-batch traffic, the schedule) they share one entry, as hashable specs do, and equal
  the states computed from the unnormalised specs.
- The note's search over data-parallel ranks under ZeRO-3 stops before it starts when the
  step's own activation and temporary peak cannot fit: each rank's total is at least that peak.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import allocator_reserve, resolve_model
from planner.catalog.specs import MemoryRequest, ParallelSpec, TrainingSpec
from planner.layouts.sharding import _shard_model_states, shard_model_states
from planner.step import simulate as step_cache
from planner.routes import memory_notes


def _lora_setup(rng: random.Random) -> tuple:
    body = {"family": rng.choice(["gpt2", "llama"]), "num_layers": rng.randint(2, 6),
            "hidden_size": rng.choice([64, 128]), "num_heads": 4, "vocab_size": 512,
            "max_sequence_length": 512}
    model = resolve_model(MemoryRequest.model_validate({"model": body}).model)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_lora_states_memoised_on_what_they_depend_on(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(12):
        model = _lora_setup(rng)
        pp = rng.choice([1, 2])
        tr = TrainingSpec.model_validate({
            "micro_batch_size": rng.randint(1, 8), "sequence_length": rng.choice([16, 128]),
            "gradient_accumulation_steps": rng.choice([1, 2, 8]) * (pp if pp > 1 else 1),
            "activation_checkpointing": {"strategy": rng.choice(["none", "full", "sqrt"])},
            "precision": rng.choice(["fp32", "amp-bf16", "bf16"]),
            "optimizer": rng.choice(["adamw", "sgd"]),
            "lora": {"rank": rng.choice([2, 8]),
                     "target_modules": rng.choice([["q", "v"], ["q", "k", "v", "o", "up",
                                                                 "down"]])}})
        dp = rng.choice([1, 2, 4])
        par = ParallelSpec.model_validate({
            "data_parallel": dp, "zero_stage": rng.choice([0, 1, 2, 3]) if dp > 1 else 0,
            "pipeline_parallel": pp,
            **({"pipeline_schedule": rng.choice(["gpipe", "1f1b"])} if pp > 1 else {})})
        got = shard_model_states(model, tr, par)
        assert got == _shard_model_states(model, tr, par), (tr, par)
        # and again, from the memo
        assert shard_model_states(model, tr, par) == got


def test_zero3_note_stops_when_the_activations_cannot_fit() -> None:
    req = MemoryRequest.model_validate({
        "model": {"family": "llama", "num_layers": 4, "hidden_size": 128, "num_heads": 4,
                  "vocab_size": 1000, "max_sequence_length": 1024},
        "training": {"micro_batch_size": 4, "sequence_length": 512}})
    model = resolve_model(req.model)
    tr, par = req.training, req.parallelism
    extra = step_cache.simulate(model, tr, "cuda", frozenset()).act_peak.total

    def brute(mem: int) -> int | None:  # the first power of two whose rank fits, unpruned
        n = 2
        while n <= 4096:
            ms = shard_model_states(model, tr, par.model_copy(
                update={"data_parallel": n, "zero_stage": 3}))
            states = ms.parameters + ms.gradients + ms.optimizer_states + ms.buffers
            total = states + max(extra, ms.step_temporaries)
            if total + allocator_reserve(total, "cuda") <= mem:
                return n
            n *= 2
        return None

    bound = extra + allocator_reserve(extra, "cuda")
    for mem in (bound - 1, bound, bound + (1 << 20), 2 * bound, 100 * bound):
        got = memory_notes._zero3_fits(model, tr, par, "cuda", frozenset(), mem)
        want = brute(mem)
        assert (got is None) == (want is None), mem
        if want is not None:
            assert f"over data_parallel {want}:" in got, (mem, got)
    assert memory_notes._zero3_fits(model, tr, par, "cuda", frozenset(), bound - 1) is None
