"""The reference model, as the step simulator sees it: its parameters and its forward.

``ReferenceModel`` mirrors ``service/validation/model.py`` line by line: parameters in the
Transformer's registration order (frozen base, LoRA adapters, quantized weights), and each
forward piece (embedding, attention in its SDPA and eager forms, RoPE, norms, MLP, dropout, the
head) as the ops the model's code runs, with Python references dropped where that code drops
them. The step itself (forward and loss, checkpointing, backward, optimizer, the peaks) is
``ReferenceProgram`` in planner/step/program.py, which builds on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.catalog.precision import tensor_bytes
from planner.step.attention import SEED_BYTES, cuda_amp_softmax, sdpa_backend, sdpa_math
from planner.step.ops import F32, T
from planner.machine.stepsim import Val

DTYPE_ESZ = {"fp32": 4, "bf16": 2, "fp16": 2}
_LINEARS = {"q", "k", "v", "o", "up", "gate", "down"}
I64 = 8


@dataclass(frozen=True)
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
    g: int = 1  # query heads per key/value head (nh // nkv)
    N: int = field(init=False, repr=False, compare=False)  # B·T

    def __post_init__(self) -> None:
        # rows of every (B·T, ·) matmul: a product of polynomials in a template's compile,
        # read at every matmul, so made once
        object.__setattr__(self, "N", self.B * self.T)


@dataclass
class _Params:
    tensors: list[T]  # registration order
    by_name: dict[str, T]



class ReferenceModel:
    """The model half of ReferenceProgram: expects ``cfg``, ``tr``, ``device``, ``ops``, ``s``
    (Shapes), ``real_blocks``, ``n_phantom``, ``p_esz``, ``g_esz``, ``act_esz`` and
    ``checkpointed`` set by the program, and ``_checkpoint`` from it."""

    # The SDPA backend, one of planner.step.attention.BACKENDS; None: the device's choice. An
    # internal knob: the tests replay the math backend on CPU (torch's sdpa_kernel(MATH)).
    sdpa_kernel: str | None = None

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
        # the blocks whose tensors are made: the simulated ones (a pipeline rank: those of its
        # stages, ``built_blocks``); the others are declared (``param_specs``) only
        keep = getattr(self, "built_blocks", None)
        built = sim if keep is None else {i for i in sim if i in keep}
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
            if self.n_phantom and cur[0] == 3 * self.period:  # the first block stood in for
                self._block_specs.append(spec)
            if cur[0] is not None and cur[0] not in built:
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
        # every block declares the same specs: a block that is not simulated declares none of
        # its tensors, so after the first such block the rest of a run of them is its specs
        # repeated (the list's own C loop; a 1024-layer model has ~16k parameters)
        unsimulated: list | None = None
        head = len(self.param_specs)
        i = 0
        while i < c.num_layers:
            if i not in built and unsimulated is not None:
                j = i
                while j < c.num_layers and j not in built:
                    j += 1
                if self.n_phantom and i <= 3 * self.period < j:  # the first block stood in for
                    self._block_specs.extend(unsimulated)
                self.param_specs.extend(unsimulated * (j - i))
                i = j
                continue
            first = len(self.param_specs)
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
            if i not in built:
                unsimulated = self.param_specs[first:]
            if i == 0:  # (specs before the blocks, specs per block): every block declares alike
                self._spec_layout = (head, len(self.param_specs) - head)
            i += 1
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
        """(numel, shape) of every trainable parameter (``_trainable_rows``), in order: one list,
        kept while ``param_specs`` stays as built (callers read it, never change it)."""
        specs = self.param_specs
        memo = self.__dict__.get("_trainable_memo")
        if memo is None or memo[0] is not specs or memo[1] != len(specs):
            memo = self._trainable_memo = (specs, len(specs), self._trainable_rows(specs))
        return memo[2]

    def _trainable_rows(self, specs: list) -> list[tuple[int, tuple[int, ...]]]:
        return [(n, shp) for n, shp, rg, _ in specs if rg]  # the whole model's

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
        if self.tr.attention == "sdpa" and self._sdpa_backend(q) != "math":
            y = y4  # a fused kernel's output is already (B, T, nh, hd) in memory: no copy
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
            backend = self._sdpa_backend(q)
            if backend == "math":
                return sdpa_math(self, q, k, v)
            return o.sdpa(q, k, v, s.B * s.nh * s.T, SEED_BYTES if backend == "cudnn" else 0)
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
        if self.device != "cpu" and o.amp_esz is not None and att2.esz != F32:
            p = cuda_amp_softmax(self, att2)
        else:
            p = o.softmax(att2)
        o.drop(att2)
        # under autocast, matmul casts an fp32 (CUDA softmax) operand back to half first
        pc, p_new = o.amp_input(p)
        vc = o.view(v) if gqa else o.contiguous_copy(v)
        y4 = o.bmm(pc, vc, s.N * s.h)
        o.drop(pc if p_new else None)
        o.drop(vc, p, mask)
        if gqa:
            o.drop(k, v)
        return y4

    def _sdpa_backend(self, q: T) -> str:
        return sdpa_backend(self.device, q.esz, self.s.nkv != self.s.nh, self.sdpa_kernel)

    def _repeat_kv(self, x: T) -> T:
        o, s = self.ops, self.s
        rep_numel = x.numel * s.g

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
