"""A known pipelined setup's worst-rank function (planner/layouts/pipeline_fused.py) equals
``fused_best``'s every-rank evaluation read as ``pipelined_estimate`` reads it: the worst rank
(highest steady total, the lowest rank among equals), its two snapshots, and the per-rank note;
over random windows (ties, all-zero snapshots, empty windows) and random sizes."""

from __future__ import annotations

import random

import pytest

from planner.layouts.pipeline_fused import worst_rank_fn
from planner.machine.peak_candidates import Candidates, fused_best
from planner.machine.stepsim import CATEGORIES

EXPS = ((0, 0), (0, 1), (1, 0), (1, 1), (2, 1))


def _window(rng: random.Random, tie_pool: list) -> Candidates:
    n = rng.choice([0, 1, 1, 2, 3, 5])
    key = []
    for _ in range(n):
        if tie_pool and rng.random() < 0.3:
            key.append(rng.choice(tie_pool))  # the same row as another window's: ties
        else:
            v = tuple(rng.choice([0, 0, rng.randint(-50, 50), rng.randint(0, 10**9)])
                      for _ in EXPS)
            tie_pool.append(v)
            key.append(v)
    cats = [[tuple(rng.randint(-5, 10**6) for _ in EXPS) for _ in CATEGORIES] for _ in key]
    return Candidates(EXPS, key, cats, [f"op{k}" for k in range(n)],
                      [rng.choice(["forward", "backward", "optimizer"]) for _ in key],
                      zero=rng.random() < 0.4)


def _want(groups, heads, b, t):
    snaps = fused_best(groups)(b, t)
    w = max(range(len(snaps)), key=lambda r: (snaps[r][1].total, -r))
    note = "; ".join(f"{h}{s[1].total} B at {s[1].phase} {s[1].op}" for h, s in zip(heads, snaps))
    return w, note, snaps[w][0], snaps[w][1]


@pytest.mark.parametrize("seed", range(12))
def test_worst_rank_equals_every_rank_evaluated(seed: int) -> None:
    rng = random.Random(seed)
    ranks = rng.choice([1, 2, 3, 4, 8])
    pool: list = []
    groups = [[_window(rng, pool), _window(rng, pool)] for _ in range(ranks)]
    heads = [f"rank {r} (stages {r}): " for r in range(ranks)]
    f = worst_rank_fn(groups, heads)
    for _ in range(200):
        b, t = rng.choice([0, 1, rng.randint(0, 64)]), rng.choice([0, 1, rng.randint(0, 1 << 16)])
        assert f(b, t) == _want(groups, heads, b, t)


def test_windows_over_the_sizes_themselves_are_left_to_fused_best() -> None:
    rng = random.Random(0)
    w = _window(rng, [])
    named = Candidates(((0, 0),), [(1,)], [[(1,)] * len(CATEGORIES)], ["op"], ["forward"],
                       names=("B",))
    assert worst_rank_fn([[w, named]], ["r0"]) is None
    assert worst_rank_fn([[w]], ["r0"]) is None
