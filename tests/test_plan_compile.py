"""The plan search's compile threshold (planner/routes/plan_search.py: ``_compile_threshold``,
planner/machine/cache.py: ``compile_after``): when a step setup's template is compiled changes
nothing but the time; every estimate equals its replay."""

from __future__ import annotations

from planner.catalog.plan_specs import PlanRequest
from planner.catalog.specs import MemoryRequest, ModelSpec, TrainingSpec
from planner.machine import cache
from planner.routes.memory import clear_caches, estimate_memory
from planner.routes.plan_search import _compile_threshold, plan
from planner.routes.plan_space import enumerate_layouts
from planner.catalog.presets import resolve_model
from planner.step.simulate import replay_only, structure_mode


def _est(b: int):
    req = MemoryRequest(model=ModelSpec(family="llama", num_layers=2, hidden_size=64,
                                        num_heads=4, vocab_size=128),
                        training=TrainingSpec(micro_batch_size=b, sequence_length=32))
    return estimate_memory(req, device="cpu", explain=False).breakdown


def test_compile_after_delays_the_template_and_keeps_the_answers():
    """Outside, a setup's template is compiled at its second size; inside compile_after(3) at
    its third; the peaks at every size equal the op-by-op replay's either way."""
    sizes = (2, 3, 4, 5)
    clear_caches()
    with replay_only():
        replayed = [_est(b) for b in sizes]
    with structure_mode("off"):
        for threshold, compiled_at in ((None, 2), (3, 3), (5, None)):
            clear_caches()
            got, counts = [], []
            for b in sizes:
                if threshold is None:
                    got.append(_est(b))
                else:
                    with cache.compile_after(threshold):
                        got.append(_est(b))
                counts.append(sum(t is not None for t in cache._TEMPLATES.values()))
            assert got == replayed
            first = next((i for i, c in enumerate(counts) if c), None)
            assert first == (None if compiled_at is None else compiled_at - 1), (threshold, counts)
    assert cache._COMPILE_AFTER.get() == 2  # restored on leaving


def test_compile_threshold_counts_the_sizes_of_the_space():
    """With micro-batches {1, 2, 4, 8} (three sizes >= 2) a compile cannot pay: never compiled;
    with 1..8 (seven sizes >= 2) compiled at the second size."""
    base = dict(model=dict(family="llama", num_layers=8, hidden_size=1024, num_heads=16,
                           num_kv_heads=4, ffn_hidden_size=2816, vocab_size=32000),
                cluster=dict(gpu="h100-80gb", num_gpus=8))
    for batch, want in ((64, 4), (840, 2), (1, 2)):
        req = PlanRequest.model_validate({**base, "training": dict(
            global_batch_sequences=batch, sequence_length=1024, max_micro_batch_size=8)})
        cands = enumerate_layouts(req, resolve_model(req.model), 8, {})
        assert _compile_threshold(cands) == want, batch
    # and a search leaves the default in place
    plan(req)
    assert cache._COMPILE_AFTER.get() == 2
