"""Activation checkpointing on the step simulator, as ``torch.utils.checkpoint(fn, *args,
use_reentrant=False)`` runs it.

``CheckpointedRegions`` is the part of ``ReferenceProgram`` (planner/step/program.py) that runs a
region under the checkpoint's saved-tensor hooks: in forward nothing is kept for backward but the
region's arguments, held by a checkpoint frame; in backward the region is re-run when the engine
first unpacks one of its tensors, and stops as soon as the last of them is packed again (the
non-reentrant checkpoint's early stop). The program's checkpointed blocks (``run_block``), the
model's core-attention recompute (planner/step/model.py) and a recomputed loss chunk
(planner/step/loss.py) all go through ``_checkpoint``; ``backward`` hands ``_before_node`` and
``_after_node`` to the machine while a frame is pending.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.step.ops import T


class _StopRecompute(Exception):
    pass


@dataclass
class _CheckpointFrame:
    fn: object  # re-runs the checkpointed region
    input_bufs: list
    packs: list
    done: bool = False
    pending: int = 0  # packed nodes still to run in backward


class CheckpointedRegions:
    """Checkpointed regions of a program: uses the program's machine (``m``), ops, model
    (``block``), checkpoint plan (``checkpointed``), autocast state (``amp_esz``) and pending
    frames (``_ck_nodes``, made by its constructor)."""

    # ---- activation checkpointing (torch.utils.checkpoint, use_reentrant=False) -------------
    def run_block(self, x: T, i: int, rope: tuple[T, T] | None) -> T:
        if i not in self.checkpointed:
            return self.block(x, i, rope)
        return self._checkpoint(lambda: self.block(x, i, rope), [x, *(rope or ())])

    def _checkpoint(self, fn, args: list[T]) -> T:
        """Run ``fn`` as torch.utils.checkpoint(fn, *args, use_reentrant=False) does: under the
        checkpoint's saved-tensor hooks nothing is kept for backward but the arguments (held by
        the checkpoint frame); every pack is logged so the recompute can hand its tensors to the
        same nodes in the same order."""
        m = self.m
        held = [m.hold(a.buf) for a in args]
        rec = _CheckpointFrame(fn, held, [])
        old = m.save_hook
        m.save_hook = lambda node, bufs: rec.packs.append(node)
        try:
            out = fn()
        finally:
            m.save_hook = old
        for node in rec.packs:
            self._ck_nodes[id(node)] = rec
        rec.pending = len({id(n) for n in rec.packs})
        if not rec.packs:  # nothing to recompute: the frame dies with the forward
            m.drop(*held)
        return out

    def _after_node(self, node) -> None:
        # The checkpoint frame (and the block arguments it keeps) lives as long as any of the
        # block's saved-tensor holders: until the last node that packed a tensor has run.
        rec = self._ck_nodes.get(id(node))
        if rec is not None:
            rec.pending -= 1
            if rec.pending == 0:
                self.m.drop(*rec.input_bufs)

    def _before_node(self, node) -> None:
        rec = self._ck_nodes.get(id(node))
        if rec is not None and not rec.done:
            self._recompute(rec)

    def _recompute(self, rec: "_CheckpointFrame") -> None:
        """Re-run the block when backward first unpacks one of its tensors. Non-reentrant
        checkpoint stops as soon as the last logged tensor is packed again (early stop), so ops
        after it never run; the recompute's locals die with it, only packed tensors survive."""
        m, o = self.m, self.ops
        phase, m.phase = m.phase, "recompute"
        allocated: list = []
        held: dict[int, int] = {}
        k = 0

        def hook(node, bufs):
            nonlocal k
            target = rec.packs[k]
            k += 1
            for b in bufs:  # unpack hands the recomputed tensor to the node's apply()
                target.unpacked.append(m.hold(b))
                held[id(b)] = held.get(id(b), 0) + 1
            if k == len(rec.packs):
                raise _StopRecompute

        old_hook, m.save_hook = m.save_hook, hook
        m.on_alloc = allocated.append
        amp_cache, o._amp_cache = o._amp_cache, {}
        amp_was = o.amp_esz
        o.amp_esz = self.amp_esz  # recompute restores the forward's autocast state
        try:
            rec.fn()
        except _StopRecompute:
            pass
        finally:
            m.save_hook, m.on_alloc = old_hook, None
            o._amp_cache, o.amp_esz = amp_cache, amp_was
        for b in allocated:  # everything not packed is garbage once the recompute unwinds
            m.set_refs(b, held.get(id(b), 0))
        rec.done = True
        m.phase = phase
