"""The reference training step, replayed on the step simulator.

This mirrors ``service/validation/step.py`` and ``service/validation/model.py`` line by line:
the same ops in the same order, with Python references dropped where the model's code drops them.
Its result is the planner's estimate of the step's peak, by category, for the first step and for
the steady state (step 2+, optimizer states present). The accuracy tests run both and compare.
Activation checkpointing, as torch.utils.checkpoint runs it, is ``CheckpointedRegions``
(planner/step/checkpoint.py), which the program builds on.
"""

from __future__ import annotations

from planner.machine.deadline import check as check_work_limit
from planner.step.checkpoint import CheckpointedRegions, _CheckpointFrame
from planner.step.loss import chunked_loss
from planner.step.model import DTYPE_ESZ, I64, ReferenceModel, Shapes
from planner.step.ops import F32, Ops, T
from planner.catalog.specs import ResolvedModel, TrainingSpec
from planner.machine.stepsim import Leaf, Machine, Val
from planner.machine.symbolic import Undecided
from planner.step.peaks import StepPeaks, combine_peaks
from planner.step.plans import compression_plan, plan_period

# precision preset -> (parameter dtype, autocast dtype or None, fp32 master copy?, loss scaling?)
PRECISIONS: dict[str, tuple[str, str | None, bool, bool]] = {
    "fp32": ("fp32", None, False, False),
    "amp-bf16": ("fp32", "bf16", False, False),
    "amp-fp16": ("fp32", "fp16", False, True),
    "mixed-bf16": ("bf16", None, True, False),
    "mixed-fp16": ("fp16", None, True, True),
    "bf16": ("bf16", None, False, False),
}


class ReferenceProgram(CheckpointedRegions, ReferenceModel):
    """Builds the reference model's parameters on a Machine and runs steps on it."""

    # True where a subclass builds the optimizer after choosing its parameters (pipeline ranks)
    optimizer_built_later = False

    def __init__(self, model: ResolvedModel, training: TrainingSpec, *, device: str = "cuda",
                 checkpointed: set[int] | None = None,
                 optimizer_hook=None, compress: bool = True, machine: Machine | None = None,
                 sizes: tuple | None = None) -> None:
        """``machine`` and ``sizes`` (micro-batch, sequence length) replace the defaults: the
        step template (planner/step/template.py) replays with symbolic sizes on a recording
        machine. ``sizes`` may go on with the model's dimensions (h, nh, nkv, hd, f, V, P,
        nh // nkv), which then replace the model's (planner/step/structure.py)."""
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
        B, T = (sizes or (training.micro_batch_size, training.sequence_length))[:2]
        if training.loss.kind != "standard" and not isinstance(B * T, int):
            raise Undecided("chunked loss: torch.chunk's row counts round")  # before any replay
        nkv = model.num_kv_heads or model.num_heads
        self.s = Shapes(B, T, *(sizes[2:] if sizes and len(sizes) > 2 else (
            h, model.num_heads, nkv, h // model.num_heads, model.ffn_hidden_size,
            model.vocab_size, model.max_sequence_length, model.num_heads // nkv)))
        L = model.num_layers
        ck = set(checkpointed or ())
        # Homogeneous middle blocks (see compression_plan, _phantom_forward): when the checkpoint
        # plan repeats with a period of k blocks (k = 1: none or every block checkpointed;
        # every-k, sqrt), simulate the first three periods and the last two (with any
        # remainder), and account for the periods between arithmetically; long runs of blocks
        # alike inside a period likewise.
        self.real_blocks, self.phantoms = compression_plan(ck, L) if compress else (
            list(range(L)), [])
        self.period = (plan_period(ck, L) or 1) if self.phantoms else 1
        self.n_phantom = L - len(self.real_blocks)  # blocks stood in for
        self.checkpointed = {j for j, i in enumerate(self.real_blocks) if i in ck}
        self._ck_nodes: dict[int, _CheckpointFrame] = {}
        self.optimizer_hook = optimizer_hook
        self._phantom_grads: dict[int, object] = {}  # phantom -> its blocks' gradients
        self.params = self._build_params()
        o = self.ops
        self._states = None
        # run_windows: the optimizer step's windows closed before the states were made
        self._step_windows: list | None = None
        self._phantom_params = None
        if self.n_phantom:  # parameters of the blocks that are not simulated one by one
            self._phantom_params = o.m.alloc(
                self.n_phantom * sum(b for _, _, _, b in self._block_specs), "phantom blocks",
                "parameters")
        if self.master:  # fp32 master copies, made when the optimizer is built
            self.masters = o.m.alloc(sum(n for n, _ in self.trainable_specs()) * self.master_esz, "master",
                                     "optimizer_states")
        self._states_at_init = training.optimizer == "adagrad"
        if self._states_at_init and not self.optimizer_built_later:
            self._states = self._alloc_states()  # torch.optim.Adagrad fills its state in __init__
        self.idx = o.new(self.s.N, I64, "input_ids", cat="activations")
        self.tgt = o.new(self.s.N, I64, "targets", cat="activations")


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
        starts = {ph[0] for ph in self.phantoms}
        ends: dict[int, list] = {}
        for ph in self.phantoms:
            ends.setdefault(ph[1], []).append(ph)
        measured: dict[int, tuple] = {}
        for j in range(len(self.real_blocks)):
            check_work_limit()
            if j in starts:  # a phantom's window is measured
                measured[j] = (list(self.m.cur), set(o._amp_cache), len(o._exit_drops))
            xn = self.run_block(x, j, rope)
            o.drop(x)
            x = xn
            for ph in sorted(ends.get(j, ()), key=lambda ph: -ph[0]):  # inner phantoms first
                x = self._phantom_forward(x, ph, *measured[ph[0]])
        if self.tr.loss.kind != "standard":
            return chunked_loss(self, x, rope)
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
    def _phantom_forward(self, x: T, phantom: tuple[int, int, int, int], before: list[int],
                         cache_keys: set[int], exit_drops: int, key=None) -> T:
        """Stand in for the middle periods (of ``period`` blocks each; blocks 3..L-3 when every
        block is alike), or for the middle blocks of a long run inside a period (the same
        argument, with one block for a period). Every middle period runs the same ops on the
        same shapes, so it leaves the same bytes behind (``delta``, measured on the third
        period) and its own peaks are those of the third period or of the second-to-last
        shifted by a multiple of ``delta`` (and, in backward, of its gradients): the maximum
        over an arithmetic progression is at one of its ends, and both ends are simulated
        (forward: the period after the phantom; backward: the third period after it). So the
        step's peak is exact.

        The phantom holds n·delta, per category: the part only the autocast cache keeps (casts
        not saved for backward) goes at autocast exit; the rest (the activations saved for
        backward, and whatever else a period keeps to its backward: a subclass's gathered
        parameters) goes in backward, where the phantom also adds the blocks' gradients
        (``_phantom_grad_bytes``, first micro-batch) — freed first, then added, so the phantom
        never shows a state higher than its two simulated neighbours.

        ``phantom``: (first and last position of the measured window, copies, blocks; see
        ``compression_plan``); a window holding inner phantoms measures what they hold too (what
        they keep to autocast exit counts as the cache's). ``key`` names the phantom's gradients
        (default: its window; a pipeline rank keys them by stage too)."""
        m, o = self.m, self.ops
        n, blocks = phantom[2], phantom[3]
        delta = [a - b for a, b in zip(m.cur, before)]
        assert delta[1] == delta[2] == delta[4] == 0, delta  # no gradient, state or temporary
        cache_only = sum(t.buf.nbytes for k, t in o._amp_cache.items()
                         if k not in cache_keys and t.buf.refs == 1)
        cache_only += sum(b.nbytes for b in o._exit_drops[exit_drops:])
        retained = delta[3] - cache_only
        if cache_only:
            o._exit_drops.append(m.alloc(n * cache_only, "phantom blocks (autocast cache)"))
        held = [m.alloc(n * delta[0], "phantom blocks", "parameters")] if delta[0] else []
        if retained:
            held.append(m.alloc(n * retained, "phantom blocks"))
        grad_bytes = self._phantom_grad_bytes(blocks)
        key = phantom[:2] if key is None else key

        def bw(mm: Machine, node, g: list) -> list:
            mm.drop(*held)
            if key not in self._phantom_grads and grad_bytes:
                self._phantom_grads[key] = mm.alloc(grad_bytes, "phantom blocks (grads)",
                                                    "gradients")
            return [mm.hold(g[0]) if g[0] is not None else None]
        node = m.node("PhantomBlocks", [x.val], [], bw)
        self._last_phantom = (node, held, key)  # what a split backward adapts (pipeline stages)
        out = T(Val(m.hold(x.buf), node, 0), x.numel, x.esz)
        o.drop(x)  # the caller rebinds x to the phantom's output
        return out

    def _phantom_grad_bytes(self, blocks: int) -> int:
        """The gradients ``blocks`` blocks stood in for keep after backward: every trainable
        parameter's ``.grad``."""
        return blocks * sum(k for k, _, rg, _ in self._block_specs if rg) * self.g_esz

    def _drop_phantom_grads(self) -> None:
        self.m.drop(*self._phantom_grads.values())
        self._phantom_grads.clear()

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
        self._drop_phantom_grads()

    def _alloc_states(self):
        from planner.catalog.optimizers import optimizer_state_bytes

        specs = self.trainable_specs()
        inner_dtype = "fp32" if self.master else {4: "fp32", 2: "bf16"}[self.p_esz]
        return self.m.alloc(optimizer_state_bytes(
            self.tr, [n for n, _ in specs], inner_dtype, [shp for _, shp in specs],
            device="cpu" if self.device == "cpu" else "cuda"), "optimizer_state", "optimizer_states")

    def optimizer_step(self, first: bool) -> None:
        """``optimizer.step()`` then ``zero_grad(set_to_none=True)``, as planner/catalog/optimizers.py
        counts torch.optim's states and in-step temporaries."""
        from planner.catalog.optimizers import optimizer_step_temporary_bytes

        m, tr = self.m, self.tr
        specs = self.trainable_specs()
        numels = [n for n, _ in specs]
        shapes = [shp for _, shp in specs]
        inner_dtype = "fp32" if self.master else {4: "fp32", 2: "bf16"}[self.p_esz]
        scratch = []
        if self.master and self.g_esz != self.master_esz:  # master.grad = p.grad.float(), at once
            if getattr(m, "expand", None) is None:
                # one tensor per parameter, all made before any is freed: the live bytes only
                # rise until the last, so one buffer of their sum has the same highest row
                # (same op, same phase); an allocator's replay takes them one by one
                scratch.append(m.alloc(sum(numels) * self.master_esz, "_to_copy"))
            else:
                scratch += [m.alloc(n * self.master_esz, "_to_copy") for n in numels]
        if self.scaling and not self.master:  # GradScaler.unscale_: found_inf (fp32 scalar)
            scratch += [m.alloc(4, "full")]
        if self.scaling and self.master:
            self.overflow_check(numels)
            if first and self._states is None and self._step_windows is not None:
                # the check ran before the states exist, in a steady step after: its own window
                self._step_windows.append(m.peak)
                m.reset_peak()
        if first and self._states is None:
            self._states = self._alloc_states()
        tmp = m.alloc(optimizer_step_temporary_bytes(tr, numels, inner_dtype, shapes), "optimizer_step")
        m.drop(tmp, *scratch)
        self.zero_grad()

    def overflow_check(self, numels: list[int]) -> None:
        """The master-weight optimizer's overflow check under a static loss scale (mixed-fp16),
        after the fp32 gradients are unscaled in place: ``torch.isfinite(g).all()`` per gradient.
        isfinite is composite, ``(g == g) * (g.abs() != inf)``, its temporaries live to the end of
        the expression: abs like g, then ne, eq and their product (bool, 1 byte per element);
        then ``all()`` (1 byte) while the product lives. Every gradient's check starts from the
        same live bytes, so the first of the largest stands for all of them
        (planner/catalog/optimizers.py: ``overflow_check_temporary_bytes``)."""
        if not numels:
            return
        m, n = self.m, max(numels)
        tmp = [m.alloc(n * self.master_esz, "abs"), m.alloc(n, "ne"), m.alloc(n, "eq")]
        prod = m.alloc(n, "mul")
        m.drop(*tmp)
        flag = m.alloc(1, "all")
        m.drop(prod, flag)

    def run(self) -> StepPeaks:
        """Simulate one training step; derive the first-step and steady-state peaks."""
        fb, steps, act, combine = self.run_windows()
        return combine_peaks(fb, steps, act, act_max=self.m.act_max, **combine)

    def run_windows(self):
        """The step's peak windows: each micro-batch's forward+backward (the first two: micro-batch
        2+ all look alike, gradients exist), the optimizer step (one window, or two when part of
        it runs before step 1 makes the optimizer states: that part, then the rest), and the
        activation peak; plus what ``combine_peaks`` needs besides them."""
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
        self._step_windows = []
        self.optimizer_step(first=True)
        step_peaks = [*self._step_windows, m.peak]
        self._step_windows = None
        m.phase = "other"
        # States made during step 1's optimizer.step() are live through every later step;
        # Adagrad's exist from construction, so step 1 already had them.
        states = 0 if self._states_at_init else self._states.nbytes
        return fb_peaks, step_peaks, m.act_peak, {
            "states": states, "amp_scaler": bool(self.scaling and not self.master)}
