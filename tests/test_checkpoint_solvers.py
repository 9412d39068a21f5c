"""Checkpoint placement solvers against brute force and closed forms."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.routes.checkpoint_solvers import (
    ChainBlock, chain_peak_bytes, min_peak_plan, recompute_time_s, revolve_forward_steps,
    revolve_table, solve_budget,
)
from planner.routes.checkpointing import named_plan


def brute_force(chain, budget, base, tail):
    """Least recompute time over all 2^n block sets within the budget (None: none fits)."""
    best = None
    for r in range(len(chain) + 1):
        for blocks in itertools.combinations(range(len(chain)), r):
            if chain_peak_bytes(chain, blocks, base_bytes=base, tail_bytes=tail) <= budget:
                cost = recompute_time_s(chain, blocks)
                best = cost if best is None else min(best, cost)
    return best


block = st.builds(
    lambda f, s, x, t, g: ChainBlock(forward_s=f / 4, saved_bytes=s, input_bytes=min(x, s + 64),
                                     transient_bytes=t, grad_bytes=g),
    st.integers(0, 40), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 2000),
    st.integers(0, 300))


@st.composite
def problems(draw):
    chain = draw(st.lists(block, min_size=1, max_size=10))
    base, tail = draw(st.integers(0, 1000)), draw(st.integers(0, 3000))
    lo = chain_peak_bytes(chain, min_peak_plan(chain), base_bytes=base, tail_bytes=tail)
    hi = chain_peak_bytes(chain, [], base_bytes=base, tail_bytes=tail)
    return chain, draw(st.integers(max(lo - 100, 1), hi + 100)), base, tail


@settings(max_examples=150, deadline=None)
@given(problems())
@pytest.mark.parametrize("kwargs", [{}, {"max_states": 0}, {"max_states": 0, "max_grid": 5}],
                         ids=["pareto", "grid", "coarse-grid"])
def test_budget_dp_equals_brute_force(kwargs, problem):
    chain, budget, base, tail = problem
    best = brute_force(chain, budget, base, tail)
    sol = solve_budget(chain, budget, base_bytes=base, tail_bytes=tail, **kwargs)
    assert sol.peak_bytes == chain_peak_bytes(chain, sol.blocks, base_bytes=base, tail_bytes=tail)
    if best is None:
        assert not sol.fits
        assert sol.peak_bytes > budget
        return
    assert sol.fits and sol.peak_bytes <= budget
    assert sol.recompute_s == pytest.approx(recompute_time_s(chain, sol.blocks))
    if sol.exact:
        assert sol.recompute_s == pytest.approx(best, abs=1e-9)
    else:  # certified interval around the optimum
        assert sol.lower_bound_s - 1e-9 <= best <= sol.recompute_s + 1e-9


def test_budget_dp_equals_brute_force_seeded():
    rng = random.Random(20240611)
    for _ in range(200):
        n = rng.randint(1, 10)
        chain = [ChainBlock(forward_s=rng.uniform(0, 3), saved_bytes=(s := rng.randint(0, 10**9)),
                            input_bytes=rng.randint(0, s), transient_bytes=rng.randint(0, 10**8))
                 for _ in range(n)]
        lo = chain_peak_bytes(chain, min_peak_plan(chain))
        hi = chain_peak_bytes(chain, [])
        budget = rng.randint(lo, hi)
        sol = solve_budget(chain, budget)
        assert sol.exact and sol.fits
        assert sol.recompute_s == pytest.approx(brute_force(chain, budget, 0, 0), abs=1e-12)


def test_min_peak_plan_is_the_lowest_peak():
    rng = random.Random(7)
    for _ in range(50):
        chain = [ChainBlock(forward_s=1, saved_bytes=rng.randint(0, 100),
                            input_bytes=rng.randint(0, 100), transient_bytes=rng.randint(0, 50))
                 for _ in range(rng.randint(1, 8))]
        lowest = min(chain_peak_bytes(chain, c, tail_bytes=30) for r in range(len(chain) + 1)
                     for c in itertools.combinations(range(len(chain)), r))
        assert chain_peak_bytes(chain, min_peak_plan(chain), tail_bytes=30) == lowest


def test_chain_peak_by_hand():
    blk = ChainBlock(forward_s=1, saved_bytes=100, input_bytes=10, transient_bytes=5)
    chain = [blk] * 3
    # nothing checkpointed: all stored + tail = 300 + 50; backward of block 2: 200 + 100 + 5
    assert chain_peak_bytes(chain, [], base_bytes=7, tail_bytes=50) == 7 + 350
    # all checkpointed: stored 30 + tail 50 = 80; backward of block 2: 20 + 100 + 5 = 125
    assert chain_peak_bytes(chain, [0, 1, 2], base_bytes=7, tail_bytes=50) == 7 + 125
    # one segment of blocks 0..2: stores 10; backward of block 2 holds all three: 300 + 5
    assert chain_peak_bytes(chain, [(0, 2)]) == 305
    # gradients created in backward: block 2's backward holds its own, block 0's all three
    graded = [blk.model_copy(update={"grad_bytes": 40})] * 3
    assert chain_peak_bytes(graded, [0, 1, 2]) == max(20 + 105 + 40, 10 + 105 + 80, 105 + 120)


def test_infeasible_budget_reports_smallest_peak():
    chain = [ChainBlock(forward_s=1, saved_bytes=100, input_bytes=10, transient_bytes=5)] * 4
    sol = solve_budget(chain, 50)
    assert not sol.fits
    assert sol.peak_bytes == chain_peak_bytes(chain, range(4)) == 30 + 105


def test_homogeneous_budget_is_exact_on_long_chains():
    chain = [ChainBlock(forward_s=2.0, saved_bytes=34 << 20, input_bytes=2 << 20,
                        transient_bytes=8 << 20)] * 1000
    budget = chain_peak_bytes(chain, range(0, 1000, 2))
    sol = solve_budget(chain, budget)
    assert sol.exact and sol.fits and len(sol.blocks) == 500


@pytest.mark.parametrize("l,c,expected", [(10, 2, 20), (10, 3, 15), (16, 2, 45)])
def test_revolve_public_checks(l, c, expected):
    assert revolve_forward_steps(l, c) == expected


def test_revolve_closed_form_matches_dynamic_program():
    table = revolve_table(100, 10)
    for l in range(1, 101):
        for c in range(1, 11):
            assert revolve_forward_steps(l, c) == table[l][c], (l, c)


def test_revolve_closed_form_definition():
    for l, c in [(1, 1), (100_000, 1), (100_000, 10_000), (99_999, 3)]:
        r = next(r for r in itertools.count() if math.comb(c + r, c) >= l)
        assert revolve_forward_steps(l, c) == r * l - math.comb(c + r, c + 1)


def test_named_plans_match_reference_step():
    torch = pytest.importorskip("torch")  # noqa: F841
    from planner.catalog.specs import ActivationCheckpointing, TrainingSpec
    from service.validation.step import checkpointed_blocks
    for n in range(1, 40):
        for strategy, k in [("none", None), ("full", None), ("sqrt", None), ("every-k", 1),
                            ("every-k", 3), ("every-k", 7)]:
            training = TrainingSpec(activation_checkpointing=ActivationCheckpointing(
                strategy=strategy, every_k=k))
            assert set(named_plan(strategy, n, k)) == checkpointed_blocks(training, n)
