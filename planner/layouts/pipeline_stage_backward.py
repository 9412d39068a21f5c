"""The backward actions of a pipeline rank's stages on the step simulator: B, I and W.

``planner.layouts.pipeline_memory`` replays a rank's step action by action on one ``Machine``
(``PipelineRankProgram``); its backward actions are the methods of ``StageBackward``, which that
program inherits. B runs ``autograd.backward`` from the loss or from the stage output with its
gradient receive buffer; the zero-bubble schedules' I and W run the split passes of
``planner.layouts.pipeline_backward``; each input gradient is handed to the previous stage (sent,
or on the same rank in the V shape made its gradient receive buffer). What each action keeps
alive, after torch 2.13's ``pipelining/stage.py``, is in ``pipeline_memory``'s docstring. With an
``ActionMemo`` set (``planner/layouts/pipeline_actions.py``) a rank's repeated backwards are
composed per kind instead; the ``real_`` methods replay them op by op.
"""

from __future__ import annotations

from planner.layouts.pipeline_backward import (
    Pending,
    closure,
    split_backward_input,
    split_backward_weight,
)
from planner.machine.stepsim import Buf, Val

__all__ = ["StageBackward"]


class StageBackward:
    """A pipeline rank's B, I and W, on the machine, pending forwards, sends and schedule that
    ``PipelineRankProgram`` sets up (its ``stage_backward`` dispatches B)."""

    def _root(self, st: int, j: int, p: Pending) -> tuple[Val, Buf]:
        m = self.m
        if p.loss is not None:
            g = m.alloc(p.loss.numel * p.loss.esz, "ones_like")
            return p.loss.val, g
        return p.out.val, m.hold(self.grad_recv[st, j])

    def _input_grad(self, p: Pending) -> Buf | None:
        if p.inp is None:
            return None
        leaf = p.inp.val.fn
        g, leaf.grad = leaf.grad, None
        if g is not None:
            self.m.recategorize(g, "temporaries")
        return g

    def _release(self, p: Pending) -> None:
        o = self.ops
        o.drop(p.out, p.inp, p.loss)
        self.in_flight -= 1

    def real_backward(self, st: int, j: int) -> None:
        m = self.m
        m.phase = "backward"
        p = self.pending.pop((st, j))
        root, g = self._root(st, j, p)
        m.hold(g)  # autograd.backward keeps its seed until it returns
        m.backward(root, g)
        m.drop(g)
        gi = self._input_grad(p)
        self._release(p)
        m.phase = "other"
        if gi is not None:
            self._hand_back(st, j, gi)

    def stage_backward_input(self, st: int, j: int) -> None:
        if self.memo is not None:
            return self.memo.backward_input(self, st, j)
        return self.real_backward_input(st, j)

    def stage_backward_weight(self, st: int, j: int) -> None:
        if self.memo is not None:
            return self.memo.backward_weight(self, st, j)
        return self.real_backward_weight(st, j)

    def real_backward_input(self, st: int, j: int) -> None:
        m = self.m
        p = self.pending[st, j]
        if st == 0:  # stage_backward_input is skipped on the first stage; W runs it in full
            return
        m.phase = "backward"
        root, g = self._root(st, j, p)
        leaf = p.inp.val.fn
        nodes, inter = closure(root.fn, leaf)
        p.inter = []
        self.backward_mode, self.split_pending = "I", p
        p.nodes = split_backward_input(m, root, g, leaf, nodes, inter, p, self._watch(p))
        self.backward_mode = self.split_pending = None
        gi = self._input_grad(p)
        m.phase = "other"
        if gi is not None:
            self.input_grads.append(gi)  # inp.grad = dinput, until clear_runtime_states
            self._hand_back(st, j, m.hold(gi))
        # the output (or loss) is detached: the graph above the intermediates is released
        self.ops.drop(p.out, p.loss)
        p.out = p.loss = None

    def real_backward_weight(self, st: int, j: int) -> None:
        if st == 0:
            return self.stage_backward(st, j)
        m = self.m
        m.phase = "backward"
        p = self.pending.pop((st, j))
        self.backward_mode = "W"
        split_backward_weight(m, p, self._watch(p))
        for sp in p.phantoms:
            sp.release()
        self.backward_mode = None
        self.ops.drop(p.inp)
        self.in_flight -= 1
        m.phase = "other"

    @staticmethod
    def _watch(p: Pending):
        """The stood-in blocks' measures under a split backward
        (planner/layouts/pipeline_blocks)."""
        if not p.phantoms:
            return None
        return lambda n: [sp.watch(n) for sp in p.phantoms]

    def _hand_back(self, st: int, j: int, gi: Buf) -> None:
        """The input gradient (one reference, passed on) goes to the previous stage: sent, or on
        the same rank (V shape) made its gradient receive buffer by set_local_bwd_input, which
        keeps it until the next step replaces it."""
        if self.sched.stage_to_rank[st - 1] == self.rank:
            old, self.grad_recv[st - 1, j] = self.grad_recv[st - 1, j], gi
            self.m.drop(old)
        else:
            self.sends.append(gi)
