"""The chunked losses of the reference step (planner/catalog/loss_specs.py), op by op.

Mirrors ``service.validation.step.chunked_loss`` line by line, on the program's ops: the final
norm, the token chunks (views of the norm's output: ``torch.chunk`` of the flattened B·T rows,
one SplitBackward whose backward concatenates the chunks' gradients into one new tensor), then
per chunk the head, the fp32 upcast and the summed cross-entropy, either all in the forward
(``chunked``: the chunks' logits kept until every chunk's loss exists) or under a non-reentrant
checkpoint per chunk (``chunked-linear``: nothing of the logits kept to backward, each chunk
recomputed when backward reaches it). The chunk sums are added, divided by B·T and by the
accumulation steps.
"""

from __future__ import annotations

from planner.catalog.loss_specs import chunk_sizes
from planner.machine.stepsim import Machine, Node, Val
from planner.machine.symbolic import Undecided
from planner.step.ops import F32, Ops, T


def split_rows(o: Ops, x: T, rows: list[int], width: int) -> list[T]:
    """``x.view(n, width).chunk(k)``: views of x's storage, one Split node; its backward
    allocates one gradient like x (split_backward: cat of the chunks' gradients)."""
    def bw(m: Machine, n: Node, g: list) -> list:
        return [m.galloc(n, 0, x.numel * x.esz, "cat")]
    node = o.m.node("Split", [x.val], [], bw, n_out=len(rows))
    out = []
    for i, r in enumerate(rows):
        o.m.hold(x.buf)
        out.append(T(Val(x.buf, node, i), r * width, x.esz))
    return out


def head_nll(p, rows: T, tgt: T, n: int) -> T:
    """``F.cross_entropy(lm_head(rows).float(), tgt, reduction="sum")``: the head's logits die
    with the expression, once upcast (fp32 logits are upcast to themselves)."""
    o, s = p.ops, p.s
    lc = o.linear(rows, p.params.by_name["lm_head.w"], None, n, s.h, s.V)
    lf = o.cast(lc, F32) if lc.esz != F32 else lc
    if lf is not lc:
        o.drop(lc)
    nll = o.cross_entropy(lf, n, s.V, tgt)
    o.drop(lf)
    return nll


def chunked_loss(p, x: T, rope: tuple[T, T] | None) -> T:
    """The chunked loss of program ``p`` from the last block's output ``x`` (taken over);
    returns ``loss / accumulation steps`` as ``ReferenceProgram.forward_loss`` does."""
    o, s, spec = p.ops, p.s, p.tr.loss
    if not isinstance(s.N, int):  # ceil(B·T / chunks) is no polynomial in B and T
        raise Undecided("chunked loss: torch.chunk's row counts round")
    xf = p.norm(x, "norm_f")
    o.drop(x)
    if rope is not None:  # Transformer.forward(head=False) returns: its locals die
        o.drop(*rope)
    sizes = chunk_sizes(s.N, spec.chunks)
    rows = split_rows(o, xf, sizes, s.h)
    o.drop(xf)  # the chunks are views of its storage
    tgts = []
    for n in sizes:
        t = o.view(p.tgt)
        t.numel = n
        tgts.append(t)
    if spec.kind == "chunked":
        w = p.params.by_name["lm_head.w"]
        logits = [o.linear(r, w, None, n, s.h, s.V) for r, n in zip(rows, sizes)]
        nlls = []
        for lc, t, n in zip(logits, tgts, sizes):
            lf = o.cast(lc, F32) if lc.esz != F32 else o.view(lc)
            nlls.append(o.cross_entropy(lf, n, s.V, t))
            o.drop(lf)
        o.drop(*logits)
    else:  # chunked-linear: torch.utils.checkpoint per chunk
        nlls = [p._checkpoint(lambda r=r, t=t, n=n: head_nll(p, r, t, n), [r, t])
                for r, t, n in zip(rows, tgts, sizes)]
    total = o.view(nlls[0])
    for nll in nlls[1:]:
        summed = o.add(total, nll)
        o.drop(total)
        total = summed
    mean = o.scale(total)  # total / (B·T)
    o.drop(total, *nlls, *rows, *tgts)  # chunked_loss returns
    if p.amp_esz is not None:
        o.exit_autocast()
    loss = o.div_scalar_tensor(mean)
    o.drop(mean)
    return loss
