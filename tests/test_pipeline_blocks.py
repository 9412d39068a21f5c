"""Pipeline stages of 6-20 blocks with their middle blocks stood in for
(planner.layouts.pipeline_blocks) against the full replay.

The oracle is ``PipelineRankProgram(...).run_steps()`` with no compression: every block of every
action replayed op by op. The rank replayed with its stages' middle blocks stood in for, alone
and under the shortened action lists (``pipeline_replays.rank_step``), and the template compiled
from them (symbolic micro-batch size and sequence length) must give the same first-step and
steady-state peaks, field by field (total, every category, op, phase), for every rank, over
random setups: every schedule, micro-batch counts around the period boundaries, uneven stages,
both families, precisions and optimizers.
"""

from __future__ import annotations

import random

import pytest

from planner.catalog.presets import resolve_model
from planner.catalog.specs import MemoryRequest
from planner.layouts import pipeline_replays as pp
from planner.layouts.pipeline_memory import PipelineRankProgram
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.layouts.pipeline_structure import compile_pipeline_structure, rank_lists
from planner.step.structure import structure_of
from tests.test_pipeline_compression import _model

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("zb-v", 2),
             ("dualpipe-v", 2)]


def _case(seed: int, name: str, v: int):
    rng = random.Random(f"{seed}-{name}-{v}")
    while True:
        p = rng.choice([2, 3])
        m = max(1, p * rng.choice([1, 2]) + rng.choice([-1, 0, 1, 2]))
        try:
            sched = build_schedule(name, p, m, v)
        except ScheduleConstraintError:
            continue
        break
    return (*_model(rng, sched.num_stages, m, per_stage=(6, 20)), sched)


CASES = [(seed, name, v) for seed in range(3) for name, v in SCHEDULES]


@pytest.mark.parametrize("seed,name,v", CASES)
def test_stood_in_blocks_equal_full_replay(seed: int, name: str, v: int) -> None:
    model, tr, sched = _case(seed, name, v)
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        prog = PipelineRankProgram(model, tr, sched, rank, compress_blocks=True)
        assert all(plan[1] for plan in prog.block_plans.values()), prog.block_plans
        short = prog.run_steps()
        assert (short.first, short.steady) == (full.first, full.steady), (name, rank)
        for got, want in ((short.first, full.first), (short.steady, full.steady)):
            assert (got.total, got.by_cat, got.op, got.phase) == (
                want.total, want.by_cat, want.op, want.phase), (name, rank)
        shortened = pp.rank_step(model, tr, sched, rank)
        assert (shortened.first, shortened.steady) == (full.first, full.steady), (name, rank)


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-v", 2),
                                    ("zb-h1", 1), ("dualpipe-v", 2)])
def test_template_with_stood_in_blocks_equals_full_replay(name: str, v: int) -> None:
    model, tr, sched = _case(7, name, v)
    rng = random.Random(name)
    for rank in range(sched.num_ranks):
        tpl = pp.compile_rank(model, tr, sched, rank, "cuda", (None, None))
        for B, T in [(2, 8), (rng.randint(2, 5), rng.randint(2, 24))]:
            t2 = tr.model_copy(update={"micro_batch_size": B, "sequence_length": T})
            full = PipelineRankProgram(model, t2, sched, rank).run_steps()
            assert tpl.evaluate(B, T) == [full.first, full.steady], (name, rank, B, T)


@pytest.mark.parametrize("name,v", [("zb-h1", 1), ("zb-v", 2), ("dualpipe-v", 2)])
def test_structure_template_with_stood_in_split_blocks_equals_full_replay(name: str, v: int):
    """A split backward's phantoms (I and W) on the recording machine with the model's
    dimensions symbolic: one compile per rank, evaluated for other models of the structure."""
    from tests.test_pipeline_structure import SETTINGS, _arch, _setup

    rng = random.Random(f"split-{name}")
    p = 2
    sched = build_schedule(name, p, 3 * p, v)
    layers = sched.num_stages * rng.randint(7, 9) + 1
    setting = SETTINGS[len(name) % len(SETTINGS)]
    family, gqa = rng.choice([("gpt2", False), ("llama", True)])
    model, tr = _setup(_arch(family, gqa, rng, layers), setting, 3 * p, rng)
    dom, names, values = structure_of(model, tr.micro_batch_size, tr.sequence_length)
    for rank in range(sched.num_ranks):
        prog = PipelineRankProgram(model, tr, sched, rank, compress_blocks=True)
        assert all(plan[1] for plan in prog.block_plans.values()) and prog.split_blocks
        rl = rank_lists(sched, rank, model)
        tpl = compile_pipeline_structure(model, tr, sched, rank, "cuda", names, dom[0], values,
                                         rl)
        checked = tries = 0
        while checked < 3 and tries < 40:  # the witness, then new models of the structure
            tries += 1
            other, tr2 = (model, tr) if not checked else \
                _setup(_arch(family, gqa, rng, layers), setting, 3 * p, rng)
            dom2, _, values2 = structure_of(other, tr2.micro_batch_size, tr2.sequence_length)
            full_values = (*values2, *rl.dropped)
            if dom2 != dom or (tpl.admits is not None and not tpl.admits(*full_values)):
                continue
            full = PipelineRankProgram(other, tr2, sched, rank).run_steps()
            got = tpl.evaluate(full_values)
            assert (got[0], got[1]) == (full.first, full.steady), (name, rank, checked)
            checked += 1
        assert checked >= 2, (name, rank)  # (at least one model besides the witness)


def test_replayed_blocks_do_not_grow_with_stage_length() -> None:
    """A stage of 8 blocks and one of 64 replay the same four blocks."""
    req = MemoryRequest.model_validate({
        "model": {"family": "llama", "num_layers": 128, "hidden_size": 32, "num_heads": 4,
                  "num_kv_heads": 2, "vocab_size": 96, "max_sequence_length": 64},
        "training": {"gradient_accumulation_steps": 16}})
    model, tr = resolve_model(req.model), req.training
    for p in (2, 16):
        sched = build_schedule("1f1b", p, 16, 1)
        prog = PipelineRankProgram(model, tr, sched, 1, compress_blocks=True)
        assert [len(real) for real, _ in prog.block_plans.values()] == [4]


@pytest.mark.parametrize("name,v", SCHEDULES)
def test_stood_in_blocks_with_dropout_and_lora_equal_full_replay(name: str, v: int) -> None:
    """The measured block (block 1, the first whose input is a block's output) under dropout
    and low-rank adapters, stages of 6 to 9 blocks: every rank's windows are the full
    replay's."""
    rng = random.Random(f"dropout-lora-{name}")
    sched = build_schedule(name, 2, 6, v)
    family = rng.choice(["gpt2", "llama"])
    S = sched.num_stages
    model = {"family": family, "num_layers": S * rng.randint(6, 9) + rng.randint(0, S - 1),
             "hidden_size": 32, "num_heads": 4, "vocab_size": 96, "max_sequence_length": 64}
    if family == "llama":
        model["num_kv_heads"] = 2
    training = {"micro_batch_size": 2, "sequence_length": 8, "gradient_accumulation_steps": 6,
                "precision": rng.choice(["fp32", "amp-bf16"]), "dropout": 0.1,
                "lora": {"rank": 2}}
    req = MemoryRequest.model_validate({"model": model, "training": training})
    model, tr = resolve_model(req.model), req.training
    for rank in range(sched.num_ranks):
        prog = PipelineRankProgram(model, tr, sched, rank, compress_blocks=True)
        assert all(plan[1] for plan in prog.block_plans.values()), prog.block_plans
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        short = prog.run_steps()
        assert (short.first, short.steady) == (full.first, full.steady), (name, rank)
        shortened = pp.rank_step(model, tr, sched, rank)
        assert (shortened.first, shortened.steady) == (full.first, full.steady), (name, rank)
