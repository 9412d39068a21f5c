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


class _Exact:
    """What a polynomial size answers as a Python number: a truth value or an equality only
    when it holds for every size of the domain, never a concrete int or float."""

    __slots__ = ()

    # ---- decisions: answered where the difference has one sign over the whole domain
    # (``_cmp``: its sign, >= 0 everywhere, <= 0 everywhere); what the domain leaves open goes
    # to the subclass's ``_open`` (Poly: Undecided; MPoly: the witness's answer, a guard).
    def __gt__(self, o):
        if not isinstance(o, (int, type(self))):
            return NotImplemented
        s, _, le = self._cmp(o)
        if s == 1:
            return True
        if le:
            return False
        return self._open(o, ">", lambda v: v > 0)

    def __ge__(self, o):
        if not isinstance(o, (int, type(self))):
            return NotImplemented
        s, ge, _ = self._cmp(o)
        if ge:
            return True
        if s == -1:
            return False
        return self._open(o, ">=", lambda v: v >= 0)

    def __lt__(self, o):
        return (-self).__gt__(-o) if isinstance(o, (int, type(self))) else NotImplemented

    def __le__(self, o):
        return (-self).__ge__(-o) if isinstance(o, (int, type(self))) else NotImplemented

    def __eq__(self, o):
        if not isinstance(o, (int, type(self))):
            return NotImplemented
        s, ge, le = self._cmp(o)
        if ge and le:
            return True
        if s is not None:
            return False
        return self._open(o, "==", lambda v: v == 0)

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


class Poly(_Exact):
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
    # (the terms are never changed in place: a result may share them with an operand)
    def __add__(self, o):
        if isinstance(o, Poly):
            d = dict(self.t)
            for k, c in o.t.items():
                d[k] = d.get(k, 0) + c
            return Poly.make(d)
        if isinstance(o, int):
            if not o:
                return self
            return self._plus_const(o)
        return NotImplemented
    __radd__ = __add__

    def _plus_const(self, o: int):
        """self + o for an int o != 0: only the constant term changes."""
        d = dict(self.t)
        c = d.get((0, 0), 0) + o
        if c:
            d[(0, 0)] = c
        else:
            del d[(0, 0)]
        if len(d) == 1 and (0, 0) in d:
            return c
        return Poly(d)

    def __neg__(self):
        return Poly({k: -c for k, c in self.t.items()})

    def __sub__(self, o):
        if isinstance(o, Poly):
            d = dict(self.t)
            for k, c in o.t.items():
                d[k] = d.get(k, 0) - c
            return Poly.make(d)
        if isinstance(o, int):
            if not o:
                return self
            return self._plus_const(-o)
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
            if o == 1:
                return self
            if not o:
                return 0
            return Poly({k: c * o for k, c in self.t.items()})  # no term vanishes
        return NotImplemented
    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, int) and o > 0 and all(c % o == 0 for c in self.t.values()):
            return Poly.make({k: c // o for k, c in self.t.items()})
        raise Undecided(f"({self}) // {o}")

    # ---- decisions (b, t >= 0: coefficients of one sign give that sign everywhere) ----------
    def sign(self) -> int | None:  # +1 (> 0 for all b, t >= 0), -1 (< 0), None: undecided
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

    def _open(self, o, op: str, holds) -> bool:
        raise Undecided(f"{self} {op} {o}")

    def __repr__(self) -> str:
        return " + ".join(f"{c}·B^{i}·T^{j}" for (i, j), c in sorted(self.t.items()))


def strictly_positive(x) -> bool:
    if isinstance(x, (Poly, MPoly)):
        return x.sign() == 1
    return x > 0


class Space:
    """The variables of a template over several sizes: ``v_i = low_i + s_i`` with ``s_i >= 0``
    (a size of 1 is its own domain and never a variable, so every ``low_i`` is 2). Polynomials
    (:class:`MPoly`) keep their coefficients over the sizes themselves (products of sizes stay
    one term: cheap arithmetic, compact evaluation) and decide comparisons over the shifted
    variables ``s_i``, where coefficients of one sign give that sign on the whole domain."""

    def __init__(self, names: tuple[str, ...], lows: tuple[int, ...],
                 witness: tuple[int, ...] | None = None) -> None:
        self.names, self.lows, self.n = names, lows, len(names)
        self.zero = (0,) * self.n  # the constant term's exponents
        # a compile compares and multiplies the same few differences and monomials over and
        # over: each difference is decided once, each product's exponents summed once (prod)
        self.decided, self._shift, self.prod = {}, {}, {}
        # products by the operands' identities, kept alive with it (a replay multiplies the
        # same size objects again and again)
        self.products: dict[tuple[int, int], tuple] = {}
        # A witness (a point of the domain: the model being compiled) answers what the domain
        # leaves open, each answer kept as a guard (a polynomial's sign) that a later point must
        # share for the template to hold there (the program then takes the same path).
        self.witness = witness
        self.guards: dict[frozenset, tuple[dict[tuple[int, ...], int], int]] = {}

    def guess(self, d: MPoly) -> int:
        """The sign of ``d`` at the witness, kept as a guard; Undecided without a witness."""
        if self.witness is None:
            raise Undecided(f"sign of {d}")
        v = 0
        for e, c in d.t.items():
            for x, p in zip(self.witness, e):
                c *= x ** p
            v += c
        sign = (v > 0) - (v < 0)
        self.guards[frozenset(d.t.items())] = (dict(d.t), sign)
        return sign

    def var(self, i: int) -> MPoly:
        return MPoly({tuple(int(k == i) for k in range(self.n)): 1}, self)

    def shifted_monomial(self, exps: tuple[int, ...]) -> list[tuple[tuple[int, ...], int]]:
        """``prod v_i^e_i`` over the shifted variables: ``prod (low_i + s_i)^e_i`` expanded."""
        hit = self._shift.get(exps)
        if hit is None:
            from math import comb

            out: dict[tuple[int, ...], int] = {(0,) * self.n: 1}
            for i, e in enumerate(exps):
                if not e:
                    continue
                nxt: dict[tuple[int, ...], int] = {}
                for k in range(e + 1):
                    c = comb(e, k) * self.lows[i] ** (e - k)
                    for m, v in out.items():
                        mm = m[:i] + (k,) + m[i + 1:]
                        nxt[mm] = nxt.get(mm, 0) + v * c
                out = nxt
            hit = self._shift[exps] = list(out.items())
        return hit

    def shifted(self, terms: dict[tuple[int, ...], int]) -> dict[tuple[int, ...], int]:
        out: dict[tuple[int, ...], int] = {}
        for e, c in terms.items():
            for m, v in self.shifted_monomial(e):
                out[m] = out.get(m, 0) + c * v
        return {m: c for m, c in out.items() if c}


class MPoly(_Exact):
    """An integer polynomial in the sizes of a :class:`Space` (``{exponents: coefficient}``):
    arithmetic gives an int when constant; comparisons answer as :class:`Poly`'s do."""

    __slots__ = ("sp", "t", "z")

    def __init__(self, terms: dict[tuple[int, ...], int], sp: Space) -> None:
        self.t, self.sp, self.z = terms, sp, None  # z: the comparison with 0, once made

    def _make(self, terms: dict[tuple[int, ...], int]) -> MPoly | int:
        return self._fin({k: c for k, c in terms.items() if c})

    def _fin(self, terms: dict[tuple[int, ...], int]) -> MPoly | int:
        """``terms`` (no zero coefficient) as a polynomial, or the int it is when constant."""
        if not terms:
            return 0
        if len(terms) == 1:
            for k, c in terms.items():
                if not any(k):
                    return c
        return MPoly(terms, self.sp)

    def _plus(self, o: MPoly, sign: int):  # self + sign * o, terms that cancel dropped
        d = dict(self.t)
        get, pop = d.get, d.pop
        for k, c in o.t.items():
            v = get(k, 0) + sign * c
            if v:
                d[k] = v
            else:
                pop(k, None)
        return self._fin(d)

    def _plus_int(self, o: int):
        if not o:
            return self  # polynomials are never changed in place
        d = dict(self.t)
        z = self.sp.zero
        v = d.get(z, 0) + o
        if v:
            d[z] = v
        else:
            del d[z]
        return self._fin(d)

    def __add__(self, o):
        if isinstance(o, MPoly):
            return self._plus(o, 1)
        if isinstance(o, int):
            return self._plus_int(o)
        return NotImplemented
    __radd__ = __add__

    def __neg__(self):
        return MPoly({k: -c for k, c in self.t.items()}, self.sp)

    def __sub__(self, o):
        if isinstance(o, MPoly):
            return self._plus(o, -1)
        if isinstance(o, int):
            return self._plus_int(-o)
        return NotImplemented

    def __rsub__(self, o):
        return (-self) + o if isinstance(o, int) else NotImplemented

    def __mul__(self, o):
        if isinstance(o, MPoly):
            products = self.sp.products
            hit = products.get((id(self), id(o)))
            if hit is not None:
                return hit[2]
            d: dict[tuple[int, ...], int] = {}
            prod = self.sp.prod
            for a, c in self.t.items():
                for b, e in o.t.items():
                    key = prod.get((a, b))
                    if key is None:
                        key = prod[a, b] = tuple(x + y for x, y in zip(a, b))
                    d[key] = d.get(key, 0) + c * e
            r = self._make(d)
            products[id(self), id(o)] = (self, o, r)
            return r
        if isinstance(o, int) and not isinstance(o, bool):  # no term vanishes but by 0
            if o == 1 or not o:
                return self if o else 0
            return MPoly({k: c * o for k, c in self.t.items()}, self.sp)
        return NotImplemented
    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, int) and o > 0 and all(c % o == 0 for c in self.t.values()):
            return self._make({k: c // o for k, c in self.t.items()})
        if isinstance(o, MPoly) and len(o.t) == 1:  # by one term: exact when it divides each
            (e, c), = o.t.items()
            if c > 0 and all(x % c == 0 and all(a >= b for a, b in zip(k, e))
                             for k, x in self.t.items()):
                return self._make({tuple(a - b for a, b in zip(k, e)): x // c
                                   for k, x in self.t.items()})
        raise Undecided(f"({self}) // {o}")

    def __rfloordiv__(self, o):
        raise Undecided(f"{o} // ({self})")
    __mod__ = __rmod__ = __truediv__ = __rtruediv__ = __rfloordiv__

    # ---- decisions over the shifted variables ----------------------------------------------
    def _cmp(self, o) -> tuple[int | None, bool, bool]:
        d = self - o
        if isinstance(d, int):
            return (d > 0) - (d < 0), d >= 0, d <= 0
        if d.z is not None:
            return d.z
        sp = self.sp
        key = frozenset(d.t.items())
        hit = sp.decided.get(key)
        if hit is None:
            s = sp.shifted(d.t)
            z = s.get(sp.zero, 0)
            ge = all(c >= 0 for c in s.values())
            le = all(c <= 0 for c in s.values())
            hit = sp.decided[key] = (1 if ge and z > 0 else -1 if le and z < 0 else None), ge, le
        d.z = hit
        return hit

    def _open(self, o, op: str, holds) -> bool:
        return holds(self.sp.guess(self - o))  # answered at the witness, kept as a guard

    def sign(self) -> int | None:
        return self._cmp(0)[0]

    def __repr__(self) -> str:
        names = self.sp.names
        return " + ".join(str(c) + "".join(f"·{names[i]}^{e}" for i, e in enumerate(k) if e)
                          for k, c in sorted(self.t.items()))
