"""What a composed action draws on the recording machine (planner/layouts/pipeline_machines.py):
``undominated`` equals its plain statement (a loop over the totals), and ``_shifted_matrix``'s
int64 product equals the exact product of Python integers, on random polynomials with small and
very large coefficients."""

from __future__ import annotations

import random

import numpy as np
import pytest

from planner.layouts import pipeline_machines as pmach
from planner.machine.symbolic import Space


def _plain_undominated(a: np.ndarray) -> list[int]:
    out = []
    for i in range(len(a)):
        ge = [all(x >= y for x, y in zip(a[j], a[i])) for j in range(len(a))]
        if any(ge[j] for j in range(i)):
            continue
        if any(ge[j] and a[j][0] > a[i][0] for j in range(i + 1, len(a))):
            continue
        out.append(i)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_undominated_equals_its_plain_statement(seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        n, c = rng.choice([2, 3, 9, 40, 150]), rng.choice([1, 3, 12])
        a = np.array([[rng.choice([0, 1, 2, rng.randint(0, 6)]) for _ in range(c)]
                      for _ in range(n)], dtype=np.int64)
        monkeypatch.setattr(pmach, "_shifted_matrix", lambda totals, a=a: a)
        assert pmach.undominated(list(range(n))) == _plain_undominated(a)


def _poly(sp: Space, rng: random.Random, big: bool):
    vs = [sp.var(i) for i in range(sp.n)]
    p = rng.randint(0, 10**20 if big else 10**6)
    for _ in range(rng.randint(1, 5)):
        term = rng.randint(1, 10**15 if big else 1000)
        for _ in range(rng.randint(1, 3)):
            term = term * rng.choice(vs)
        p = p + term
    return p


@pytest.mark.parametrize("big", [False, True])
def test_shifted_matrix_is_exact(big: bool) -> None:
    rng = random.Random(int(big))
    sp = Space(("B", "T", "h", "V"), (2, 2, 2, 2))
    totals = [_poly(sp, rng, big) for _ in range(30)] + [7]
    got = pmach._shifted_matrix(totals)
    # the same product in Python integers
    cols = {sp.zero: 0}
    for t in totals:
        for k in getattr(t, "t", {}):
            cols.setdefault(k, len(cols))
    want_rows = []
    for t in totals:
        row: dict = {}
        terms = t.t.items() if not isinstance(t, int) else [(sp.zero, t)]
        for k, c in terms:
            for sk, sc in sp.shifted_monomial(k):
                row[sk] = row.get(sk, 0) + c * sc
        want_rows.append(row)
    assert got.shape[0] == len(totals)
    assert got.dtype == (object if big else np.int64)  # past int64: Python integers
    for r, row in enumerate(want_rows):
        nonzero = {j: int(v) for j, v in enumerate(got[r]) if v}
        assert sorted(nonzero.values()) == sorted(v for v in row.values() if v)
        assert int(got[r][0]) == row.get(sp.zero, 0)


def test_totals_given_as_parts_are_summed() -> None:
    """A mark's live bytes per category (a tuple of parts) give the matrix of their sum."""
    rng = random.Random(5)
    sp = Space(("B", "T", "h"), (2, 2, 2))
    rows = [tuple(rng.choice([0, 3, _poly(sp, rng, False)]) for _ in range(5))
            for _ in range(25)]
    parts = pmach._shifted_matrix(rows)
    sums = pmach._shifted_matrix([sum(r[1:], r[0]) for r in rows])
    assert parts.shape == sums.shape and (parts == sums).all()
    assert pmach.undominated(rows) == pmach.undominated([sum(r[1:], r[0]) for r in rows])
