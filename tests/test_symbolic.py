"""Polynomial sizes (planner/machine/symbolic.py: MPoly over a Space) against plain integers.

Arithmetic must equal the integers' at every point of the domain, cancel to a plain int when the
result is constant, and leave its operands unchanged; each comparison the domain decides must be
what holds at every point (checked on a grid of the domain), answered the same the first time
and from the space's memo of decided differences."""

from __future__ import annotations

import itertools
import random

import pytest

from planner.machine.symbolic import MPoly, Space, Undecided
from tests.test_pipeline_compose_compile import _value

LOWS = (2, 2, 3)


def _space() -> Space:
    return Space(("b", "t", "h"), LOWS)


def _random_poly(rng: random.Random, sp: Space):
    terms = {}
    for _ in range(rng.randint(0, 4)):
        exps = tuple(rng.randint(0, 2) for _ in range(sp.n))
        terms[exps] = rng.randint(-5, 5)
    got = MPoly({}, sp)._make(terms)
    return got


POINTS = [tuple(lo + d for lo, d in zip(LOWS, ds))
          for ds in itertools.product((0, 1, 3, 7), repeat=len(LOWS))]


@pytest.mark.parametrize("seed", range(20))
def test_arithmetic_equals_the_integers_at_every_point(seed):
    rng = random.Random(seed)
    sp = _space()
    for _ in range(60):
        a, b = _random_poly(rng, sp), _random_poly(rng, sp)
        k = rng.randint(-6, 6)
        before = [dict(x.t) for x in (a, b) if isinstance(x, MPoly)]
        results = {"a+b": (a + b, lambda x, y: x + y), "a-b": (a - b, lambda x, y: x - y),
                   "a*b": (a * b, lambda x, y: x * y), "a+k": (a + k, lambda x, y: x + k),
                   "k-a": (k - a, lambda x, y: k - x), "a-k": (a - k, lambda x, y: x - k),
                   "-a": (-a, lambda x, y: -x), "a-a": (a - a, lambda x, y: 0)}
        for name, (got, want) in results.items():
            if isinstance(got, MPoly):
                assert got.t and all(got.t.values()), (name, got.t)  # no zero coefficient
                assert any(any(e) for e in got.t), name  # a constant is an int
            for p in POINTS:
                assert _value(got, p) == want(_value(a, p), _value(b, p)), (name, p)
        assert [dict(x.t) for x in (a, b) if isinstance(x, MPoly)] == before


@pytest.mark.parametrize("seed", range(10))
def test_decided_comparisons_hold_everywhere_and_are_memoised_alike(seed):
    rng = random.Random(100 + seed)
    sp = _space()
    for _ in range(80):
        a, b = _random_poly(rng, sp), _random_poly(rng, sp)
        if not isinstance(a, MPoly):
            continue
        diffs = [_value(a, p) - _value(b, p) for p in POINTS]
        answers = []
        for _ in range(2):  # decided afresh, then from the memo
            got = []
            for op, holds in ((">", lambda d: d > 0), (">=", lambda d: d >= 0),
                              ("<", lambda d: d < 0), ("<=", lambda d: d <= 0)):
                try:
                    r = {">": a.__gt__, ">=": a.__ge__, "<": a.__lt__, "<=": a.__le__}[op](b)
                except Undecided:
                    got.append(None)
                    continue
                if r is NotImplemented:
                    got.append(None)
                    continue
                got.append(r)
                # True: it holds at every point; False: its negation does
                assert all(holds(d) == r for d in diffs), (op, a, b)
            answers.append(got)
        assert answers[0] == answers[1]
