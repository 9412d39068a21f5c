"""Structure templates of a data-parallel rank: the model's dimensions symbolic under DDP and
FSDP2 (planner/layouts/data_parallel.py: ``ParallelProgram``).

A rank's step is the single-device step (planner/step/structure.py) plus what its data-parallel
implementation allocates. Under DDP (zero stage 0) every size it adds is a polynomial in the
dimensions already (the buckets: every trainable gradient), and nothing depends on the rank: the
structure's compile serves as is, with the parallel spec in the key.

FSDP2 (zero stages 2 and 3) stores every parameter as ``torch.chunk`` pieces of its first
dimension ``d``: ``c = ceil(d / N)`` rows padded on every rank, and the rank's own piece
``l = min(c, max(0, d - rank·c))`` rows (its optimizer states, fp32 masters and step copies).
Neither is a polynomial in the dimensions. Every other size is (a shard is ``c`` rows of the
parameter's other dimensions). So each distinct first dimension of the structure's parameters
(a polynomial in the sizes: ``V``, ``P``, ``h``, ``nkv·hd``, ``f``; found by building the
program's parameters once with the sizes symbolic) gets its padded row count ``c`` as a variable
of its own (at least 1), computed per model at evaluation from the dimensions. The rank's
piece is one of three *classes*, a domain of the template like a size of 1: full (``l = c``,
the same variable: rank 0 always, and every rank when N divides ``d``), partial
(``0 < l < c``, a variable of its own, at least 1) or empty (``l = 0``, a constant). The
classes of every first dimension are part of the template's key; what the new variables leave
open against each other and the dimensions (``c`` against ``f``, say) is answered at the model
being compiled and kept as a guard, as the dimensions' own comparisons are. The program is
deterministic, so a model and rank that share the classes and every guard's sign take the same
ops with the same sizes as polynomials: the template's answer is the replay's, to the byte
(tests/test_rank_structure.py holds them equal over random models, ranks and settings).

ZeroRedundancyOptimizer (zero stage 1) assigns whole tensors greedily by size: its partition is
no function of a few polynomials, so it stays on the replay.
"""

from __future__ import annotations

from planner.machine.peak_candidates import _poly_fn_n
from planner.machine.recording import RecordingMachine
from planner.machine.symbolic import MPoly, Undecided
from planner.step.program import ReferenceProgram
from planner.step.structure import StructureTemplate, _symbolic_sizes, compile_structure

__all__ = ["NO_SHARDS", "ShardRows", "compile_rank_structure", "shard_rows_of",
           "templated"]

FULL, PARTIAL, EMPTY = "full", "partial", "empty"


def templated(par) -> bool:
    """Whether a data-parallel rank of ``par`` has structure templates (DDP and FSDP2)."""
    return par.zero_stage in (0, 2, 3)


class ShardRows:
    """The distinct first dimensions of a structure's parameters (polynomials in the sizes
    ``names``) and the FSDP2 world size: ``extend(values, rank)`` gives the rank's classes and
    the values of the template's variables after the sizes."""

    __slots__ = ("dims", "fn", "n")

    def __init__(self, names: tuple[str, ...], dims: list[dict[tuple[int, ...], int]],
                 n: int) -> None:
        self.dims, self.n = dims, n
        exps = sorted({e for d in dims for e in d})
        self.fn = _poly_fn_n(names, exps, [tuple(d.get(e, 0) for e in exps) for d in dims]) \
            if dims else None

    def extend(self, values: tuple[int, ...], rank: int) -> tuple[tuple, tuple[int, ...]]:
        """(the rank's class of every first dimension, ``values`` with the padded rows of each
        and the rank's rows of each partial one after them)."""
        if self.fn is None:
            return (), values
        n = self.n
        classes, extra = [], []
        for d in self.fn(*values):
            c = -(-d // n)
            r = min(c, max(0, d - rank * c))
            extra.append(c)
            if r == c:
                classes.append(FULL)
            elif r:
                classes.append(PARTIAL)
                extra.append(r)
            else:
                classes.append(EMPTY)
        return tuple(classes), (*values, *extra)


NO_SHARDS = ShardRows((), [], 1)


def _first_dims(model, tr, device, checkpointed, names, half) -> list[dict]:
    """The distinct non-constant first dimensions of every parameter (frozen ones too: FSDP2
    shards them), as polynomials in ``names``: the program's parameters built symbolically."""
    _, sizes = _symbolic_sizes(names, half)
    prog = ReferenceProgram(model, tr, device=device, checkpointed=set(checkpointed),
                            machine=RecordingMachine(), sizes=sizes)
    seen: dict[frozenset, dict] = {}
    for _, shape, _, _ in prog.param_specs:
        d = shape[0]
        if isinstance(d, MPoly):
            seen.setdefault(frozenset(d.t.items()), dict(d.t))
    return list(seen.values())


def shard_rows_of(model, tr, device, checkpointed, names, half, par) -> ShardRows:
    """The structure's ShardRows (none under DDP)."""
    if par.zero_stage < 2:
        return NO_SHARDS
    return ShardRows(names, _first_dims(model, tr, device, checkpointed, names, half),
                     par.data_parallel)


def compile_rank_structure(model, tr, device, checkpointed, names, half, values, par, rank,
                           program, shards: ShardRows) -> tuple[tuple, StructureTemplate]:
    """(the rank's classes, the template of the structure's rank in those classes), compiled at
    this model and rank; raises Undecided (or TypeError) as ``compile_structure`` does."""
    classes, full = shards.extend(values, rank)
    extra: list[tuple[str, int]] = []
    for i, cl in enumerate(classes):
        extra.append((f"c{i}", 1))
        if cl == PARTIAL:
            extra.append((f"l{i}", 1))
    nb, n = len(names), par.data_parallel
    index = {frozenset(d.items()): i for i, d in enumerate(shards.dims)}

    def make(m, sizes, sp):
        var = {nm: sp.var(nb + k) for k, (nm, _) in enumerate(extra)}

        def shard_rows(d0):
            if not isinstance(d0, MPoly):  # a constant first dimension (a LoRA rank)
                c = -(-d0 // n)
                return c, min(c, max(0, d0 - rank * c))
            if any(any(e[nb:]) for e in d0.t):
                raise Undecided("a first dimension over the shard variables")
            i = index.get(frozenset((e[:nb], c) for e, c in d0.t.items()))
            if i is None:
                raise Undecided(f"first dimension {d0} not among the structure's")
            c = var[f"c{i}"]
            return c, {FULL: c, PARTIAL: var.get(f"l{i}"), EMPTY: 0}[classes[i]]
        return program(model, tr, par, rank, device=device, checkpointed=set(checkpointed),
                       machine=m, sizes=sizes, shard_rows=shard_rows)

    tpl = compile_structure(model, tr, device, set(checkpointed), names, half, full, make=make,
                            extra=tuple(extra), act=False)
    return classes, tpl
