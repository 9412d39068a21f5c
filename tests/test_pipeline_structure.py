"""Pipeline rank structure templates (planner/layouts/pipeline_structure.py) against the full replay.

The oracle is ``PipelineRankProgram(...).run_steps()``: every action of the rank's whole list
replayed op by op on the plain step simulator. A template is compiled at one model (its witness)
and one micro-batch count, then evaluated for other models of the structure (other dimensions,
micro-batch sizes and sequence lengths) and other micro-batch counts whose shortened lists are
alike, on every rank: both peaks (first step, steady step) must be equal field by field (total,
every category, op, phase), to the byte. Schedules: GPipe, 1F1B, interleaved 1F1B and the
zero-bubble ZB-H1 and ZB-V; pipeline sizes 2-4; gpt2 and llama with and without grouped-query
attention; several precisions and optimizers.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts import pipeline_structure as pst
from planner.layouts import pipeline_structures
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_structure import compile_pipeline_structure, rank_lists
from planner.machine import cache
from planner.machine.symbolic import Undecided
from planner.routes import memory as pm
from planner.step import simulate as step_cache
from planner.step.structure import structure_of

SCHEDULES = [("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("1f1b", 1),
             ("interleaved-1f1b", 2), ("zb-v", 2), ("gpipe", 1)]
SETTINGS = [{"precision": "amp-bf16"}, {"precision": "fp32", "optimizer": "sgd"},
            {"precision": "bf16", "optimizer": "adagrad"}, {"precision": "amp-bf16",
                                                            "optimizer": "rmsprop"}]


def _arch(family: str, gqa: bool, rng: random.Random, layers: int) -> dict:
    """A small random model of one domain (every size >= 2 but the query heads per key/value
    head, 1 unless ``gqa``; llama's head dimension even)."""
    nkv = rng.choice([2, 3, 4])
    g = rng.choice([2, 3]) if gqa else 1
    hd = 2 * rng.choice([2, 3, 4]) if family == "llama" else rng.choice([3, 4, 6])
    return {"family": family, "num_layers": layers, "hidden_size": nkv * g * hd,
            "num_heads": nkv * g, **({"num_kv_heads": nkv} if family == "llama" else {}),
            "ffn_hidden_size": rng.randint(4, 200), "vocab_size": rng.randint(20, 400),
            "max_sequence_length": rng.randint(32, 128)}


def _setup(arch: dict, setting: dict, m: int, rng: random.Random):
    req = MemoryRequest.model_validate({"model": arch, "training": {
        **setting, "micro_batch_size": rng.choice([2, 3, 5]),
        "sequence_length": rng.choice([4, 8, 12]), "gradient_accumulation_steps": m}})
    return resolve_model(req.model), req.training


def _same(got: list, full) -> bool:
    return (got[0], got[1]) == (full.first, full.steady)


@pytest.mark.parametrize("seed", range(16))
def test_structure_template_equals_full_replay(seed: int) -> None:
    """Templates compiled at one model and micro-batch count, evaluated for new models and
    counts on every rank, equal the full replay; at least one evaluation per seed is of a model
    other than the template's witness."""
    rng = random.Random(seed)
    name, v = SCHEDULES[seed % len(SCHEDULES)]
    family, gqa = [("gpt2", False), ("llama", False), ("llama", True)][seed % 3]
    setting = SETTINGS[seed % len(SETTINGS)]
    p = rng.choice([2, 3, 4]) if name not in ("zb-v",) else 2
    counts = sorted({p * k + rng.choice([0, 0, 1]) for k in (2, 3, 4)})
    layers = None
    templates: dict = {}
    counts_of = {"reused": 0}
    for m in counts:
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        layers = layers or sched.num_stages * rng.randint(1, 2)
        for _ in range(2):  # two models per micro-batch count (the second: a new model)
            model, tr = _setup(_arch(family, gqa, rng, layers), setting, m, rng)
            _check_ranks(model, tr, sched, templates, counts_of)
    assert counts_of["reused"], (name, p, counts)


def _check_ranks(model, tr, sched, templates: dict, counts_of: dict) -> None:
    """Every rank from its structure's template (compiled here at this model where none of
    ``templates`` admits it) against the full replay."""
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    for rank in range(sched.num_ranks):
        rl = rank_lists(sched, rank, model)
        full_values = (*values, *rl.dropped)
        key = (dom, rl.signature)
        tpl = templates.get(key)
        if tpl is not None and (tpl.admits is None or tpl.admits(*full_values)):
            counts_of["reused"] += 1
        else:
            tpl = templates[key] = compile_pipeline_structure(
                model, tr, sched, rank, "cuda", names, dom[0], values, rl)
        full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
        assert _same(tpl.evaluate(full_values), full), (sched.name, sched.microbatches, rank)


def test_one_compile_serves_other_micro_batch_counts() -> None:
    """1F1B on 4 stages: the rank classes' shortened lists at m = 12 are those of m = 16 and 40
    (more periods left out), so the templates of m = 12 answer them, equal to the replay."""
    rng = random.Random(5)
    model, tr = _setup(_arch("llama", True, rng, 8), SETTINGS[0], 12, rng)
    sched = build_schedule("1f1b", 4, 12, 1)
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    tpls = {r: compile_pipeline_structure(model, tr, sched, r, "cuda", names, dom[0], values,
                                          rank_lists(sched, r, model)) for r in range(4)}
    for m in (16, 40):
        model2, tr2 = _setup(_arch("llama", True, rng, 8), SETTINGS[0], m, rng)
        sched2 = build_schedule("1f1b", 4, m, 1)
        vals = structure_of(model2, tr2.micro_batch_size, tr2.sequence_length)[2]
        for r in range(4):
            rl = rank_lists(sched2, r, model2)
            assert rl.signature == rank_lists(sched, r, model).signature
            assert rl.dropped != rank_lists(sched, r, model).dropped
            full = PipelineRankProgram(model2, tr2, sched2, r, device="cuda").run_steps()
            assert _same(tpls[r].evaluate((*vals, *rl.dropped)), full), (m, r)


def _req(arch: dict, m: int, pp: int, schedule: str, v: int = 1, b: int = 2):
    return MemoryRequest.model_validate({
        "model": arch, "training": {"micro_batch_size": b, "sequence_length": 16,
                                    "precision": "amp-bf16", "gradient_accumulation_steps": m},
        "parallelism": {"pipeline_parallel": pp, "pipeline_schedule": schedule,
                        "virtual_pipeline_stages": v}})


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1)])
def test_planner_evaluates_new_models_on_a_known_structure(schedule: str, v: int) -> None:
    """estimate_memory (sync compiles): the first model compiles the ranks' structures; new
    models (and a new micro-batch count where its lists are alike) are evaluated with no replay
    at all, and every answer equals estimate_memory with templates and structures off."""
    rng = random.Random(11)
    reqs = [_req(_arch("llama", True, rng, 8), m, 2, schedule, v, b=rng.choice([2, 3]))
            for m in (8, 8, 10, 12)]
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = [pm.estimate_memory(reqs[0])]
        r0, e0 = cache.COUNTS["replays"], pipeline_structures.COUNTS["evaluated"]
        got.append(pm.estimate_memory(reqs[1]))
        assert cache.COUNTS["replays"] == r0  # no rank replayed: every rank evaluated
        assert pipeline_structures.COUNTS["evaluated"] - e0 == 2
        got += [pm.estimate_memory(r) for r in reqs[2:]]
    pm.clear_caches()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        want = [pm.estimate_memory(r) for r in reqs]
    assert got == want


def test_background_compile_then_evaluation() -> None:
    """Default (background) mode: the first estimate replays and queues the compiles; after
    them a never-seen model is evaluated (no replay), equal to the replay."""
    rng = random.Random(12)
    reqs = [_req(_arch("gpt2", False, rng, 6), 9, 3, "1f1b") for _ in range(2)]
    pm.clear_caches()
    first = pm.estimate_memory(reqs[0])
    step_cache.wait_for_structures()
    r0 = cache.COUNTS["replays"]
    second = pm.estimate_memory(reqs[1])
    assert cache.COUNTS["replays"] == r0
    pm.clear_caches()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        assert [first, second] == [pm.estimate_memory(r) for r in reqs]


def test_a_failed_compile_falls_back_to_the_replay(monkeypatch) -> None:
    """A rank whose symbolic compile raises Undecided (or TypeError) stays on the replay: the
    answers are the replay's, and the structure is tried again at most MAX_VARIANTS times."""
    calls = []

    def refuse(*a, **k):
        calls.append(1)
        raise (Undecided if len(calls) % 2 else TypeError)("refused")
    monkeypatch.setattr(pipeline_structures, "compile_pipeline_structure", refuse)
    rng = random.Random(13)
    reqs = [_req(_arch("llama", False, rng, 4), 4, 2, "gpipe") for _ in range(6)]
    pm.clear_caches()
    with step_cache.structure_mode("sync"):
        got = [pm.estimate_memory(r) for r in reqs]
    assert calls
    assert len(calls) <= 2 * pipeline_structures.MAX_VARIANTS  # two rank classes at most
    pm.clear_caches()
    with step_cache.replay_only(), step_cache.structure_mode("off"):
        assert got == [pm.estimate_memory(r) for r in reqs]


def test_unaffine_replays_are_refused(monkeypatch) -> None:
    """Replays that do not have the affine form in the periods left out raise Undecided (the
    caller replays): the check is on, not assumed."""
    rng = random.Random(14)
    model, tr = _setup(_arch("gpt2", False, rng, 4), SETTINGS[0], 8, rng)
    sched = build_schedule("1f1b", 2, 8, 1)
    rl = rank_lists(sched, 0, model)
    assert rl.dropped
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    real = pst._replay
    n = []

    def skewed(*a):
        rows, exps, meta, wanted = real(*a)
        n.append(1)
        if len(n) == len(rl.lists):  # the replay with two more periods in all, off by a byte
            rows = rows.copy()
            rows[-1, 0, 0] += 1
        return rows, exps, meta, wanted
    monkeypatch.setattr(pst, "_replay", skewed)
    with pytest.raises(Undecided):
        compile_pipeline_structure(model, tr, sched, 0, "cuda", names, dom[0], values, rl)


def test_virtual_stages_below_nine_rounds_take_the_whole_list() -> None:
    """Interleaved 1F1B below nine rounds: the whole action list on every rank, no periods left
    out, and its template equals the full replay; at nine rounds and on 1F1B the lists are
    searched (some rank's shortened)."""
    from planner.layouts.pipeline_memory import rank_actions

    rng = random.Random(9)
    for name, v, p, m, whole in [("interleaved-1f1b", 2, 4, 8, True),
                                 ("interleaved-1f1b", 2, 2, 10, True),
                                 ("interleaved-1f1b", 2, 2, 16, True),
                                 ("interleaved-1f1b", 2, 2, 18, False),
                                 ("1f1b", 1, 4, 24, False)]:
        sched = build_schedule(name, p, m, v)
        model, tr = _setup(_arch("llama", False, rng, sched.num_stages), SETTINGS[0], m, rng)
        full = [rank_lists(sched, rank, model).lists == [(rank_actions(sched, rank), m)]
                for rank in range(p)]
        assert (all(full) if whole else not all(full)), (name, p, m, full)
        if whole:
            _check_ranks(model, tr, sched, {}, {"reused": 0})
