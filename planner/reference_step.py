"""The reference training step, replayed on the step simulator.

This mirrors ``service/validation/step.py`` and ``service/validation/model.py`` line by line:
the same ops in the same order, with Python references dropped where the model's code drops them.
Its result is the planner's estimate of the step's peak, by category, for the first step and for
the steady state (step 2+, optimizer states present). The accuracy tests run both and compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.precision import tensor_bytes
from planner.reference_ops import F32, Ops, T
from planner.specs import ResolvedModel, TrainingSpec
from planner.stepsim import Leaf, Machine, PeakSnap, Val

DTYPE_ESZ = {"fp32": 4, "bf16": 2, "fp16": 2}
_LINEARS = {"q", "k", "v", "o", "up", "gate", "down"}
I64 = 8

# precision preset -> (parameter dtype, autocast dtype or None, fp32 master copy?, loss scaling?)
PRECISIONS: dict[str, tuple[str, str | None, bool, bool]] = {
    "fp32": ("fp32", None, False, False),
    "amp-bf16": ("fp32", "bf16", False, False),
    "amp-fp16": ("fp32", "fp16", False, True),
    "mixed-bf16": ("bf16", None, True, False),
    "mixed-fp16": ("fp16", None, True, True),
    "bf16": ("bf16", None, False, False),
}


@dataclass
class Shapes:
    B: int
    T: int
    h: int
    nh: int
    nkv: int
    hd: int
    f: int
    V: int
    P: int  # learned positions (gpt2)

    @property
    def N(self) -> int:  # rows of every (B·T, ·) matmul
        return self.B * self.T


class StepPeaks:
    """A step's peaks. ``act_peak`` (highest activations + temporaries in forward/backward) may
    be given as a function, evaluated when first read (only sharded layouts read it)."""

    __slots__ = ("first", "steady", "forward_peak", "_act", "notes")

    def __init__(self, first: PeakSnap, steady: PeakSnap, forward_peak: PeakSnap | None = None,
                 act_peak: "PeakSnap | Callable[[], PeakSnap] | None" = None,
                 notes: list[str] | None = None) -> None:
        self.first, self.steady, self.forward_peak = first, steady, forward_peak
        self._act, self.notes = act_peak, notes or []

    @property
    def act_peak(self) -> PeakSnap | None:
        if callable(self._act):
            self._act = self._act()
        return self._act


class _StopRecompute(Exception):
    pass


@dataclass
class _CheckpointFrame:
    fn: object  # re-runs the checkpointed region
    input_bufs: list
    packs: list
    done: bool = False
    pending: int = 0  # packed nodes still to run in backward


@dataclass
class _Params:
    tensors: list[T]  # registration order
    by_name: dict[str, T]


class ReferenceProgram:
    """Builds the reference model's parameters on a Machine and runs steps on it."""

    def __init__(self, model: ResolvedModel, training: TrainingSpec, *, device: str = "cuda",
                 checkpointed: set[int] | None = None,
                 optimizer_hook=None, compress: bool = True, machine: Machine | None = None,
                 sizes: tuple | None = None) -> None:
        """``machine`` and ``sizes`` (micro-batch, sequence length) replace the defaults: the
        step template (planner/step_template.py) replays with symbolic sizes on a recording
        machine."""
        self.cfg, self.tr, self.device = model, training, device
        self.m = machine or Machine()
        self.ops = Ops(self.m)
        pdt, amp, master, scaling = PRECISIONS[training.precision]
        ov = training.precision_overrides
        if ov is not None and ov.parameters in DTYPE_ESZ:
            pdt = ov.parameters
        self.p_esz = DTYPE_ESZ[pdt]
        # .grad dtype (fp32 gradient accumulation on 16-bit parameters: param.grad_dtype)
        self.g_esz = DTYPE_ESZ[ov.gradients] if ov is not None and ov.gradients in DTYPE_ESZ \
            else self.p_esz
        self.master_esz = DTYPE_ESZ[ov.master_weights] if ov is not None and \
            ov.master_weights in DTYPE_ESZ else F32
        self.amp_esz = DTYPE_ESZ[amp] if amp else None
        self.master, self.scaling = master, scaling
        self.act_esz = self.amp_esz or self.p_esz
        h = model.hidden_size
        B, T = sizes or (training.micro_batch_size, training.sequence_length)
        self.s = Shapes(B, T, h, model.num_heads,
                        model.num_kv_heads or model.num_heads, h // model.num_heads,
                        model.ffn_hidden_size, model.vocab_size, model.max_sequence_length)
        L = model.num_layers
        ck = set(checkpointed or ())
        # Homogeneous middle blocks (see _phantom_forward): simulate blocks 0, 1, 2, L-2, L-1 and
        # account for blocks 3..L-3 arithmetically, when the checkpoint pattern is uniform.
        uniform = not ck or ck == set(range(L))
        self.n_phantom = L - 5 if compress and uniform and L >= 7 else 0
        self.real_blocks = [0, 1, 2, L - 2, L - 1] if self.n_phantom else list(range(L))
        self.checkpointed = {j for j, i in enumerate(self.real_blocks) if i in ck}
        self._ck_nodes: dict[int, _CheckpointFrame] = {}
        self.optimizer_hook = optimizer_hook
        self._phantom_grad = None
        self.params = self._build_params()
        o = self.ops
        self._states = None
        if self.n_phantom:  # parameters of the blocks that are not simulated one by one
            o.m.alloc(self.n_phantom * sum(b for _, _, _, b in self._block_specs),
                      "phantom blocks", "parameters")
        if self.master:  # fp32 master copies, made when the optimizer is built
            self.masters = o.m.alloc(sum(n for n, _ in self.trainable_specs()) * self.master_esz, "master",
                                     "optimizer_states")
        self._states_at_init = training.optimizer == "adagrad"
        if self._states_at_init:  # torch.optim.Adagrad fills its state in __init__
            self._states = self._alloc_states()
        self.idx = o.new(self.s.N, I64, "input_ids", cat="activations")
        self.tgt = o.new(self.s.N, I64, "targets", cat="activations")

    # ---- parameters (registration order of service.validation.model.Transformer) ----------------
    def _build_params(self) -> _Params:
        c, s, o, e = self.cfg, self.s, self.ops, self.p_esz
        lora = self.tr.lora
        base_rg = lora is None
        base_dtype = lora.base_dtype if lora is not None else None
        tensors: list[T] = []
        by: dict[str, T] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        # (numel, shape, trainable) of every parameter of the whole model, in registration order
        self.param_specs: list[tuple[int, tuple[int, ...], bool]] = []
        self._block_specs: list[tuple[int, tuple[int, ...], bool]] = []
        sim = {i: j for j, i in enumerate(self.real_blocks)}
        cur: list[int | None] = [None]  # the block being declared (None: not a block)

        def p(name: str, numel: int, rg: bool = True, shape: tuple[int, ...] | None = None,
              lora: bool = False) -> T | None:
            trainable = lora or (rg and base_rg)
            esz, quant = e, None
            if base_dtype and not lora and name.split(".")[1:] and name.split(".")[-2] in _LINEARS \
                    and name.endswith(".w"):
                if base_dtype in DTYPE_ESZ:
                    esz = DTYPE_ESZ[base_dtype]
                else:  # int8 / nf4: stored quantized, dequantized to the compute dtype per use
                    quant = tensor_bytes(numel, base_dtype, rows=(shape or (numel,))[0])
            nbytes = quant if quant is not None else numel * esz
            spec = (numel, shape or (numel,), trainable, nbytes)
            self.param_specs.append(spec)
            if cur[0] == 3 and self.n_phantom:
                self._block_specs.append(spec)
            if cur[0] is not None and cur[0] not in sim:
                return None
            if cur[0] is not None:
                name = f"b{sim[cur[0]]}." + name.split(".", 1)[1]
            if quant is not None:
                t = T(Val(o.m.alloc(quant, name, "parameters"), None), numel, self.act_esz)
                t.quantized = True
            else:
                t = o.param(numel, esz, name, requires_grad=spec[2],
                            grad_esz=self.g_esz if self.g_esz != esz and spec[2] else None)
            tensors.append(t)
            by[name] = t
            self.shapes[id(t.val)] = spec[1]
            return t
        kv = s.nkv * s.hd
        gpt2 = c.family == "gpt2"
        p("tok_emb", s.V * s.h, shape=(s.V, s.h))
        if gpt2:
            p("pos_emb", s.P * s.h, shape=(s.P, s.h))
        for i in range(c.num_layers):
            cur[0] = i
            pre = f"b{i}."
            p(pre + "norm1.w", s.h)
            if gpt2:
                p(pre + "norm1.b", s.h)
            for nm, (din, dout) in (("q", (s.h, s.h)), ("k", (s.h, kv)), ("v", (s.h, kv)),
                                    ("o", (s.h, s.h))):
                p(pre + nm + ".w", din * dout, shape=(dout, din))
                if gpt2:
                    p(pre + nm + ".b", dout)
            p(pre + "norm2.w", s.h)
            if gpt2:
                p(pre + "norm2.b", s.h)
                p(pre + "up.w", s.h * s.f, shape=(s.f, s.h))
                p(pre + "up.b", s.f)
                p(pre + "down.w", s.f * s.h, shape=(s.h, s.f))
                p(pre + "down.b", s.h)
            else:
                p(pre + "gate.w", s.h * s.f, shape=(s.f, s.h))
                p(pre + "up.w", s.h * s.f, shape=(s.f, s.h))
                p(pre + "down.w", s.f * s.h, shape=(s.h, s.f))
            if lora is not None:
                self._lora_params(i, p)
        cur[0] = None
        p("norm_f.w", s.h)
        if gpt2:
            p("norm_f.b", s.h)
        if not c.tie_embeddings:
            p("lm_head.w", s.V * s.h, shape=(s.V, s.h))
        else:
            by["lm_head.w"] = by["tok_emb"]
        if not gpt2:  # rotary tables: fp32 buffers (max_len, head_dim) — counted as parameters
            for nm in ("rope_cos", "rope_sin"):
                by[nm] = o.param(s.P * s.hd, F32, nm, requires_grad=False)
        return _Params(tensors, by)

    def _lora_params(self, i: int, p) -> None:
        """Adapters of block i (trainable even though the base is frozen)."""
        lora = self.tr.lora
        s = self.s
        kv = s.nkv * s.hd
        dims = {"q": (s.h, s.h), "k": (s.h, kv), "v": (s.h, kv), "o": (s.h, s.h),
                "up": (s.h, s.f), "down": (s.f, s.h), "gate": (s.h, s.f)}
        if self.cfg.family == "gpt2":
            dims.pop("gate")
        for nm in ("q", "k", "v", "o", "gate", "up", "down"):
            if nm in dims and nm in lora.target_modules:
                din, dout = dims[nm]
                for suffix, shape in (("lora_a", (lora.rank, din)), ("lora_b", (dout, lora.rank))):
                    p(f"b{i}.{nm}.{suffix}", shape[0] * shape[1], shape=shape, lora=True)

    def trainable(self) -> list[T]:
        return [t for t in self.params.tensors if t.val.fn is not None]

    def trainable_specs(self) -> list[tuple[int, tuple[int, ...]]]:
        """(numel, shape) of every trainable parameter of the whole model, in order."""
        return [(n, shp) for n, shp, rg, _ in self.param_specs if rg]

    # ---- forward --------------------------------------------------------------------------------
    def linear(self, x: T, name: str, din: int, dout: int) -> T:
        o, by = self.ops, self.params.by_name
        w, b = by[name + ".w"], by.get(name + ".b")
        out = o.linear(x, w, b, self.s.N, din, dout)
        lora_a = by.get(name + ".lora_a")
        if lora_a is None:
            return out
        r = self.tr.lora.rank
        a = o.linear(x, lora_a, None, self.s.N, din, r)
        bb = o.linear(a, by[name + ".lora_b"], None, self.s.N, r, dout)
        o.drop(a)
        sc = o.scale(bb)
        o.drop(bb)
        y = o.add(out, sc)
        o.drop(out, sc)
        return y

    def attn(self, x: T, i: int, rope: tuple[T, T] | None) -> T:
        o, s = self.ops, self.s
        kv = s.nkv * s.hd
        pre = f"b{i}."
        q = self.linear(x, pre + "q", s.h, s.h)
        k = self.linear(x, pre + "k", s.h, kv)
        v = self.linear(x, pre + "v", s.h, kv)
        if rope is not None:
            q2, k2 = self.apply_rope(q, rope), self.apply_rope(k, rope)
            o.drop(q, k)
            q, k = q2, k2
        core = lambda: self.attn_core(q, k, v)  # noqa: E731
        if self.tr.activation_checkpointing.strategy == "selective":
            y4 = self._checkpoint(core, [q, k, v])  # Megatron's core-attention recompute
        else:
            y4 = core()  # (B, nh, T, hd)
        if self.tr.attention == "sdpa":
            y = y4  # the flash kernel's output is already (B, T, nh, hd) in memory: no copy
        else:
            y = o.contiguous_copy(y4)
            o.drop(y4)
        out = self.linear(y, pre + "o", s.h, s.h)
        o.drop(y, q, k, v)
        return out

    def attn_core(self, q: T, k: T, v: T) -> T:
        """CausalSelfAttention._core: softmax(q k^T / sqrt(hd)) v, (B, nh, T, hd)."""
        o, s = self.ops, self.s
        if self.tr.attention == "sdpa":
            return o.sdpa(q, k, v, s.B * s.nh * s.T)
        gqa = s.nkv != s.nh
        if gqa:  # repeat_interleave = expand + copy; backward sums over the group
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            qc = o.contiguous_copy(q)
            kt = o.view(k)  # a transposed view bmm takes as is
        else:
            qc = o.contiguous_copy(q)
            kt = o.contiguous_copy(k)
        att_numel = s.B * s.nh * s.T * s.T
        sc = o.bmm(qc, kt, att_numel)
        o.drop(qc, kt)
        att = o.scale(sc)
        o.drop(sc)
        ones = o.new(s.T * s.T, 1, "ones")
        mask = o.new(s.T * s.T, 1, "tril")
        o.drop(ones)
        notmask = o.new(s.T * s.T, 1, "bitwise_not")
        att2 = o.masked_fill(att, notmask)
        o.drop(notmask, att)
        p = o.softmax(att2)
        o.drop(att2)
        vc = o.view(v) if gqa else o.contiguous_copy(v)
        y4 = o.bmm(p, vc, s.N * s.h)
        o.drop(vc, p, mask)
        if gqa:
            o.drop(k, v)
        return y4

    def _repeat_kv(self, x: T) -> T:
        o, s = self.ops, self.s
        rep_numel = x.numel * (s.nh // s.nkv)

        def bw(m, n, g):
            return [m.galloc(n, 0, x.numel * x.esz, "sum")]
        return o.new(rep_numel, x.esz, "clone", o._node("RepeatInterleave", [x], [], bw))

    def apply_rope(self, x: T, rope: tuple[T, T]) -> T:
        o = self.ops
        cos, sin = rope
        x1, x2 = o.chunk2(x)
        nx2 = o.unary(x2, "neg")
        rot = o.cat2(nx2, x1)
        o.drop(nx2)
        a = o.mul(x, cos)
        b = o.mul(rot, sin)
        out = o.add(a, b)
        o.drop(a, b, rot, x1, x2)
        return out

    def norm(self, x: T, name: str) -> T:
        by = self.params.by_name
        if self.cfg.family == "gpt2":
            return self.ops.layer_norm(x, by[name + ".w"], by[name + ".b"], self.s.N, self.s.h,
                                       stats_esz=self._ln_stats_esz(x))
        return self.ops.rms_norm(x, by[name + ".w"], self.s.N, self.s.h)

    def _ln_stats_esz(self, x: T) -> int:
        # CPU kernels keep mean/rstd in the input dtype, CUDA kernels in fp32.
        return x.esz if self.device == "cpu" else F32

    def mlp(self, x: T, i: int) -> T:
        o, s = self.ops, self.s
        pre = f"b{i}."
        if self.cfg.family == "gpt2":
            u = self.linear(x, pre + "up", s.h, s.f)
            g = o.unary(u, "gelu")
            o.drop(u)
            out = self.linear(g, pre + "down", s.f, s.h)
            o.drop(g)
            return out
        gt = self.linear(x, pre + "gate", s.h, s.f)
        sg = o.unary(gt, "silu")
        o.drop(gt)
        u = self.linear(x, pre + "up", s.h, s.f)
        prod = o.mul(sg, u)
        o.drop(sg, u)
        out = self.linear(prod, pre + "down", s.f, s.h)
        o.drop(prod)
        return out

    def maybe_dropout(self, x: T) -> T:
        if self.tr.dropout > 0:
            return self.ops.dropout(x, self.device)
        return self.ops.view(x)

    def block(self, x: T, i: int, rope: tuple[T, T] | None) -> T:
        o = self.ops
        n1 = self.norm(x, f"b{i}.norm1")
        a = self.attn(n1, i, rope)
        o.drop(n1)
        ad = self.maybe_dropout(a)
        o.drop(a)
        x1 = o.add(x, ad)
        o.drop(ad)
        n2 = self.norm(x1, f"b{i}.norm2")
        mo = self.mlp(n2, i)
        o.drop(n2)
        md = self.maybe_dropout(mo)
        o.drop(mo)
        x2 = o.add(x1, md)
        o.drop(md, x1)
        return x2

    def head(self, x: T) -> T:
        """Final norm and output projection; takes over ``x``. The norm's output lives on only
        where saved for backward."""
        o, s = self.ops, self.s
        xf = self.norm(x, "norm_f")
        o.drop(x)
        logits = self.linear(xf, "lm_head", s.h, s.V)
        o.drop(xf)
        return logits

    def embed(self) -> T:
        """Token embedding, plus learned positions for gpt2 (Transformer.forward's first lines)."""
        o, s, by = self.ops, self.s, self.params.by_name
        x = o.embedding(by["tok_emb"], self.idx, s.N, s.h)
        if self.cfg.family == "gpt2":
            pos = o.new(s.T, I64, "arange")
            pe = o.embedding(by["pos_emb"], pos, s.T, s.h)
            o.drop(pos)
            x2 = o.add(x, pe)
            o.drop(x, pe)
            x = x2
        return x

    def rope(self) -> tuple[T, T] | None:
        """model.rope_for: the rotary tables' first T rows, cast once to the activation dtype (a
        view of the fp32 buffers when no cast is needed); None for gpt2."""
        if self.cfg.family == "gpt2":
            return None
        o, s, by = self.ops, self.s, self.params.by_name
        if self.act_esz != F32:
            rope = (o.new(s.T * s.hd, self.act_esz, "_to_copy"),
                    o.new(s.T * s.hd, self.act_esz, "_to_copy"))
        else:
            rope = (o.view(by["rope_cos"]), o.view(by["rope_sin"]))
        for t in rope:
            t.numel = s.T * s.hd
        return rope

    def forward_loss(self) -> T:
        o, s = self.ops, self.s
        if self.amp_esz is not None:
            o.enter_autocast(self.amp_esz)
        x = self.embed()
        rope = self.rope()
        if self.tr.dropout > 0:
            xd = o.dropout(x, self.device)
            o.drop(x)
            x = xd
        for j in range(len(self.real_blocks)):
            if self.n_phantom and j == 2:
                before, keys = list(self.m.cur), set(o._amp_cache)
            xn = self.run_block(x, j, rope)
            o.drop(x)
            x = xn
            if self.n_phantom and j == 2:
                x = self._phantom_forward(x, before, keys)
        logits = self.head(x)
        # Transformer.forward returns: its locals (the rotary tables) live on only where saved.
        if rope is not None:
            o.drop(*rope)
        lf = o.cast(logits, F32) if logits.esz != F32 else o.view(logits)
        nll = o.cross_entropy(lf, s.N, s.V, self.tgt)
        o.drop(lf)
        if self.amp_esz is not None:
            o.exit_autocast()
        loss = o.div_scalar_tensor(nll)
        o.drop(logits, nll)
        return loss

    # ---- homogeneous middle blocks ------------------------------------------------------------
    def _phantom_forward(self, x: T, before: list[int], cache_keys: set[int]) -> T:
        """Stand in for blocks 3..L-3. Every middle block runs the same ops on the same shapes, so
        it leaves the same bytes behind (``delta``, measured on block 2) and its own peaks are
        those of block 2 or block L-2 shifted by a multiple of ``delta``: the maximum over an
        arithmetic progression is at one of its ends, and both ends are simulated (forward:
        block L-2 after the phantom; backward: block 2 after it). So the step's peak is exact.

        The phantom holds n·delta: the part only the autocast cache keeps (casts not saved for
        backward) goes at autocast exit; the rest goes in backward, where the phantom also adds
        the blocks' gradients (first micro-batch) — freed first, then added, so the phantom
        never shows a state higher than its two simulated neighbours."""
        m, o, n = self.m, self.ops, self.n_phantom
        delta = [a - b for a, b in zip(m.cur, before)]
        assert delta[0] == delta[1] == delta[2] == 0, delta
        cache_only = sum(t.buf.nbytes for k, t in o._amp_cache.items()
                         if k not in cache_keys and t.buf.refs == 1)
        retained = delta[3] - cache_only
        if cache_only:
            o._exit_drops.append(m.alloc(n * cache_only, "phantom blocks (autocast cache)"))
        held = m.alloc(n * retained, "phantom blocks") if retained else None
        grad_bytes = n * sum(k for k, _, rg, _ in self._block_specs if rg) * self.g_esz

        def bw(mm: Machine, node, g: list) -> list:
            mm.drop(held)
            if self._phantom_grad is None and grad_bytes:
                self._phantom_grad = mm.alloc(grad_bytes, "phantom blocks (grads)", "gradients")
            return [mm.hold(g[0]) if g[0] is not None else None]
        node = m.node("PhantomBlocks", [x.val], [], bw)
        out = T(Val(m.hold(x.buf), node, 0), x.numel, x.esz)
        o.drop(x)  # the caller rebinds x to the phantom's output
        return out

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
            for b in bufs:
                target.saved.append(m.hold(b))
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

    # ---- backward, optimizer, steps ----------------------------------------------------------
    def backward(self, loss: T) -> None:
        o, m = self.ops, self.m
        root = loss
        scaled = None
        if self.scaling and not self.master:  # amp-fp16: GradScaler.scale(loss) = loss * scale
            if not getattr(self, "_scaler_state", None):
                # the scale (fp32) and growth tracker (int32), created on first use, kept
                self._scaler_state = [m.alloc(4, "full", "temporaries"), m.alloc(4, "full", "temporaries")]
            scaled = o.mul(loss, T(type(loss.val)(self._scaler_state[0]), 1, 4))
            root = scaled
        elif self.scaling:  # mixed-fp16: static loss scale, loss * python float
            scaled = o.scale(loss)
            root = scaled
        g = m.alloc(root.numel * root.esz, "ones_like")
        m.hold(g)  # torch keeps the root gradient alive until backward() returns
        m.backward(root.val, g, before_node=self._before_node if self._ck_nodes else None,
                   after_node=self._after_node if self._ck_nodes else None)
        self._ck_nodes.clear()
        m.drop(g)
        o.drop(scaled)

    def zero_grad(self) -> None:
        for t in self.trainable():
            leaf = t.val.fn
            if isinstance(leaf, Leaf) and leaf.grad is not None:
                self.m.drop(leaf.grad)
                leaf.grad = None
        if self._phantom_grad is not None:
            self.m.drop(self._phantom_grad)
            self._phantom_grad = None

    def _alloc_states(self):
        from planner.optimizers import optimizer_state_bytes

        specs = self.trainable_specs()
        inner_dtype = "fp32" if self.master else {4: "fp32", 2: "bf16"}[self.p_esz]
        return self.m.alloc(optimizer_state_bytes(
            self.tr, [n for n, _ in specs], inner_dtype, [shp for _, shp in specs],
            device="cpu" if self.device == "cpu" else "cuda"), "optimizer_state", "optimizer_states")

    def optimizer_step(self, first: bool) -> None:
        """``optimizer.step()`` then ``zero_grad(set_to_none=True)``, as planner/optimizers.py
        counts torch.optim's states and in-step temporaries."""
        from planner.optimizers import optimizer_step_temporary_bytes

        m, tr = self.m, self.tr
        specs = self.trainable_specs()
        numels = [n for n, _ in specs]
        shapes = [shp for _, shp in specs]
        inner_dtype = "fp32" if self.master else {4: "fp32", 2: "bf16"}[self.p_esz]
        scratch = []
        if self.master and self.g_esz != self.master_esz:  # master.grad = p.grad.float(), at once
            scratch += [m.alloc(n * self.master_esz, "_to_copy") for n in numels]
        if self.scaling and not self.master:  # GradScaler.unscale_: found_inf (fp32 scalar)
            scratch += [m.alloc(4, "full")]
        if first and self._states is None:
            self._states = self._alloc_states()
        tmp = m.alloc(optimizer_step_temporary_bytes(tr, numels, inner_dtype, shapes), "optimizer_step")
        m.drop(tmp, *scratch)
        self.zero_grad()

    def run(self) -> StepPeaks:
        """Simulate one training step; derive the first-step and steady-state peaks."""
        fb, step, act, combine = self.run_windows()
        return combine_peaks(fb, step, act, **combine)

    def run_windows(self):
        """The step's peak windows: each micro-batch's forward+backward (the first two: micro-batch
        2+ all look alike, gradients exist), the optimizer step, and the activation peak; plus
        what ``combine_peaks`` needs besides them."""
        m = self.m
        accum = self.tr.gradient_accumulation_steps
        m.reset_peak()
        fb_peaks = []
        for micro in range(min(accum, 2)):
            m.phase = "forward"
            loss = self.forward_loss()
            m.phase = "backward"
            self.backward(loss)
            self.ops.drop(loss)
            fb_peaks.append(m.peak)
            m.reset_peak()
        m.phase = "optimizer"
        self.optimizer_step(first=True)
        step_peak = m.peak
        m.phase = "other"
        # States made during step 1's optimizer.step() are live through every later step;
        # Adagrad's exist from construction, so step 1 already had them.
        states = 0 if self._states_at_init else self._states.nbytes
        return fb_peaks, step_peak, m.act_peak, {
            "states": states, "amp_scaler": bool(self.scaling and not self.master)}


def combine_peaks(fb_peaks: list[PeakSnap], step_peak: PeakSnap, act_peak, *,
                  states: int, amp_scaler: bool) -> StepPeaks:
    """A steady-state step (2+) repeats step 1's forward and backward exactly, with the optimizer
    states (allocated during step 1's ``optimizer.step()``) live throughout; so one simulated
    forward/backward serves both: steady peak = max(fwd/bwd peak + states, step peak)."""
    fwdbwd = fb_peaks[0]
    for p in fb_peaks[1:]:  # the first of the highest
        if p.total > fwdbwd.total:
            fwdbwd = p
    first = step_peak if step_peak.total > fwdbwd.total else fwdbwd
    # GradScaler's scale and growth tracker are created in step 1's backward and persist.
    scaler = 8 if amp_scaler and fwdbwd.phase == "forward" else 0
    by = list(fwdbwd.by_cat)
    by[2] += states
    by[4] += scaler
    shifted = PeakSnap(fwdbwd.total + states + scaler, by, fwdbwd.op, fwdbwd.phase)
    steady = step_peak if step_peak.total > shifted.total else shifted
    return StepPeaks(first=first, steady=steady, forward_peak=fwdbwd, act_peak=act_peak)
