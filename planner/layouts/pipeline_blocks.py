"""A pipeline stage's blocks, with the middle ones of a long stage stood in for.

Every forward of a stage (``PipelineRankProgram.stage_forward``) runs its blocks one after the
other: the same ops on the same shapes per block, each block's output the next one's input. So
within one forward the live bytes after each block are affine in the block index, and every
instant inside block ``k`` is the like instant of block ``k - 1`` shifted by one block's net
bytes. A stage of ``n >= 7`` blocks is replayed as one device replays its homogeneous middle
blocks (``planner/step/plans.py: compression_plan`` with no checkpointed block, and
``ReferenceProgram._phantom_forward``): blocks 0, 1, 2, n - 2 and n - 1 run op by op, a phantom
after block 2 stands for the n - 5 between. The phantom is measured on block 2 of the same
forward (so nothing it stands for depends on what the rank holds from other actions), holds
n - 5 times block 2's net bytes per category (those only the autocast cache keeps go at
autocast exit, the rest to its backward), and in backward frees them and, at the stage's first
backward, adds the stood-in blocks' parameter gradients, which live, as the real ``.grad`` do,
until ``zero_grad``. The maximum over an arithmetic progression is at one of its ends, and both
ends (block 2 and block n - 2, forward and backward) are replayed, so every window's peak —
total, categories, op and phase — is the full replay's (``tests/test_pipeline_blocks.py``).

The stood-in blocks' parameters are the rank's own (built with the model and kept): nothing
changes for them. The gradients are keyed by stage, so a rank holding several stages
(interleaved, V shape) keeps one phantom gradient per stage.

Stages whose backward is split (I then W: zero-bubble schedules) replay every block: I keeps
every saved tensor and the gradient arriving at each block's intermediates until W, which a
phantom of the whole-backward kind does not model.
"""

from __future__ import annotations

from planner.step.plans import compression_plan

__all__ = ["stage_plan", "run_stage_blocks"]


def stage_plan(blocks: int, compress: bool) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """(positions of the blocks replayed, phantoms) for a stage of ``blocks`` blocks, as
    ``compression_plan`` gives them for a step without checkpointing; every block when
    ``compress`` is off or the stage is short."""
    if not compress:
        return list(range(blocks)), []
    return compression_plan(set(), blocks)


def run_stage_blocks(prog, st: int, x, rope, plan) -> object:
    """Stage ``st``'s blocks on ``x`` (the stage's first block is ``prog.bounds[st]``): the
    replayed ones op by op, each phantom after the last block of its measured window."""
    m, o = prog.m, prog.ops
    first = prog.bounds[st]
    real, phantoms = plan
    starts = {ph[0] for ph in phantoms}
    ends: dict[int, list] = {}
    for ph in phantoms:
        ends.setdefault(ph[1], []).append(ph)
    measured: dict[int, tuple] = {}
    for j, b in enumerate(real):
        if j in starts:
            measured[j] = (list(m.cur), set(o._amp_cache), len(o._exit_drops))
        xn = prog.run_block(x, first + b, rope)
        o.drop(x)
        x = xn
        for ph in sorted(ends.get(j, ()), key=lambda ph: -ph[0]):
            x = prog._phantom_forward(x, ph, *measured[ph[0]], key=(st, ph[:2]))
    return x
