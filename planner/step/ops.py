"""The reference step's ops, as the step simulator sees them: bytes out, bytes saved, bytes of
each backward allocation — one function per aten op the reference model runs on torch 2.13
(see the derivative formulas in torch's tools/autograd/derivatives.yaml).

Each function takes and returns ``Val``s and drops nothing it did not create: the caller (the
program in ``planner/step/program.py``) drops a value where the model's Python code releases it.
The matmuls are ``MatmulOps`` (planner/step/matmul_ops.py), which ``Ops`` builds on.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.machine.stepsim import Buf, Leaf, Machine, Node, Val
from planner.step.matmul_ops import MatmulOps

F32 = 4


@dataclass
class T:
    """A tensor: a Val plus its element count and element size."""

    val: Val
    numel: int
    esz: int
    quantized: bool = False  # int8/nf4 storage, dequantized to ``esz`` at every use

    @property
    def buf(self) -> Buf:
        return self.val.buf

    @property
    def requires_grad(self) -> bool:
        return self.val.fn is not None


class Ops(MatmulOps):
    """Op library bound to one machine, with autocast state."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.amp_esz: int | None = None  # autocast compute element size, None = off
        self._amp_cache: dict[int, T] = {}  # autocast's cast cache of leaf weights
        self._exit_drops: list[Buf] = []  # other buffers the autocast cache alone keeps

    # ---- values ----------------------------------------------------------------------------
    def new(self, numel: int, esz: int, name: str, node: Node | None = None, out_idx: int = 0,
            cat: str | None = None) -> T:
        return T(Val(self.m.alloc(numel * esz, name, cat), node, out_idx), numel, esz)

    def param(self, numel: int, esz: int, name: str, requires_grad: bool = True,
              grad_esz: int | None = None) -> T:
        """A parameter; ``grad_esz`` when its .grad has another dtype (``param.grad_dtype``):
        AccumulateGrad then copies each incoming gradient into one of that dtype."""
        b = self.m.alloc(numel * esz, name, "parameters")
        leaf = Leaf(name, numel * (grad_esz or esz)) if requires_grad else None
        return T(Val(b, leaf), numel, esz)

    def view(self, t: T) -> T:
        """A view shares the storage (one more reference)."""
        self.m.hold(t.buf)
        return T(Val(t.buf, t.val.fn, t.val.out_idx), t.numel, t.esz)

    def drop(self, *ts: T | None) -> None:
        for t in ts:
            if t is not None:
                self.m.drop(t.buf)

    def _node(self, name: str, inputs: list[T | None], saved: list[T | None], fn) -> Node | None:
        return self.m.node(name, [t.val if t is not None else None for t in inputs],
                           [t.buf for t in saved if t is not None], fn)

    # ---- autocast ----------------------------------------------------------------------------
    def enter_autocast(self, esz: int) -> None:
        self.amp_esz = esz

    def exit_autocast(self) -> None:
        self.amp_esz = None
        for t in self._amp_cache.values():
            self.drop(t)
        self._amp_cache.clear()
        self.m.drop(*self._exit_drops)
        self._exit_drops.clear()

    def amp_weight(self, w: T) -> tuple[T, bool]:
        """(the weight an autocast op sees, whether it is an uncached copy the caller must drop).
        Autocast caches the cast of a leaf that requires grad for the whole autocast region
        (aten/src/ATen/autocast_mode.cpp, cached_cast); a frozen weight is cast at every use."""
        if self.amp_esz is None or w.esz == self.amp_esz:
            return w, False
        if not w.requires_grad:
            return self.cast(w, self.amp_esz), True
        key = id(w.val)
        if key not in self._amp_cache:
            self._amp_cache[key] = self.cast(w, self.amp_esz)
        return self._amp_cache[key], False

    def amp_input(self, x: T) -> tuple[T, bool]:
        """(the tensor an autocast op sees, whether it is a new cast the caller must drop)."""
        if self.amp_esz is None or x.esz == self.amp_esz:
            return x, False
        return self.cast(x, self.amp_esz), True

    # ---- elementwise and casts ----------------------------------------------------------------
    def cast(self, x: T, esz: int) -> T:
        """aten._to_copy; backward casts the gradient back (ToCopyBackward0)."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "_to_copy")]
        node = self._node("ToCopy", [x], [], bw)
        return self.new(x.numel, esz, "_to_copy", node)

    def unary(self, x: T, name: str, save_out: bool = False) -> T:
        """gelu / silu / neg style ops: out like x; backward one alloc like x.
        Saves its input (gelu, silu) or its output (save_out) or nothing (neg: ``name=='neg'``)."""

        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, name + "_backward")]
        saved = [] if name == "neg" else ([None] if save_out else [x])
        node = self._node(name, [x], saved, bw)
        out = self.new(x.numel, x.esz, name, node)
        if save_out:
            self.m.save(node, [out.buf])
        return out

    def add(self, a: T, b: T, name: str = "add") -> T:
        """a + b with broadcasting and type promotion. Backward hands the same gradient to both
        inputs; an input of another dtype gets a cast copy (engine's validate_outputs), a
        broadcast input a reduced copy (sum_to_size)."""
        numel, esz = max(a.numel, b.numel), max(a.esz, b.esz)

        def bw(m: Machine, n: Node, g: list) -> list:
            return [self._grad_like(m, n, 0, g[0], a, numel, esz),
                    self._grad_like(m, n, 1, g[0], b, numel, esz)]
        node = self._node("Add", [a, b], [], bw)
        return self.new(numel, esz, name, node)

    def _grad_like(self, m: Machine, n: Node, i: int, g: Buf | None, inp: T, numel: int,
                   esz: int) -> Buf | None:
        if n.edges[i] is None or g is None:
            return None
        if inp.numel != numel:  # broadcast input: sum_to_size allocates the reduced gradient
            return m.galloc(n, i, inp.numel * esz, "sum")
        if inp.esz != esz:
            return m.galloc(n, i, inp.numel * inp.esz, "_to_copy")
        return m.hold(g)

    def mul(self, a: T, b: T, name: str = "mul") -> T:
        """a * b. Saves b if a needs grad and a if b needs grad; backward allocates g*b and g*a
        (then a reduced copy for a broadcast input; the unreduced product is freed at node end)."""
        numel, esz = max(a.numel, b.numel), max(a.esz, b.esz)

        def bw(m: Machine, n: Node, g: list) -> list:
            # apply(): g*b and g*a at full size; then the engine reduces a broadcast input's
            # product (sum_to_size) and frees the unreduced one, output by output.
            outs: list[Buf | None] = []
            for i, inp in ((0, a), (1, b)):
                if n.edges[i] is None:
                    outs.append(None)
                elif inp.numel != numel:
                    outs.append(m.alloc(numel * esz, "mul"))
                else:
                    outs.append(m.galloc(n, i, numel * esz, "mul"))
            m.apply_returned(n)
            for i, inp in ((0, a), (1, b)):
                if outs[i] is not None and inp.numel != numel:
                    full = outs[i]
                    outs[i] = m.galloc(n, i, inp.numel * esz, "sum")
                    m.drop(full)
            return outs
        saved = [b if a.requires_grad else None, a if b.requires_grad else None]
        node = self._node("Mul", [a, b], saved, bw)
        return self.new(numel, esz, name, node)

    # ---- norms --------------------------------------------------------------------------------
    def layer_norm(self, x: T, w: T, b: T, n_rows: int, h: int, stats_esz: int = F32) -> T:
        """native_layer_norm: out like x plus fp32 mean and rstd (n_rows each), all three saved
        with the input; backward allocates grad input and grad weight and bias."""

        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "native_layer_norm_backward"),
                    m.galloc(n, 1, h * w.esz, "native_layer_norm_backward"),
                    m.galloc(n, 2, h * b.esz, "native_layer_norm_backward")]
        node = self._node("NativeLayerNorm", [x, w, b], [x], bw)
        out = self.new(x.numel, x.esz, "native_layer_norm", node)
        mean = self.m.alloc(n_rows * stats_esz, "native_layer_norm")
        rstd = self.m.alloc(n_rows * stats_esz, "native_layer_norm")
        self.m.save(node, [mean, rstd])
        self.m.drop(mean, rstd)
        return out

    def rms_norm(self, x: T, w: T, n_rows: int, h: int, eps_add: bool = True) -> T:
        """The reference RMSNorm, written out:  xf = x.float();
        y = xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps);  out = y.type_as(x) * weight."""
        m = self.m
        xf, xf_new = (x, False) if x.esz == F32 else (self.cast(x, F32), True)
        # pow(2): saves its input; backward = pow(x, 1) * 2 * g  → three allocations like x
        def pow_bw(m: Machine, n: Node, g: list) -> list:
            t1 = m.alloc(xf.numel * F32, "pow")
            t2 = m.alloc(xf.numel * F32, "mul")
            out = m.galloc(n, 0, xf.numel * F32, "mul")
            m.drop(t1, t2)
            return [out]
        sq = self.new(xf.numel, F32, "pow", self._node("Pow", [xf], [xf], pow_bw))
        # mean(-1): backward expands and divides → one allocation like x
        def mean_bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, xf.numel * F32, "div")]
        ms = self.new(n_rows, F32, "mean", self._node("Mean", [sq], [], mean_bw))
        self.drop(sq)
        # + eps: gradient passes through unchanged
        def add_bw(m: Machine, n: Node, g: list) -> list:
            return [m.hold(g[0]) if g[0] is not None else None]
        ms_eps = self.new(n_rows, F32, "add", self._node("AddScalar", [ms], [], add_bw))
        self.drop(ms)
        # rsqrt: saves its result; backward = -0.5 * g * r^3 → pow, mul, mul (n_rows each)
        def rsqrt_bw(m: Machine, n: Node, g: list) -> list:
            t1 = m.alloc(n_rows * F32, "pow")
            t2 = m.alloc(n_rows * F32, "mul")
            out = m.galloc(n, 0, n_rows * F32, "mul")
            m.drop(t1, t2)
            return [out]
        rnode = self._node("Rsqrt", [ms_eps], [], rsqrt_bw)
        r = self.new(n_rows, F32, "rsqrt", rnode)
        m.save(rnode, [r.buf])
        self.drop(ms_eps)
        y = self.mul(xf, r)
        self.drop(r)
        if xf_new:
            self.drop(xf)
        y2, y2_new = (y, False) if y.esz == x.esz else (self.cast(y, x.esz), True)
        out = self.mul(y2, w)
        if y2_new:
            self.drop(y2)
        self.drop(y)
        return out

    # ---- embeddings, attention, loss -------------------------------------------------------
    def embedding(self, w: T, idx: T, n_rows: int, h: int) -> T:
        """aten.embedding: saves the indices; backward builds a dense table gradient."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, w.numel * w.esz, "embedding_dense_backward")]
        node = self._node("Embedding", [w], [idx], bw)
        return self.new(n_rows * h, w.esz, "embedding", node)

    def sdpa(self, q: T, k: T, v: T, lse_numel: int, seed_bytes: int = 0) -> T:
        """A fused SDPA kernel (planner/step/attention.py): output like q plus an fp32
        logsumexp (B·nh·T), saved with q, k, v; ``seed_bytes``: a philox seed and offset of that
        many bytes each on the device (cuDNN's), allocated first and saved too. Backward
        allocates gradients like q, k and v."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, q.numel * q.esz, "sdpa_backward"),
                    m.galloc(n, 1, k.numel * k.esz, "sdpa_backward"),
                    m.galloc(n, 2, v.numel * v.esz, "sdpa_backward")]
        node = self._node("Sdpa", [q, k, v], [q, k, v], bw)
        seeds = [self.m.alloc(seed_bytes, "sdpa") for _ in range(2)] if seed_bytes else []
        out = self.new(q.numel, q.esz, "sdpa", node)
        lse = self.m.alloc(lse_numel * F32, "sdpa")
        self.m.save(node, [out.buf, lse, *seeds])
        self.m.drop(lse, *seeds)
        return out

    def contiguous_copy(self, x: T, name: str = "clone") -> T:
        """A copy made by reshape/contiguous of a non-contiguous view; backward passes through
        (the gradient is a view)."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.hold(g[0]) if g[0] is not None else None]
        node = self._node("Clone", [x], [], bw)
        return self.new(x.numel, x.esz, name, node)

    def scale(self, x: T) -> T:
        """x * python scalar: saves nothing; backward allocates one gradient like x."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "mul")]
        return self.new(x.numel, x.esz, "mul", self._node("MulScalar", [x], [], bw))

    def masked_fill(self, x: T, mask: T) -> T:
        """Saves the mask; backward allocates one gradient like x (where(mask, 0, g))."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "masked_fill")]
        return self.new(x.numel, x.esz, "masked_fill", self._node("MaskedFill", [x], [mask], bw))

    def softmax(self, x: T) -> T:
        """_softmax: saves its output; backward allocates one gradient like x."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "_softmax_backward_data")]
        node = self._node("Softmax", [x], [], bw)
        out = self.new(x.numel, x.esz, "_softmax", node)
        self.m.save(node, [out.buf])
        return out

    def dropout(self, x: T, device: str = "cuda") -> T:
        """Training-mode dropout. CUDA: native_dropout, output like x plus a bool mask (1 byte per
        element) saved for backward. CPU (aten::dropout's composite path): a noise tensor like x
        (empty_like + bernoulli_ + div_, in x's dtype) and ``x * noise``, which saves the noise.
        Backward allocates one gradient like x either way."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "native_dropout_backward")]
        if device == "cpu":
            noise = self.m.alloc(x.numel * x.esz, "empty_like")
            node = self._node("Mul", [x], [], bw)
            self.m.save(node, [noise])
            out = self.new(x.numel, x.esz, "mul", node)
            self.m.drop(noise)
            return out
        node = self._node("NativeDropout", [x], [], bw)
        out = self.new(x.numel, x.esz, "native_dropout", node)
        mask = self.m.alloc(x.numel, "native_dropout")
        self.m.save(node, [mask])
        self.m.drop(mask)
        return out

    def chunk2(self, x: T) -> tuple[T, T]:
        """x.chunk(2, -1): two views; backward (SplitBackward) concatenates both gradients into
        one new tensor like x."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "cat")]
        node = self.m.node("Split", [x.val], [], bw, n_out=2)
        half = x.numel // 2
        self.m.hold(x.buf)
        self.m.hold(x.buf)
        return (T(Val(x.buf, node, 0), half, x.esz), T(Val(x.buf, node, 1), half, x.esz))

    def cat2(self, a: T, b: T) -> T:
        """torch.cat: new tensor; backward hands out views of the gradient (no allocation)."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.hold(g[0]) if n.edges[0] is not None else None,
                    m.hold(g[0]) if n.edges[1] is not None else None]
        node = self._node("Cat", [a, b], [], bw)
        return self.new(a.numel + b.numel, a.esz, "cat", node)

    def cross_entropy(self, logits: T, n_rows: int, vocab: int, targets: T) -> T:
        """log_softmax (output saved, fp32) + nll_loss (scalar out, scalar total_weight saved)."""
        def ls_bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, n_rows * vocab * F32, "_log_softmax_backward_data")]
        ls_node = self._node("LogSoftmax", [logits], [], ls_bw)
        ls = self.new(n_rows * vocab, F32, "_log_softmax", ls_node)
        self.m.save(ls_node, [ls.buf])

        def nll_bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, n_rows * vocab * F32, "nll_loss_backward")]
        nll_node = self._node("NllLoss", [ls], [targets], nll_bw)
        out = self.new(1, F32, "nll_loss_forward", nll_node)
        total_weight = self.m.alloc(F32, "nll_loss_forward")
        self.m.save(nll_node, [total_weight])
        self.m.drop(total_weight)
        self.drop(ls)
        return out

    def div_scalar_tensor(self, x: T) -> T:
        """loss / accumulation steps (a 0-dim result); backward allocates a 0-dim gradient."""
        def bw(m: Machine, n: Node, g: list) -> list:
            return [m.galloc(n, 0, x.numel * x.esz, "div")]
        return self.new(x.numel, x.esz, "div", self._node("Div", [x], [], bw))
