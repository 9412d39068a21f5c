"""Taped layout templates (planner/layouts/pipeline_tape_template.py) against the full replay.

A layout's template is compiled at one model and evaluated at others of its structure (other
widths, heads, vocabulary, micro-batch size and sequence length within the structure's domain):
every taped rank's two peaks (first step, steady step) must equal the op-by-op replay of that
model field by field (total, every category, op, phase), for random setups of every schedule
the tape takes. Then the planner's route: a known layout's new model answered from the
template, equal to the replay, and the compile queued only at a layout's second model.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts import pipeline_tape as tp
from planner.layouts import pipeline_tape_templates as tts
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_tape_template import compile_taped
from planner.machine import cache
from planner.step import structures
from planner.step.structure import structure_of
from tests.pipeline_setups import random_setup

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-h2", 1),
             ("zb-v", 2), ("dualpipe-v", 2)]


def _sibling(rng: random.Random, model, tr):
    """Another model of ``model``'s structure (its family, blocks and options; sizes of 1
    kept 1, the others drawn anew, the head dimension's parity kept)."""
    nh = model.num_heads
    nkv = model.num_kv_heads or nh
    hd = model.hidden_size // nh
    hd2 = rng.choice([h for h in (4, 6, 8, 10, 12, 16) if h % 2 == hd % 2])
    spec = {"family": model.family, "num_layers": model.num_layers, "hidden_size": nh * hd2,
            "num_heads": nh, "vocab_size": rng.randint(50, 300),
            "ffn_hidden_size": rng.randint(2, 6) * nh * hd2, "max_sequence_length": 64}
    if model.family == "llama":
        spec["num_kv_heads"] = nkv
    b = 1 if tr.micro_batch_size == 1 else rng.randint(2, 4)
    t = rng.choice([8, 12, 16, 24, 32])
    req = MemoryRequest.model_validate({"model": spec, "training": tr.model_dump() | {
        "micro_batch_size": b, "sequence_length": t}})
    return resolve_model(req.model), req.training


@pytest.fixture
def every_list(monkeypatch):
    """Every list taped, however short and shallow (the planner tapes the long ones alone)."""
    monkeypatch.setattr(tp, "MIN_ACTIONS", 0)
    monkeypatch.setattr(tp, "DEEP", 0)
    cache.clear()
    yield
    cache.clear()


@pytest.mark.parametrize("seed", range(28))
def test_templates_equal_full_replay_of_other_models(seed: int, every_list) -> None:
    rng = random.Random(300 + seed)
    name, v = SCHEDULES[seed % len(SCHEDULES)]
    while True:
        p = rng.choice([2, 3, 4])
        try:
            sched = build_schedule(name, p, rng.choice([2, p, 3 * p, 6 * p]), v)
        except ScheduleConstraintError:
            continue
        break
    model, tr = random_setup(rng, sched)
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    tpl = compile_taped(model, tr, sched, "cuda", names, dom[0], values)
    assert len(tpl.ranks) == sched.num_ranks
    admitted = 0
    for other in [(model, tr)] + [_sibling(rng, model, tr) for _ in range(3)]:
        d2, n2, v2 = structure_of(other[0], other[1].micro_batch_size,
                                  other[1].sequence_length)
        assert (d2, n2) == (dom, names)
        if tpl.admits is not None and not tpl.admits(*v2):
            continue
        admitted += 1
        for rank in range(sched.num_ranks):
            full = PipelineRankProgram(*other, sched, rank, device="cuda").run_steps()
            got = tpl.stage_peak(rank, v2)
            assert (got.first, got.steady) == (full.first, full.steady), (rank, v2)
    assert admitted >= 2


def _req(hidden: int, ffn: int, m: int = 96):
    req = MemoryRequest.model_validate(
        {"model": {"family": "llama", "num_layers": 8, "hidden_size": hidden, "num_heads": 4,
                   "num_kv_heads": 2, "ffn_hidden_size": ffn, "vocab_size": 96,
                   "max_sequence_length": 64},
         "training": {"micro_batch_size": 2, "sequence_length": 16,
                      "gradient_accumulation_steps": m},
         "parallelism": {"pipeline_parallel": 2, "pipeline_schedule": "zb-v",
                         "virtual_pipeline_stages": 2}})
    return resolve_model(req.model), req.training


def test_a_known_layouts_new_model_is_evaluated(monkeypatch) -> None:
    """Sync mode: the first model compiles the layout, the next is evaluated from it (no
    replay), equal to the full replay; background mode: the first model queues nothing, the
    second queues the compile."""
    from planner.layouts import pipelined
    from planner.layouts.pipeline_schedules import schedule_of
    sched = schedule_of("zb-v", 2, 96, 2)
    assert tp.tapes(sched, 0)
    cache.clear()
    try:
        with structures.structure_mode("sync"):
            for hidden, ffn in ((32, 96), (48, 160), (64, 200)):
                model, tr = _req(hidden, ffn)
                before = dict(tts.COUNTS)
                got = [pipelined.pipeline_rank(model, tr, sched, "cuda", r) for r in (0, 1)]
                full = [PipelineRankProgram(model, tr, sched, r, device="cuda").run_steps()
                        for r in (0, 1)]
                assert [(g.first, g.steady) for g in got] == [(f.first, f.steady) for f in full]
                if hidden > 32:
                    assert tts.COUNTS["compiles"] == before["compiles"]
                    assert tts.COUNTS["evaluated"] == before["evaluated"] + 2
        cache.clear()
        queued = []
        monkeypatch.setattr(structures, "submit", lambda pend, fn: queued.append(pend))
        for i, (hidden, ffn) in enumerate(((32, 96), (32, 96), (48, 160))):
            model, tr = _req(hidden, ffn)
            tts.estimate(model, tr, sched, "cuda", 0)
            assert len(queued) == (1 if i == 2 else 0)
    finally:
        cache.clear()


def test_the_background_compile_serves_the_third_model() -> None:
    """Background mode (the service's): two models of a layout are taped, the second queues
    the layout's compile on the structure thread, and the third is answered from it, equal to
    the full replay."""
    from planner.layouts import pipelined
    from planner.layouts.pipeline_schedules import schedule_of
    sched = schedule_of("zb-v", 2, 96, 2)
    cache.clear()
    try:
        assert structures.mode() == "background"
        for hidden, ffn in ((32, 96), (48, 160)):
            model, tr = _req(hidden, ffn)
            before = tts.COUNTS["evaluated"]
            pipelined.pipeline_rank(model, tr, sched, "cuda", 0)
            assert tts.COUNTS["evaluated"] == before
        structures.wait_for_structures()
        model, tr = _req(64, 200)
        before = tts.COUNTS["evaluated"]
        got = [pipelined.pipeline_rank(model, tr, sched, "cuda", r) for r in (0, 1)]
        assert tts.COUNTS["evaluated"] == before + 2
        full = [PipelineRankProgram(model, tr, sched, r, device="cuda").run_steps()
                for r in (0, 1)]
        assert [(g.first, g.steady) for g in got] == [(f.first, f.steady) for f in full]
    finally:
        cache.clear()
