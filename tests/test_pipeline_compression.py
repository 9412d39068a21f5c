"""Pipeline ranks from shortened replays (planner.layouts.pipeline_periods, planner.layouts.pipeline_replays)
against the full replay.

The oracle is ``PipelineRankProgram(...).run_steps()``: every action of the rank's list replayed
op by op. The shortened replays (periodic runs of the list stood in for, the instants
extrapolated in the number of dropped periods) must give the same first-step and steady-state
peaks, field by field (total, every category, op, phase), for every rank, over random setups:
every schedule the replay runs, random ranks, virtual stages, micro-batch counts (around the
schedules' period boundaries: p, p + 1, 2p - 1, 2p, ...), layer counts, both families,
precisions and optimizers. Templates (symbolic micro-batch size and sequence length) compiled
from the shortened replays are held to the full replay at random sizes.
"""

from __future__ import annotations

import random

import pytest

from planner.layouts import pipeline_replays as pp
from planner.catalog.presets import resolve_model
from planner.layouts.pipeline_memory import PipelineRankProgram, rank_actions
from planner.layouts.pipeline_periods import shortened_lists
from planner.layouts.pipeline_schedules import ScheduleConstraintError, build_schedule
from planner.catalog.specs import MemoryRequest

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3),
             ("zb-h1", 1), ("zb-h1", 2), ("zb-v", 2), ("dualpipe-v", 2), ("zb-h2", 1)]


def _setup(rng: random.Random, name: str, v: int, bases=(1, 2, 3, 5)):
    p = rng.choice([2, 3, 4])
    base = p * rng.choice(bases)
    m = max(1, base + rng.choice([-1, 0, 1, 2, 5, 9]))
    try:
        sched = build_schedule(name, p, m, v)
    except ScheduleConstraintError:
        return None
    return (*_model(rng, sched.num_stages, m), sched)


def _model(rng: random.Random, S: int, m: int, per_stage: tuple[int, int] | None = None):
    """A small random model of S stages (1-2 blocks each, or ``per_stage`` = (least, most)
    blocks each, with a remainder) trained over m micro-batches."""
    family = rng.choice(["gpt2", "llama"])
    layers = rng.randint(S, 2 * S + 1) if per_stage is None else \
        S * rng.randint(*per_stage) + rng.randint(0, S - 1)
    model = {"family": family, "num_layers": layers, "hidden_size": 32,
             "num_heads": 4, "vocab_size": 96, "max_sequence_length": 64}
    if family == "llama":
        model["num_kv_heads"] = rng.choice([1, 2, 4])
    training = {"micro_batch_size": rng.choice([1, 2]), "sequence_length": rng.choice([8, 16]),
                "gradient_accumulation_steps": m,
                "precision": rng.choice(["fp32", "amp-bf16", "bf16"]),
                "optimizer": rng.choice(["adamw", "sgd", "adagrad"])}
    req = MemoryRequest.model_validate({"model": model, "training": training})
    return resolve_model(req.model), req.training


def _cases(seed: int, n: int, bases=(1, 2, 3, 5)):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, v = SCHEDULES[len(out) % len(SCHEDULES)]
        got = _setup(rng, name, v, bases)
        if got is not None:
            out.append((name, v, *got))
    return out


@pytest.mark.parametrize("case", range(36))
def test_every_rank_equals_full_replay(case: int) -> None:
    # three quarters around the period boundaries, a quarter with many micro-batches (6p-8p)
    name, v, model, tr, sched = (_cases(7, 27) + _cases(11, 9, bases=(6, 8)))[case]
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank, device="cuda").run_steps()
        short = pp.rank_step(model, tr, sched, rank, device="cuda")
        assert (short.first, short.steady) == (full.first, full.steady), (name, v, rank)
        assert short.stages == full.stages and short.rank == rank


def _replayed(sched, rank: int) -> int | None:
    """Actions in the shortened lists of a rank (None: the full list is replayed)."""
    groups, lists = shortened_lists(rank_actions(sched, rank))
    return sum(len(items) for items, _ in lists) if groups else None


@pytest.mark.parametrize("name,v", SCHEDULES)
def test_cost_does_not_grow_with_microbatches(name: str, v: int) -> None:
    """Every rank's shortened lists are as long at 32 periods' worth of micro-batches as at 16:
    the replays stand in for the added ones."""
    p = 4
    small, big = build_schedule(name, p, 16 * p, v), build_schedule(name, p, 64 * p, v)
    for rank in range(p):
        a, b = _replayed(small, rank), _replayed(big, rank)
        assert a is not None and a == b, (name, v, rank, a, b)
        assert b < len(big.orders[rank]) // 2


def test_one_rank_class_for_alike_ranks() -> None:
    """1F1B's middle ranks shorten to the same lists up to their stage: one set of replays."""
    req = MemoryRequest.model_validate({
        "model": {"family": "llama", "num_layers": 12, "hidden_size": 32, "num_heads": 4,
                  "num_kv_heads": 2, "vocab_size": 96, "max_sequence_length": 64},
        "training": {"micro_batch_size": 2, "sequence_length": 8,
                     "gradient_accumulation_steps": 48}})
    model, tr = resolve_model(req.model), req.training
    sched = build_schedule("1f1b", 12, 48, 1)
    pp._CLASSES.clear()
    for rank in range(sched.num_ranks):
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        short = pp.rank_step(model, tr, sched, rank)
        assert (short.first, short.steady) == (full.first, full.steady), rank
    assert len(pp._CLASSES) < sched.num_ranks - 2


@pytest.mark.parametrize("name,v", [("1f1b", 1), ("zb-v", 2), ("interleaved-1f1b", 2)])
def test_template_equals_full_replay(name: str, v: int) -> None:
    rng = random.Random(name)
    sched = build_schedule(name, 3, 12, v)
    model, tr = _model(rng, sched.num_stages, 12)
    for rank in range(sched.num_ranks):
        tpl = pp.compile_rank(model, tr, sched, rank, "cuda", (None, None))
        for B, T in [(2, 8), (3, 17), (rng.randint(2, 9), rng.randint(2, 40))]:
            t2 = tr.model_copy(update={"micro_batch_size": B, "sequence_length": T})
            full = PipelineRankProgram(model, t2, sched, rank).run_steps()
            assert tpl.evaluate(B, T) == [full.first, full.steady], (name, rank, B, T)


def test_long_lists_that_leave_a_direction_out_equal_full_replay() -> None:
    """Ranks of a deep interleaved pipeline whose shortened lists are long (rounds of 256
    actions at pp 32, v 4) and keep fewer directions than the plan groups (``worth``): the
    shortened replays equal the full replay."""
    from planner.layouts import pipeline_periods

    req = MemoryRequest.model_validate({
        "model": {"family": "llama", "num_layers": 128, "hidden_size": 32, "num_heads": 4,
                  "num_kv_heads": 2, "vocab_size": 96, "max_sequence_length": 64},
        "training": {"micro_batch_size": 2, "sequence_length": 8,
                     "gradient_accumulation_steps": 32 * 12, "precision": "amp-bf16"}})
    model, tr = resolve_model(req.model), req.training
    sched = build_schedule("interleaved-1f1b", 32, 32 * 12, 4)
    for rank in (3, 4):
        actions = rank_actions(sched, rank)
        groups, lists = shortened_lists(actions)
        was = pipeline_periods.LONG_LIST
        try:
            pipeline_periods.LONG_LIST = 10 ** 9
            every, _ = shortened_lists(actions)
        finally:
            pipeline_periods.LONG_LIST = was
        assert len(groups) < len(every) and len(lists[0][0]) >= pipeline_periods.LONG_LIST
        full = PipelineRankProgram(model, tr, sched, rank).run_steps()
        short = pp.rank_step(model, tr, sched, rank)
        assert (short.first, short.steady) == (full.first, full.steady), rank
