"""The reference step's matmuls, as the step simulator sees them: ``F.linear`` (plain, under
autocast, and on a frozen int8/nf4 base) and the batched ``bmm`` of eager attention.

``MatmulOps`` is part of the op library ``Ops`` (planner/step/ops.py), with the same rules: bytes
out, bytes saved, bytes of each backward allocation, and nothing dropped that the op did not
create. It builds on ``Ops``' values, autocast casts and autograd nodes.
"""

from __future__ import annotations

from typing import Any

from planner.machine.stepsim import Machine, Node

T = Any  # planner.step.ops.T (ops builds Ops on MatmulOps: it imports this module)


class MatmulOps:
    """Matmuls of the op library: ``linear`` and ``bmm``."""

    # ---- matmuls ------------------------------------------------------------------------------
    def linear(self, x: T, w: T, b: T | None, n_rows: int, d_in: int, d_out: int) -> T:
        """F.linear → addmm/mm on a 2-D view. Under autocast the input is cast (a new copy per
        call) and the weight and bias come from the autocast cache. Saves the (cast) input when
        the weight needs grad and the (cast) weight when the input needs grad. Backward allocates
        grad input (n_rows·d_in), grad weight (d_out·d_in) and grad bias (d_out)."""
        if w.quantized:
            return self._quantized_linear(x, w, b, n_rows, d_in, d_out)
        # Autocast's linear kernel casts its arguments as C++ evaluates a call's arguments, right
        # to left under GCC (aten/src/ATen/autocast_mode.h, WrapFunction_: cached_cast(args)...):
        # bias, weight, then input. The engine runs the later (higher sequence number) cast's
        # backward first: the input's, then the weight's, then the bias's.
        bi, b_new = self.amp_weight(b) if b is not None else (None, False)
        wi, w_new = self.amp_weight(w)
        xi, x_new = self.amp_input(x)
        esz = wi.esz

        def bw(m: Machine, n: Node, g: list) -> list:
            gx = m.galloc(n, 0, n_rows * d_in * esz, "mm")
            gw = m.galloc(n, 1, d_out * d_in * esz, "mm")
            m.apply_returned(n)  # the bias gradient is the engine's sum_to_size of g
            return [gx, gw, m.galloc(n, 2, d_out * esz, "sum") if bi is not None else None]
        saved = [xi if wi.requires_grad else None, wi if xi.requires_grad else None]
        node = self._node("Addmm" if b is not None else "Mm", [xi, wi, bi], saved, bw)
        out = self.new(n_rows * d_out, esz, "addmm" if b is not None else "mm", node)
        self.drop(xi if x_new else None, wi if w_new else None, bi if b_new else None)
        return out

    def _quantized_linear(self, x: T, w: T, b: T | None, n_rows: int, d_in: int, d_out: int) -> T:
        """A frozen int8/nf4 weight (QLoRA, Dettmers et al. 2023 §3): dequantized to the compute
        dtype for the matmul and dropped; backward dequantizes again for the input gradient
        (bitsandbytes' MatMul4Bit keeps only the quantized weight). Not measured: the reference
        step does not run quantized bases."""
        xi, x_new = self.amp_input(x)
        esz = w.esz
        deq = self.m.alloc(w.numel * esz, "dequantize")

        def bw(m: Machine, n: Node, g: list) -> list:
            if n.edges[0] is None:
                return [None]
            tmp = m.alloc(w.numel * esz, "dequantize")
            out = m.galloc(n, 0, n_rows * d_in * esz, "mm")
            m.drop(tmp)
            return [out]
        node = self._node("MatMulQuantized", [xi], [], bw)
        out = self.new(n_rows * d_out, esz, "mm", node)
        self.m.drop(deq)
        self.drop(xi if x_new else None)
        return out

    def bmm(self, a: T, b: T, out_numel: int, name: str = "bmm") -> T:
        """a @ b (batched): saves both; backward allocates a grad like each input."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, a.numel * a.esz, "bmm"), m.galloc(n, 1, b.numel * b.esz, "bmm")]
        node = self._node("Bmm", [a, b],
                          [b if a.requires_grad else None, a if b.requires_grad else None], bw)
        return self.new(out_numel, max(a.esz, b.esz), name, node)
