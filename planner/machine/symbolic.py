"""Integer polynomials in two non-negative variables that refuse to decide what is not decided.

The step template (planner/step/template.py) replays the reference step with the micro-batch size
and the sequence length as ``B = 2 + b`` and ``T = 2 + t`` (b, t >= 0). Every size the program
computes is then a :class:`Poly`; arithmetic is exact, and every comparison the program makes
answers only when it holds for *every* b, t >= 0: a polynomial whose coefficients all have one
sign has that sign everywhere. Anything else raises :class:`Undecided`, and the caller replays
concretely instead.
"""

from __future__ import annotations


class Undecided(Exception):
    """A decision on sizes that depends on the values of B and T: simulate concretely."""


class Poly:
    """An integer polynomial in two variables b, t >= 0: ``{(i, j): c}`` for ``c·b^i·t^j``, where
    the sizes are B = B0 + b and T = T0 + t over a domain's lower bounds. Arithmetic returns a
    plain int when the result is constant."""

    __slots__ = ("t",)

    def __init__(self, terms: dict[tuple[int, int], int]) -> None:
        self.t = terms

    @staticmethod
    def make(terms: dict[tuple[int, int], int]) -> Poly | int:
        terms = {k: c for k, c in terms.items() if c}
        if not terms:
            return 0
        if len(terms) == 1 and (0, 0) in terms:
            return terms[(0, 0)]
        return Poly(terms)

    # ---- arithmetic -----------------------------------------------------------------------
    def __add__(self, o):
        if isinstance(o, Poly):
            d = dict(self.t)
            for k, c in o.t.items():
                d[k] = d.get(k, 0) + c
            return Poly.make(d)
        if isinstance(o, int):
            d = dict(self.t)
            d[(0, 0)] = d.get((0, 0), 0) + o
            return Poly.make(d)
        return NotImplemented

    __radd__ = __add__

    def __neg__(self):
        return Poly({k: -c for k, c in self.t.items()})

    def __sub__(self, o):
        if isinstance(o, (Poly, int)):
            return self + (-o)
        return NotImplemented

    def __rsub__(self, o):
        if isinstance(o, int):
            return (-self) + o
        return NotImplemented

    def __mul__(self, o):
        if isinstance(o, Poly):
            d: dict[tuple[int, int], int] = {}
            for (i, j), c in self.t.items():
                for (k, l), e in o.t.items():
                    key = (i + k, j + l)
                    d[key] = d.get(key, 0) + c * e
            return Poly.make(d)
        if isinstance(o, int) and not isinstance(o, bool):
            return Poly.make({k: c * o for k, c in self.t.items()})
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, int) and o > 0 and all(c % o == 0 for c in self.t.values()):
            return Poly.make({k: c // o for k, c in self.t.items()})
        raise Undecided(f"({self}) // {o}")

    # ---- decisions (b, t >= 0: coefficients of one sign give that sign everywhere) ----------
    def sign(self) -> int | None:
        """+1 (> 0 for all b, t >= 0), -1 (< 0), or None (undecided; zero is never a Poly)."""
        s = self.t
        if all(c >= 0 for c in s.values()) and s.get((0, 0), 0) > 0:
            return 1
        if all(c <= 0 for c in s.values()) and s.get((0, 0), 0) < 0:
            return -1
        return None

    def nonneg(self) -> bool:
        return all(c >= 0 for c in self.t.values())

    def _cmp(self, o) -> tuple[int | None, bool, bool]:
        d = self - o
        if isinstance(d, int):
            return (d > 0) - (d < 0), d >= 0, d <= 0
        return d.sign(), d.nonneg(), (-d).nonneg()

    def __gt__(self, o):
        s, _, le = self._cmp(o)
        if s == 1:
            return True
        if le:
            return False
        raise Undecided(f"{self} > {o}")

    def __ge__(self, o):
        s, ge, _ = self._cmp(o)
        if ge:
            return True
        if s == -1:
            return False
        raise Undecided(f"{self} >= {o}")

    def __lt__(self, o):
        return (-self).__gt__(-o) if isinstance(o, (int, Poly)) else NotImplemented

    def __le__(self, o):
        return (-self).__ge__(-o) if isinstance(o, (int, Poly)) else NotImplemented

    def __eq__(self, o):
        if not isinstance(o, (int, Poly)):
            return NotImplemented
        s, ge, le = self._cmp(o)
        if ge and le:
            return True
        if s is not None:
            return False
        raise Undecided(f"{self} == {o}")

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    def __bool__(self):
        return self != 0

    def __hash__(self):
        return hash(frozenset(self.t.items()))

    def __int__(self):
        raise Undecided(f"int({self})")

    __index__ = __int__

    def __float__(self):
        raise Undecided(f"float({self})")

    def __repr__(self) -> str:
        return " + ".join(f"{c}·B^{i}·T^{j}" for (i, j), c in sorted(self.t.items()))


def strictly_positive(x) -> bool:
    if isinstance(x, Poly):
        return x.sign() == 1
    return x > 0
