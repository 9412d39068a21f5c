"""The peak rows' pruning (planner/machine/peak_pruning.py) is sound: whatever rows the
vectorised screen and the exact passes leave, the first row reaching the largest value at any
point of the domain (variables >= 0) is among them. Random rows over two variables (a step
template's b, t) and over eight (a structure's sizes), with ties, repeated rows, rows below a
mix of two others and near-ties at float precision; the first maximum found by brute force in
exact integers at random points, corners and the probe points themselves. And its parts: the
vectorised single-row rule against its row-by-row statement, the rows kept for sure against
exact arithmetic, the selections kept by content."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.machine import peak_pruning as pp


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
    pp.clear()
    return list(pp.select(k, exps))


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
    assert len(pp._screen(k, exps)) < 60


def _prune_plain(vecs: list[tuple[int, ...]]) -> list[int]:
    """The single-row rule row by row against the rows kept so far (the statement
    ``peak_pruning._prune`` vectorises over every pair)."""
    kept: list[int] = []
    for i, vi in enumerate(vecs):
        dominated = False
        survivors = []
        for j in kept:
            vj = vecs[j]
            if not dominated and all(a >= b for a, b in zip(vj, vi)):
                dominated = True  # j is earlier: ties go to it
            if not dominated and all(a >= b for a, b in zip(vi, vj)) and vi[0] > vj[0]:
                continue  # i is later and strictly above j everywhere: j goes
            survivors.append(j)
        if dominated:
            continue
        kept = survivors + [i]
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_the_vectorised_single_row_rule_keeps_what_the_row_by_row_one_keeps(seed: int) -> None:
    rng = random.Random(seed)
    k = _rows(rng, rng.choice([5, 40, 300]), rng.choice([3, 24]))
    assert list(pp._prune(k)) == _prune_plain([tuple(int(x) for x in r) for r in k])


@pytest.mark.parametrize("nvars", [2, 8])
@pytest.mark.parametrize("seed", range(6))
def test_a_row_kept_for_sure_is_the_only_maximum_at_a_probe_point(nvars: int, seed: int) -> None:
    """``_only_maxima`` decides in floating point; each row it names is, in exact integers, the
    only row reaching the largest value at one of the probe points (so the first maximum
    there: no sound rule can drop it). Near-ties at float precision included."""
    rng = random.Random(100 + seed * 10 + nvars)
    exps = _exps(rng, nvars, 6 if nvars == 2 else 24)
    k = _rows(rng, rng.choice([12, 60, 200]), len(exps))
    sure = pp._only_maxima(k.astype(float), tuple(exps))
    assert sure.any()
    assert set(np.nonzero(sure)[0]) <= _only_maximum_somewhere(k, exps)


def test_rows_apart_by_less_than_float_precision_are_not_kept_for_sure_wrongly() -> None:
    """Rows near 2^60 a few units apart, with small terms: their float sums round in both
    directions, so a float order can reverse the exact one (a bound without its margin for
    rounding fails this)."""
    exps = [(0, 0), (0, 1), (1, 0)]
    for seed in range(200):
        rng = random.Random(seed)
        k = np.array([[(1 << 60) + 128 * rng.randint(0, 8) + rng.randint(-3, 3),
                       rng.randint(0, 130), rng.randint(0, 130)]
                      for _ in range(rng.choice([3, 6, 12]))], dtype=np.int64)
        sure = pp._only_maxima(k.astype(float), tuple(exps))
        assert set(np.nonzero(sure)[0]) <= _only_maximum_somewhere(k, exps), seed


def _only_maximum_somewhere(k: np.ndarray, exps) -> set[int]:
    """The rows that are, in exact integers, the only row reaching the largest value at one
    of the screen's probe points."""
    only = set()
    for p in pp._probe_points(len(exps[0])).T.astype(np.int64):
        mono = [1] * len(exps)
        for j, e in enumerate(exps):
            for v, q in zip(p, e):
                mono[j] *= int(v) ** q
        vals = [sum(int(c) * m for c, m in zip(row, mono)) for row in k]
        top = max(vals)
        if vals.count(top) == 1:
            only.add(vals.index(top))
    return only


def test_selections_are_kept_by_the_rows_contents() -> None:
    """The same rows again are answered from the kept selection; other rows (one row changed)
    are selected afresh, never given another content's selection."""
    rng = random.Random(7)
    exps = _exps(rng, 8, 24)
    k = _rows(rng, 200, len(exps))
    pp.clear()
    first = pp.select(k, exps)
    calls = []
    real = pp._screen
    pp._screen = lambda *a: calls.append(1) or real(*a)
    try:
        assert pp.select(k.copy(), exps) == first and not calls
        other = k.copy()
        other[first[0]] = k.max(0) + 1  # the first kept row now above every other everywhere
        assert len(first) > 1 and pp.select(other, exps) == (first[0],) and calls
    finally:
        pp._screen = real
    pp.clear()
