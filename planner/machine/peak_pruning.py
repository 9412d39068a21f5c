"""Which recorded rows of a window can be its peak: the pruning behind ``peak_candidates``.

A row is a vector of polynomial coefficients (constant first) over monomials of variables
>= 0 (``b^i·t^j``, or a structure's shifted sizes). The peak at a point is the *first* row
reaching the largest value (the simulator keeps the first allocation that reaches a new high).
Rules that rule a row out everywhere, each sound on its own (whether or not the rows it names
are ruled out too):

- an earlier row is >= it in every coefficient, or a later one is >= everywhere and > in the
  constant (so > it everywhere: the monomials are >= 0, the constant one is 1);
- a mix λ·j + μ·k of two rows (λ, μ >= 0, λ + μ <= 1) is >= it in every coefficient and > in
  the constant, or (0 < λ = 1 - μ < 1) >= everywhere with one of j, k earlier: wherever i reaches
  the maximum, both tie with it (values are live bytes, >= 0).

And one rule that keeps a row: a row that is the only maximum at some point (beyond floating
point error) is the first maximum there, so no sound rule can drop it.

``select`` applies them: ``_screen`` vectorised against anchors (rows that are the first
maximum at some probe point), deciding in floating point only where the margin exceeds the
rounding error; what it leaves goes through the exact integer passes ``_prune`` (every pair of
rows, vectorised) and ``_hull_prune`` (mixes of two). A compile meets the same window more than
once (a variant of the step shares its forward and backward), so selections are kept by the
rows' contents.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from fractions import Fraction

import numpy as np

_PROBE_B = (0, 1, 3, 15, 63, 255, 1023, 4095)
_PROBE_T = (0, 1, 15, 127, 1023, 8191, 65535, 1 << 20)
_SELECTED_MAX = 256
_SELECTED: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
_LOCK = threading.Lock()


def select(k: np.ndarray, exps) -> tuple[int, ...]:
    """Indices (event order) of the rows of ``k`` (rows × coefficients over ``exps``, int64)
    that no rule rules out: every row that is the first maximum somewhere is among them."""
    exps = tuple(tuple(e) for e in exps)
    key = (k.shape, k.tobytes(), exps)
    with _LOCK:
        got = _SELECTED.get(key)
        if got is not None:
            _SELECTED.move_to_end(key)
            return got
    idx = _screen(k, exps)
    sub = idx[_prune(k[idx])]
    got = tuple(int(sub[s]) for s in _hull_prune(list(map(tuple, k[sub].tolist())), exps))
    with _LOCK:
        _SELECTED[key] = got
        if len(_SELECTED) > _SELECTED_MAX:
            _SELECTED.popitem(last=False)
    return got


def clear() -> None:
    with _LOCK:
        _SELECTED.clear()


def _prune(k: np.ndarray) -> np.ndarray:
    """Indices of the rows (of ``k``, event order, int64) no single other row rules out
    (exact: comparisons of integers)."""
    n = len(k)
    if n <= 1:
        return np.arange(n)
    idx = np.arange(n)
    out = np.zeros(n, dtype=bool)
    step = max(1, (1 << 21) // max(1, n * k.shape[1]))  # rows of j per block: ~2M comparisons
    for s in range(0, n, step):
        kj = k[s:s + step]
        ge = (kj[:, None, :] >= k[None, :, :]).all(-1)  # ge[j, i]: row j >= row i everywhere
        earlier = idx[s:s + step, None] < idx[None, :]
        strict = kj[:, None, 0] > k[None, :, 0]
        out |= (ge & (earlier | strict)).any(0)
    return np.nonzero(~out)[0]


def _between(vi, vj, vk, lam: Fraction) -> tuple[bool, bool]:
    """(λ·vj + (1-λ)·vk >= vi in every coefficient, and > in the constant one)."""
    p, q = lam.numerator, lam.denominator
    ge = all(p * j + (q - p) * k >= q * i for i, j, k in zip(vi, vj, vk))
    return ge, p * vj[0] + (q - p) * vk[0] > q * vi[0]


def _only_maxima(a: np.ndarray, exps) -> np.ndarray:
    """Rows (of ``a``, floats of the integer rows) that are the only maximum at one of the
    screen's probe points beyond any rounding error: the monomials are within a relative 2^-46
    of their values, each row's float sum within d·2^-52 of its own (d < 2^12 coefficients),
    so a bound of 2^-38 of the sum of absolute terms holds every value."""
    mono = _probe_monomials(exps)
    vals = mono @ a.T  # probes × rows
    err = (mono @ np.abs(a).T) * 2.0 ** -38 + 1.0
    lo, hi = vals - err, vals + err
    top = np.argmax(lo, axis=1)
    p = np.arange(len(top))
    others = hi.copy()
    others[p, top] = -np.inf
    sure = lo[p, top] > others.max(1)
    mask = np.zeros(len(a), dtype=bool)
    mask[top[sure]] = True
    return mask


def _mixed_below(vecs, a: np.ndarray, i: int, pair: np.ndarray, low: np.ndarray) -> bool:
    """Whether a mix of two rows (j, k) of ``pair`` rules row i out (screened in floating
    point, verified in exact integers); ``low``: each coefficient's least value over the rows."""
    jj, kk = np.nonzero(pair)
    if not len(jj):
        return False
    # λ·(j - k) >= i - k in each coefficient where one of j, k is below i (the pairs cover i:
    # where neither is, any λ in [0, 1] holds; so j = k never bounds λ)
    cols = np.nonzero(a[i] > low)[0]
    ak = a[kk][:, cols]
    d = a[jj][:, cols] - ak  # j - k
    r = a[i, cols][None, :] - ak  # i - k
    with np.errstate(divide="ignore", invalid="ignore"):
        q = r / d
    lo = np.where(d > 0, q, 0.0).max(-1, initial=0.0)
    hi = np.where(d < 0, q, 1.0).min(-1, initial=1.0)
    ok = lo <= hi + 1e-9
    vi = vecs[i]
    for j, k in zip(jj[ok].tolist(), kk[ok].tolist()):
        vj, vk = vecs[j], vecs[k]
        # λ's exact bounds as fractions (numerator, denominator > 0): lo from the coefficients
        # where j > k, hi from those where j < k
        ln, ld, hn, hd = 0, 1, 1, 1
        for x, y, z in zip(vi, vj, vk):
            dd, rr = y - z, x - z
            if dd > 0:
                if rr * ld > ln * dd:
                    ln, ld = rr, dd
            elif dd < 0:
                if -rr * hd < hn * -dd:
                    hn, hd = -rr, -dd
        if ln * hd > hn * ld:
            continue
        lam = Fraction(ln * hd + hn * ld, 2 * ld * hd)  # the middle of [lo, hi]
        ge, strict = _between(vi, vj, vk, lam)
        if ge and (strict or (0 < lam < 1 and min(j, k) < i)):
            return True
    return False


def _words(bits: np.ndarray, words: int) -> np.ndarray:
    """Rows of booleans packed into ``words`` 64-bit words each."""
    packed = np.packbits(bits, axis=1)
    out = np.zeros((len(bits), words * 8), dtype=np.uint8)
    out[:, :packed.shape[1]] = packed
    return out.view(np.uint64)


def _hull_prune(vecs: list[tuple[int, ...]], exps=None) -> list[int]:
    """Of rows (event order) no single row rules out, the ones no mix of two others does
    (screened in floating point, each removal verified in exact integers); a row that is the
    only maximum at a probe point of ``exps`` is kept without a search."""
    n = len(vecs)
    if n <= 2:
        return list(range(n))
    a = np.array(vecs, dtype=float)
    try:
        ia = np.array(vecs, dtype=np.int64)
    except OverflowError:  # pragma: no cover - rows are int64 where they come from
        ia = np.array(vecs, dtype=object)
    sure = _only_maxima(a, exps) if exps is not None and len(exps) == a.shape[1] \
        else np.zeros(n, dtype=bool)
    words = -(-a.shape[1] // 64)
    full = _words(np.ones((1, a.shape[1]), dtype=bool), words)[0]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)  # a mix of (j, k) is one of (k, j)
    low = a.min(0)
    kept = sure.copy()  # rows kept for sure, then the rows kept so far too
    keep = []
    for i in range(n):
        if sure[i]:
            keep.append(i)
            continue
        # a mix of j and k is at most the larger of the two in each coefficient: only pairs
        # that together reach row i in every coefficient can rule it out
        cover = _words(ia >= ia[i], words)  # rows × 64-bit words
        pair = upper.copy()
        for w in range(words):
            pair &= (cover[:, None, w] | cover[None, :, w]) == full[w]
        pair[i, :] = pair[:, i] = False
        # mixes of kept rows first (most rows below the hull are below a mix of its
        # vertices), then of a kept row and another, then every other pair
        both = kept[:, None] & kept[None, :]
        one = kept[:, None] | kept[None, :]
        if not (_mixed_below(vecs, a, i, pair & both, low)
                or _mixed_below(vecs, a, i, pair & one & ~both, low)
                or _mixed_below(vecs, a, i, pair & ~one, low)):
            keep.append(i)
            kept[i] = True
    return keep


# random corners the screen probes rows with sizes of many variables (besides the 8 points of
# every variable alike): anchors only direct the screen (every row it drops is ruled out
# exactly), and over the rows of the structure compiles 512 corners leave as few rows as 4,096
# did at an eighth of the product (tests/test_peak_pruning.py holds the screen sound)
_RANDOM_PROBES = 512


def _probe_points(nvars: int) -> np.ndarray:
    """The screen's probe points (variables × points, integers as floats): over (b, t) a grid;
    else every variable alike, then random corners of growing spread (deterministic)."""
    if nvars == 2:
        pb, pt = np.meshgrid(np.array(_PROBE_B, float), np.array(_PROBE_T, float))
        return np.stack([pb.ravel(), pt.ravel()])
    scale = np.array(_PROBE_B, float)
    return np.concatenate([np.tile(scale, (nvars, 1)),
                           scale[_corners(nvars * _RANDOM_PROBES).reshape(nvars, -1)]], 1)


def _corners(n: int) -> np.ndarray:
    """n pseudo-random indices in [0, 8), deterministic: splitmix64 of 1..n, its top three bits
    (no numpy.random: importing it cost a process's first compile 18 ms)."""
    z = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(61)).astype(np.intp)


@functools.lru_cache(maxsize=64)
def _probe_monomials(exps: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Each monomial of ``exps`` (columns) at the screen's probe points (rows); a compile's
    windows share a few exponent sets, so each is computed once (read-only)."""
    pts = _probe_points(len(exps[0]))
    # powers by repeated multiplication (each within half an ulp: a monomial of degree g over
    # v variables is within (g + v)·2^-53 of its value, which ``_only_maxima`` counts on)
    e = np.array(exps, dtype=np.int64)  # monomials × variables
    powers = [np.ones_like(pts)]
    for _ in range(int(e.max(initial=0))):
        powers.append(powers[-1] * pts)
    powers = np.stack(powers)  # degree × variables × points
    mono = np.ones((len(exps), pts.shape[1]))
    for v in range(e.shape[1]):
        mono *= powers[e[:, v], v]
    mono = np.ascontiguousarray(mono.T)
    mono.flags.writeable = False
    return mono


def _screen(k: np.ndarray, exps) -> np.ndarray:
    """Rows (of ``k``: rows × coefficients, int64, constant first) the vectorised pass cannot
    rule out; sound: a row it drops is ruled out by the rules above."""
    n = len(k)
    if n <= 8:
        return np.arange(n)
    kf = k.astype(float)
    # probes × rows (each probe's values contiguous: its first maximum found along a row)
    vals = _probe_monomials(tuple(tuple(e) for e in exps)) @ kf.T
    top = vals.max(1)
    first = np.argmax(vals >= (top - 1e-9 * np.abs(top))[:, None], axis=1)
    anchors = np.flatnonzero(np.bincount(first, minlength=n))  # sorted, each once
    idx = np.arange(n)
    ka = k[anchors]
    # single-row rule, exact (comparisons of integers)
    ge = (ka[:, None, :] >= k[None, :, :]).all(-1)
    strict = ge & (ka[:, None, 0] > k[None, :, 0])
    out = ((ge & (anchors[:, None] < idx[None, :])) | strict).any(0)
    out[anchors] = False
    # mixes of two anchors, strict, where the float margin is beyond rounding error: over
    # (b, t) alone. Over a structure's sizes the exact passes left the same rows without this
    # step, in less time (the 373 windows of the never-seen benchmarks' compiles: 0.80 s
    # against 1.34 s), where over (b, t) it spared them most of their work (8 ms against 36)
    rest = np.nonzero(~out)[0]
    rest = rest[~np.isin(rest, anchors)]
    if len(exps[0]) == 2 and len(rest) and len(anchors) >= 2:
        fa = kf[anchors]
        fr = kf[rest]
        mag = np.abs(fa)
        for x in range(len(anchors)):
            for y in range(x + 1, len(anchors)):
                dj, dk = fa[x], fa[y]
                dd = dj - dk  # λ·dd >= i - dk
                rr = fr - dk
                with np.errstate(divide="ignore", invalid="ignore"):
                    q = rr / dd
                lo = np.maximum(np.where(dd > 0, q, -np.inf).max(-1), 0.0)
                hi = np.minimum(np.where(dd < 0, q, np.inf).min(-1), 1.0)
                lam = np.clip((lo + hi) / 2, 0.0, 1.0)[:, None]
                mu = (1.0 - lam) * (1.0 - 2.0 ** -40)
                slack = lam * dj + mu * dk - fr
                err = 2.0 ** -45 * (mag[x] + mag[y] + np.abs(fr)) + 1.0
                good = (lo <= hi) & (slack >= err).all(-1) & (slack[:, 0] > err[:, 0])
                out[rest[good]] = True
                keep = ~good
                rest, fr = rest[keep], fr[keep]
                if not len(rest):
                    break
            if not len(rest):
                break
    return np.nonzero(~out)[0]
