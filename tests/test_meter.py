"""LiveMemoryMeter agrees with torch's own MemTracker on the total peak, to the byte."""

from __future__ import annotations

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from planner.catalog.presets import resolve_model
from planner.catalog.specs import ModelSpec, TrainingSpec
from service.validation import step as S
from service.validation.meter import LiveMemoryMeter


def _run(tracker_factory, precision: str):
    cfg = resolve_model(ModelSpec(family="gpt2", num_layers=2, hidden_size=64, num_heads=4,
                                  vocab_size=256, max_sequence_length=32))
    tr = TrainingSpec(precision=precision, optimizer="adamw", micro_batch_size=2, sequence_length=32)
    torch.manual_seed(0)
    s = S.build(cfg, tr, torch.device("cpu"))
    idx, tgt = S.make_batch(cfg, tr, torch.device("cpu"))
    t = tracker_factory(s, idx, tgt)
    with t:
        for _ in range(2):
            if isinstance(t, MemTracker):
                t.reset_mod_stats()  # MemTracker keeps per-module stats of one iteration only
            loss = S.forward_loss(s, idx, tgt)
            S.backward(s, loss)
            del loss
            S.optimizer_step(s)
    return t


def test_peak_equals_memtracker():
    for precision in ("fp32", "amp-bf16"):
        def ours(s, idx, tgt):
            m = LiveMemoryMeter()
            m.register(s.model, "parameters")
            m.register([idx, tgt], "activations")
            return m

        def theirs(s, idx, tgt):
            mt = MemTracker()
            mt.track_external(s.model, s.optimizer, idx, tgt)
            return mt

        a = _run(ours, precision).peak.total_bytes
        mt = _run(theirs, precision)
        b = sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
        assert a == b, precision


def test_categories_are_assigned_after_the_fact():
    """A gradient is counted as a gradient at the peak even if the peak came before it was
    assigned to .grad; optimizer states likewise."""
    cfg = resolve_model(ModelSpec(family="llama", num_layers=1, hidden_size=32, num_heads=4,
                                  vocab_size=64, ffn_hidden_size=64))
    tr = TrainingSpec(precision="fp32", optimizer="adam", micro_batch_size=1, sequence_length=8)
    s = S.build(cfg, tr, torch.device("cpu"))
    idx, tgt = S.make_batch(cfg, tr, torch.device("cpu"))
    m = LiveMemoryMeter()
    m.register(s.model, "parameters")
    m.register([idx, tgt], "activations")
    with m:
        for _ in range(2):
            m.reset_peak()
            with m.in_phase("forward"):
                loss = S.forward_loss(s, idx, tgt)
            with m.in_phase("backward"):
                S.backward(s, loss)
            del loss
            m.mark([p.grad for p in s.model.parameters()], "gradients")
            with m.in_phase("optimizer"):
                S.optimizer_step(s)
            m.mark(s.optimizer, "optimizer_states")
    bd = m.peak.breakdown()
    n = sum(p.numel() for p in s.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in s.model.buffers())
    assert bd["parameters"] == 4 * n + buffers
    # Adam: exp_avg + exp_avg_sq (4 B each) + a 4-byte step per tensor
    assert bd["optimizer_states"] == 8 * n + 4 * len(list(s.model.parameters()))
    assert bd["gradients"] == 4 * n
    assert bd["total"] == sum(v for k, v in bd.items() if k != "total")
