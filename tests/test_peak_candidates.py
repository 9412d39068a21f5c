"""The peak candidates' pruning (planner/machine/peak_candidates.py) is sound: whatever rows the
vectorised screen and the exact passes leave, the first row reaching the largest value at any
point of the domain (variables >= 0) is among them. Random rows over two variables (a step
template's b, t) and over eight (a structure's sizes), with ties, repeated rows, rows below a
mix of two others and near-ties at float precision; the first maximum found by brute force in
exact integers at random points, corners and the probe points themselves."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.machine import peak_candidates as pc


def _exps(rng: random.Random, nvars: int, n: int) -> list[tuple[int, ...]]:
    out = {(0,) * nvars}
    while len(out) < n:
        e = [0] * nvars
        for _ in range(rng.randint(1, 3)):
            e[rng.randrange(nvars)] += 1
        out.add(tuple(e))
    return sorted(out)


def _rows(rng: random.Random, n: int, m: int) -> np.ndarray:
    rows: list[list[int]] = []
    for _ in range(n):
        kind = rng.random()
        if rows and kind < 0.2:  # a repeat of an earlier row
            rows.append(list(rng.choice(rows)))
        elif len(rows) >= 2 and kind < 0.35:  # at most a mix of two rows, or just above it
            a, b = rng.sample(rows, 2)
            rows.append([(x + y) // 2 + rng.choice([0, 0, 1, -1]) for x, y in zip(a, b)])
        elif rows and kind < 0.5:  # a near-tie of a large row
            base = rng.choice(rows)
            rows.append([x + rng.choice([-1, 0, 1]) * (rng.random() < 0.2) for x in base])
        else:
            scale = rng.choice([10, 10**6, 10**12])
            rows.append([rng.choice([0, 0, rng.randint(0, scale)]) for _ in range(m)])
    return np.array(rows, dtype=np.int64)


def _kept(k: np.ndarray, exps) -> list[int]:
    idx = pc._screen(k, exps)
    vecs = [tuple(int(x) for x in k[i]) for i in idx]
    sub = pc._prune(vecs)
    return [int(idx[sub[s]]) for s in pc._hull_prune([vecs[s] for s in sub])]


def _first_max(k: np.ndarray, exps, point) -> int:
    mono = [1] * len(exps)
    for j, e in enumerate(exps):
        for v, p in zip(point, e):
            mono[j] *= v ** p
    vals = [sum(int(c) * m for c, m in zip(row, mono)) for row in k]
    return vals.index(max(vals))


@pytest.mark.parametrize("nvars", [2, 8])
@pytest.mark.parametrize("seed", range(8))
def test_the_first_maximum_is_always_kept(nvars: int, seed: int) -> None:
    rng = random.Random(seed * 10 + nvars)
    exps = _exps(rng, nvars, 6 if nvars == 2 else 24)
    k = _rows(rng, rng.choice([12, 60, 400]), len(exps))
    kept = set(_kept(k, exps))
    scales = [0, 1, 3, 15, 63, 255, 1023, 4095, 1 << 20]
    points = [tuple(rng.choice(scales) for _ in range(nvars)) for _ in range(150)]
    points += [tuple(rng.randint(0, 5000) for _ in range(nvars)) for _ in range(150)]
    points += [(0,) * nvars, (1,) * nvars]
    for p in points:
        assert _first_max(k, exps, p) in kept, p


def test_the_screen_leaves_few_of_many_rows() -> None:
    """Its purpose: of hundreds of rows, the exact passes see a handful (here under 60)."""
    rng = random.Random(3)
    exps = _exps(rng, 8, 24)
    k = np.cumsum(_rows(rng, 800, len(exps)) % 1000, axis=0)  # live bytes that mostly grow
    assert len(pc._screen(k, exps)) < 60
