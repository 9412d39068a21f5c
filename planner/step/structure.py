"""The reference step's peaks as closed forms in the sizes *and* the model's dimensions.

A step template (planner/step/template.py) keeps the micro-batch ``B`` and the sequence length
``T`` symbolic for one model. Every size the step allocates is just as much a polynomial in the
model's dimensions: ``B·T·nh·hd`` of a query, ``V·h`` of the embedding, ``f·h`` of an MLP weight,
``P·hd`` of the rotary tables. So one replay with all of them symbolic serves every model of a
*structure*: the family, the number of blocks, tied embeddings, every training option, the
checkpointed blocks, the device, and which sizes are 1 (below). That is this module.

Variables (each a size of at least 2; a size of 1 is its own domain, a constant, as in
``step_template.domain_of``): ``B``, ``T``; ``nkv`` key/value heads and ``g`` query heads per
key/value head (``nh = nkv·g``, ``h = nh·hd``, so every size stays a polynomial and
``nh // nkv`` is never divided); the head dimension (for llama, ``hh`` with ``hd = 2·hh`` when
``hd`` is even: RoPE halves every rotated tensor, an exact halving only when ``hd`` is even); the
MLP width ``f``, the vocabulary ``V`` and the positions ``P``. Each is ``2 + s`` with ``s >= 0``.

Soundness is the step template's: every decision the program takes on a size goes through
:class:`planner.machine.symbolic.MPoly`'s comparisons, which answer only what holds for *every* model
and size of the domain. What the domain leaves open (``V·h`` against ``f·h``: mixed-fp16's
check of the largest parameter, the order of a for-loop optimizer's or Adafactor's per-tensor
temporaries) is answered at a *witness*, the model being compiled, and kept as a guard (the
sign of that difference); the template then holds for exactly the models that share every
guard's sign (the program is deterministic: same answers, same ops, same sizes as
polynomials), and ``admits(values)`` checks them. A size that rounds (8-bit Adam's blocks, nf4
codes) is no polynomial: ``Undecided``, the structure is not templated (a division by one term
that divides every term, Adafactor's row and column factors, is exact).

The number of blocks stays in the key: the optimizer's states and temporaries are functions of
the list of parameter tensors (planner/catalog/optimizers.py), whose length is the block count.

Peak candidates are pruned over the shifted variables (planner/machine/peak_pruning.py, the rules
need variables >= 0) and evaluated over the sizes themselves (sparse, exact Python integers).
tests/test_structure_template.py holds the answers equal to the concrete replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.machine.deadline import check as check_work_limit
from planner.machine.peak_candidates import (
    Candidates,
    _compiled,
    _expr_n,
    _monomials_n,
    _poly_fn_n,
    candidates,
)
from planner.step.peaks import StepPeaks, combine_peaks
from planner.step.program import ReferenceProgram
from planner.machine.recording import RecordingMachine
from planner.step.template import _activation_snap
from planner.machine.stepsim import CATEGORIES
from planner.machine.symbolic import MPoly, Space, Undecided

__all__ = ["StructureTemplate", "compile_structure", "structure_of"]

_NCAT = len(CATEGORIES)
_LIMIT = 1 << 62


def structure_of(model, B: int, T: int) -> tuple[tuple, tuple[str, ...], tuple[int, ...]] | None:
    """(the domain part of the structure key, the names of the symbolic sizes, their values)
    for a model with every dimension given; None when it has not."""
    nh, h = model.num_heads, model.hidden_size
    f, V, P = model.ffn_hidden_size, model.vocab_size, model.max_sequence_length
    if None in (nh, h, f, V, P) or h % nh:
        return None
    nkv = model.num_kv_heads or nh
    if nh % nkv:
        return None
    hd = h // nh
    half = model.family != "gpt2" and hd % 2 == 0
    sizes = (("B", B), ("T", T), ("nkv", nkv), ("g", nh // nkv),
             ("hh", hd // 2) if half else ("hd", hd), ("f", f), ("V", V), ("P", P))
    dom = tuple(1 if v == 1 else None for _, v in sizes)
    return ((half, dom), tuple(n for n, v in sizes if v != 1),
            tuple(v for _, v in sizes if v != 1))


def _symbolic_sizes(names: tuple[str, ...], half: bool,
                    witness: tuple[int, ...] | None = None,
                    extra: tuple[tuple[str, int], ...] = ()) -> tuple[Space, tuple]:
    """The Space of ``names`` (then the ``extra`` variables, each ``(name, lowest value)``) and
    the program's sizes (B, T, h, nh, nkv, hd, f, V, P, g)."""
    sp = Space((*names, *(n for n, _ in extra)), (2,) * len(names) + tuple(lo for _, lo in extra),
               witness)
    v = {n: sp.var(i) for i, n in enumerate(names)}

    def get(n: str):
        return v.get(n, 1)
    hd = 2 * get("hh") if half else get("hd")
    nkv, g = get("nkv"), get("g")
    nh = nkv * g
    return sp, (get("B"), get("T"), nh * hd, nh, nkv, hd, get("f"), get("V"), get("P"), g)


@dataclass
class StructureTemplate:
    """One structure's step with its sizes free: ``evaluate(values)`` (the sizes named by
    ``names``, in order) equals ``ReferenceProgram.run()`` for that model and sizes."""

    names: tuple[str, ...]
    fb: list[Candidates]
    step: list[Candidates]
    act: Candidates | None  # None: not compiled (a data-parallel rank's: nothing reads it)
    act_max: Candidates
    states: object  # f(*values) -> [optimizer state bytes]
    amp_scaler: bool
    # f(*values) -> whether the values share the witness's answer to every decision the domain
    # left open (None: there were none, the template holds on the whole domain)
    admits: object = None

    def evaluate(self, v: tuple[int, ...]) -> StepPeaks:
        act = self.act
        return combine_peaks([c.best(*v) for c in self.fb], [c.best(*v) for c in self.step],
                             _left_out if act is None else lambda: act.best(*v),
                             states=self.states(*v)[0],
                             amp_scaler=self.amp_scaler,
                             act_max=lambda: _activation_snap(self.act_max.best(*v)))


def _left_out():
    raise LookupError("this structure template leaves the activation-and-temporaries peak out "
                      "(a data-parallel rank's: compile_structure(act=False))")


def _natural(m: RecordingMachine, sp: Space) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """(marks × categories × monomials) live bytes at every mark over the sizes themselves, and
    the monomials (constant first, the others in the order the log first names them).

    A log names few distinct sizes many times over (a composed action logs its record's
    changes, the same polynomials, at every occurrence): each distinct size object's terms are
    read once and every change's terms are gathered from them in array operations."""
    zero = (0,) * sp.n
    log = m.log
    at = np.array([mk[0] for mk in m.marks], dtype=np.int64)
    if not log:
        return np.zeros((len(at), _NCAT, 1), dtype=np.int64), [zero]
    objs = [size for _, size in log]
    sc = np.array([c for c, _ in log], dtype=np.int64)
    # the distinct size objects in order of first use (each kept alive by ``objs``)
    _, first, inv = np.unique(np.fromiter(map(id, objs), dtype=np.uint64, count=len(objs)),
                              return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    u = rank[inv.reshape(-1)]  # each change's distinct size, numbered by first use
    col: dict[tuple[int, ...], int] = {zero: 0}
    tcol: list[int] = []
    tval: list[int] = []
    count = np.zeros(len(order), dtype=np.int64)
    weight = 0  # the sum of every change's absolute terms (Python ints: exact)
    uses = np.bincount(u, minlength=len(order))
    for n, f in enumerate(first[order].tolist()):
        size = objs[f]
        terms = size.t.items() if isinstance(size, MPoly) else ((zero, size),) if size else ()
        a = 0
        for k, c in terms:
            if abs(c) >= _LIMIT:
                raise Undecided(f"size {size} outside the template's range")
            tcol.append(col.setdefault(k, len(col)))
            tval.append(c)
            a += abs(c)
        count[n] = len(terms)
        weight += a * int(uses[n])
    if weight >= _LIMIT:  # bounds every partial sum below: no int64 overflow
        raise Undecided("live bytes outside the template's range")
    ncol = len(col) * _NCAT
    cnt = count[u]  # terms per change
    e = np.repeat(np.arange(len(log), dtype=np.int64), cnt)
    offs = np.cumsum(count) - count  # each distinct size's first term
    pos = np.arange(len(e), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt) \
        + np.repeat(offs[u], cnt)
    tcol_a = np.array(tcol, dtype=np.int64)
    tval_a = np.array(tval, dtype=np.int64)
    sce = sc[e]
    cc = tcol_a[pos] * _NCAT + (np.abs(sce) - 1)
    val = np.where(sce > 0, tval_a[pos], -tval_a[pos])
    # each change summed into the segment of the first mark that sees it (a mark at log length
    # ``at`` sees the changes 1..at), then one cumulative sum over the marks only
    seg = np.searchsorted(at, e + 1, side="left")
    seen = seg < len(at)
    d = np.zeros((len(at), ncol), dtype=np.int64)
    np.add.at(d, (seg[seen], cc[seen]), val[seen])
    c = np.cumsum(d, axis=0)
    full = c.reshape(len(m.marks), len(col), _NCAT).transpose(0, 2, 1)
    return np.ascontiguousarray(full), list(col)


def _shift_matrix(sp: Space, exps: list[tuple[int, ...]]):
    """(monomials × shifted monomials) map and the shifted monomials (constant first)."""
    zero = (0,) * sp.n
    cols: dict[tuple[int, ...], int] = {zero: 0}
    ent = []
    for i, e in enumerate(exps):
        for k, c in sp.shifted_monomial(e):
            ent.append((i, cols.setdefault(k, len(cols)), c))
    mat = np.zeros((len(exps), len(cols)), dtype=np.int64)
    for i, j, c in ent:
        if c >= _LIMIT:
            raise Undecided("a monomial outside the template's range")
        mat[i, j] += c
    return mat, list(cols)


def _to_shifted(rows: np.ndarray, mat: np.ndarray) -> np.ndarray:
    """Rows over the sizes to rows over the shifted variables, exactly: every partial sum of
    the int64 product is at most the product of the absolute values, bounded first in floating
    point with a wide margin (2^60 against int64's 2^63)."""
    if rows.size and (np.abs(rows).astype(float) @ np.abs(mat).astype(float)).max() >= 2.0 ** 60:
        raise Undecided("a peak candidate outside the template's range")
    return rows @ mat


def _guard_fn(names: tuple[str, ...], guards: list[tuple[dict, int]]):
    """``f(*values) -> bool``: every guard polynomial has its recorded sign at ``values``."""
    if not guards:
        return None
    exps = sorted({e for t, _ in guards for e in t})
    rows = [tuple(t.get(e, 0) for e in exps) for t, _ in guards]
    pro, name = _monomials_n(names, exps, rows)
    op = {1: ">", -1: "<", 0: "=="}
    conds = [f"({_expr_n(exps, r, name)}) {op[sg]} 0" for r, (_, sg) in zip(rows, guards)]
    return _compiled("\n".join([f"def f({', '.join(names)}):", *pro,
                                "    return " + " and ".join(conds), ""]))


def compile_structure(model, training, device: str, checkpointed: set[int],
                      names: tuple[str, ...], half: bool,
                      witness: tuple[int, ...] | None = None, make=None,
                      extra: tuple[tuple[str, int], ...] = (),
                      act: bool = True) -> StructureTemplate:
    """Replay the step once with the sizes ``names`` symbolic (the others 1); raises Undecided
    (or TypeError, from a size the program cannot take symbolically) when the replay depends
    on their values. With a ``witness`` (values of ``names``, a model of the structure), a
    comparison the domain leaves open is answered at the witness and becomes a guard of the
    template (``admits``). ``make(machine, sizes, space)`` builds the program (default:
    ReferenceProgram; a data-parallel rank's, planner/step/rank_structure.py), which may use
    ``extra`` variables of the space (``(name, lowest value)``, after ``names``; the witness
    then gives their values too); the template's names are ``names`` and theirs. ``act``:
    whether to compile the activation-and-temporaries window (``StepPeaks.act_peak``, which
    only the single-device step's readers read: a data-parallel rank's compile leaves it out,
    its largest window)."""
    sp, sizes = _symbolic_sizes(names, half, witness, extra)
    names = sp.names
    m = RecordingMachine()
    if make is None:
        prog = ReferenceProgram(model, training, device=device, checkpointed=set(checkpointed),
                                machine=m, sizes=sizes)
    else:
        prog = make(m, sizes, sp)
    fb, steps, _, combine = prog.run_windows()
    m._flush()
    full, exps = _natural(m, sp)
    mat, sexps = _shift_matrix(sp, exps)
    ops = [mk[1] for mk in m.marks]
    phases = [mk[2] for mk in m.marks]
    windows = np.array([mk[3] for mk in m.marks])

    def window(sel: np.ndarray, key: np.ndarray, cats: np.ndarray, zero: bool = False):
        check_work_limit()
        w = np.nonzero(sel)[0]
        if not len(w):
            return Candidates(tuple(exps), [], [], [], [], zero, names)
        return candidates(_to_shifted(key[w], mat), None, tuple(sexps), [ops[i] for i in w],
                          [phases[i] for i in w], zero,
                          natural=(names, tuple(exps), key[w], cats[w]))

    total = full.sum(1)
    cands = [window(windows == w, total, full) for w in [*fb, *steps]]
    act_sel = np.array([mk[4] and mk[2] != "optimizer" for mk in m.marks])
    act_w = window(act_sel, full[:, 3] + full[:, 4], full, zero=True) if act else None
    act_max = window(act_sel, full[:, 3], full[:, 3:4], zero=True)
    states = combine["states"]
    sv = states.t if isinstance(states, MPoly) else {(0,) * sp.n: states}
    sexp = tuple(sv)
    return StructureTemplate(names, cands[:len(fb)], cands[len(fb):], act_w, act_max,
                             _poly_fn_n(names, sexp, [tuple(sv[e] for e in sexp)]),
                             bool(combine["amp_scaler"]),
                             _guard_fn(names, list(sp.guards.values())))

