"""A pipeline stage's blocks, with the middle ones of a long stage stood in for.

Every forward of a stage (``PipelineRankProgram.stage_forward``) runs its blocks one after the
other: the same ops on the same shapes per block, each block's output the next one's input. So
within one forward the live bytes after each block are affine in the block index, and every
instant inside block ``k`` is the like instant of block ``k - 1`` shifted by one block's net
bytes. A stage of ``n >= 6`` blocks is replayed as one device replays its homogeneous middle
blocks (``ReferenceProgram._phantom_forward``): blocks 0, 1, n - 2 and n - 1 run op by op, a
phantom after block 1 stands for the n - 4 between. Block 0 is the stage's own (its input is
what the stage received, or the embedding's output); block 1 is the first middle block (its
input a block's output, its output a block's input, as for every block up to n - 2). The
phantom is measured on block 1 of the same forward (so nothing it stands for depends on what
the rank holds from other actions), holds n - 4 times block 1's net bytes per category (those
only the autocast cache keeps go at autocast exit, the rest to its backward), and in backward
frees them and, at the stage's first backward, adds the stood-in blocks' parameter gradients,
which live, as the real ``.grad`` do, until ``zero_grad``. The maximum over an arithmetic
progression is at one of its ends, and both ends (block 1 and block n - 2, forward and
backward) are replayed, so every window's peak — total, categories, op and phase — is the full
replay's (``tests/test_pipeline_blocks.py``). (A single device's plan,
``planner/step/plans.py: compression_plan``, replays one more block before its phantom; a
pipeline stage's blocks have no checkpoint plan.)

The stood-in blocks' parameters are the rank's own (built with the model and kept): nothing
changes for them. The gradients are keyed by stage, so a rank holding several stages
(interleaved, V shape) keeps one phantom gradient per stage.

A split backward (zero-bubble schedules: I then W, ``planner/layouts/pipeline_backward.py``)
runs the blocks' backward in two halves, and the phantom follows each (``SplitPhantom``):

- **I** runs every block's input-path nodes with ``retain_graph=True``: nothing saved is freed,
  and each block keeps the gradients arriving at its intermediates until W. So each middle
  block leaves the same bytes behind as block n - 2, the replayed block I runs just before the
  phantom: measured from I reaching that block's output node to I reaching the phantom. The
  phantom adds n - 4 times that, per category, and keeps it (and what it holds from the
  forward) until W; it joins the intermediates so that W reaches it in forward order.
- **W** runs the parameter groups in forward order: the phantom's turn comes after block 1's
  groups, whose net effect (saved tensors of the weight paths freed, kept gradients dropped,
  the parameters' gradients made at the stage's first W) is measured from W reaching block 1's
  first group to W reaching the phantom. The phantom applies n - 4 times that, frees first,
  then makes the gradients (kept until ``zero_grad`` like the B phantom's); what it still holds
  goes where W releases the rest of the graph.

Both measures are taken in the same action on blocks whose ops and shapes are a middle block's,
so the progression argument above holds for I and W as for B. On the recording machine of a
template (sizes as polynomials) the measures are polynomials too, and the W's comparisons of
what it frees against what the phantom holds are decided over the template's domain (or kept as
guards; a comparison that cannot be decided fails the compile, and the setup is replayed):
stages of 6 or more blocks replay four of them there as well, split backward or not
(``tests/test_pipeline_blocks.py``: templates over the micro-batch size and sequence length,
and structure templates over the model's dimensions, against the full replay).
"""

from __future__ import annotations

from planner.machine.stepsim import CATEGORIES

__all__ = ["SplitPhantom", "stage_plan", "run_stage_blocks"]


def stage_plan(blocks: int, compress: bool) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """(positions of the blocks replayed, phantoms: as ``compression_plan`` gives them) for a
    stage of ``blocks`` blocks: blocks 0, 1, n - 2 and n - 1, the phantom after block 1 measured
    on it; every block when ``compress`` is off or the stage is short."""
    if not compress or blocks < 6:
        return list(range(blocks)), []
    return [0, 1, blocks - 2, blocks - 1], [(1, 1, blocks - 4, blocks - 4)]


def run_stage_blocks(prog, st: int, x, rope, plan, split: list | None = None) -> object:
    """Stage ``st``'s blocks on ``x`` (the stage's first block is ``prog.bounds[st]``): the
    replayed ones op by op, each phantom after the last block of its measured window. With
    ``split`` (a list), each phantom is made ready for a split backward and added to it."""
    m, o = prog.m, prog.ops
    first = prog.bounds[st]
    real, phantoms = plan
    starts = {ph[0] for ph in phantoms}
    ends: dict[int, list] = {}
    for ph in phantoms:
        ends.setdefault(ph[1], []).append(ph)
    measured: dict[int, tuple] = {}
    seqs: dict[int, tuple[int, int]] = {}
    waiting: list[SplitPhantom] = []
    for j, b in enumerate(real):
        if j in starts:
            measured[j] = (list(m.cur), set(o._amp_cache), len(o._exit_drops))
        s0 = m._seq
        xn = prog.run_block(x, first + b, rope)
        o.drop(x)
        x = xn
        seqs[j] = (s0, m._seq)
        for sp in waiting:  # the replayed block after a phantom: its output node
            sp.top = x.val.fn
        waiting = []
        for ph in sorted(ends.get(j, ()), key=lambda ph: -ph[0]):
            x = prog._phantom_forward(x, ph, *measured[ph[0]], key=(st, ph[:2]))
            if split is not None:
                node, held, key = prog._last_phantom
                sp = SplitPhantom(prog, node, held, key, ph[2],
                                  (seqs[ph[0]][0], seqs[ph[1]][1]))
                split.append(sp)
                waiting.append(sp)
    return x


class SplitPhantom:
    """A phantom's backward under I and W (see the module's docstring); under a whole backward
    (B, and W on the first stage) it runs as ``_phantom_forward`` made it."""

    def __init__(self, prog, node, held: list, key, copies: int, window: tuple[int, int]):
        self.prog, self.node, self.held, self.key, self.n = prog, node, held, key, copies
        self.window = window  # block 1's nodes: window[0] < seq <= window[1]
        self.top = None  # the output node of the block replayed after the phantom
        self.mark: list | None = None
        self.kept: list = []
        self.base = node.fn
        node.fn = self._backward

    def watch(self, node) -> None:
        """Before each node (I) or parameter group (W): the live bytes where the measure
        starts."""
        mode = self.prog.backward_mode
        if mode == "I" and node is self.top:
            self.mark = list(self.prog.m.cur)
        elif mode == "W" and self.mark is None and self.window[0] < node.seq <= self.window[1]:
            self.mark = list(self.prog.m.cur)

    def _backward(self, m, node, g: list) -> list:
        mode = self.prog.backward_mode
        if mode is None:
            return self.base(m, node, g)
        assert self.mark is not None, (mode, "measure not started")
        delta = [a - b for a, b in zip(m.cur, self.mark)]
        self.mark = None
        if mode == "I":
            for c, d in enumerate(delta):
                assert d >= 0, delta
                if d:
                    self.kept.append(m.alloc(self.n * d, "phantom blocks (kept)", CATEGORIES[c]))
            self.prog.split_pending.inter.append((node, []))
            return [m.hold(g[0]) if g and g[0] is not None else None]
        for c, d in enumerate(delta):  # W: frees first
            need = -self.n * d
            for b in self.held + self.kept:
                if need > 0 and b.cat == CATEGORIES[c] and b.refs > 0 and b.nbytes:
                    take = min(need, b.nbytes)
                    m.resize(b, b.nbytes - take)
                    need -= take
            assert need <= 0, (delta, need)
        for c, d in enumerate(delta):
            if d > 0:
                assert CATEGORIES[c] == "gradients" and self.key not in self.prog._phantom_grads, delta
                self.prog._phantom_grads[self.key] = m.alloc(self.n * d, "phantom blocks (grads)",
                                                             "gradients")
        return [None] * node.n_out

    def release(self) -> None:
        """W's end: what the phantom still holds goes with the rest of the graph."""
        self.prog.m.drop(*self.held, *self.kept)
        self.held, self.kept = [], []
