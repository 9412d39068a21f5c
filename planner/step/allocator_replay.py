"""The reference step on a CUDA device as its caching allocator sees it: the peak of
``torch.cuda.max_memory_allocated`` (blocks) and of ``max_memory_reserved`` (segments).

The step simulator replays the reference step tensor by tensor; feeding its allocations and frees,
in order, through the allocator model (``planner/machine/cuda_allocator.py``) gives what the
allocator reports. The simulator keeps a few things as one buffer that torch allocates per
parameter: the fp32 master copies, the optimizer states and the optimizer step's foreach
temporaries. Here they are expanded into torch's own sequence (torch/optim/adam.py
``_init_group`` and ``_multi_tensor_adam``, sgd.py, _adafactor.py; service/validation/step.py
``MasterWeights``), since the allocator's segments depend on the sizes it is asked for.

Three steps are replayed from an empty allocator (model built, batch made, then steps 1-3, as a
validation job measures): the first step's peak, the steady-state peak (steps 2-3) and the
reserved peak. The replay is not compressed (every block), so its cost grows with layers and
micro-batches; ``MAX_BLOCK_PASSES`` and ``MAX_EVENTS`` bound it, and larger setups keep the
assumed reserve.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.catalog.specs import ResolvedModel, TrainingSpec
from planner.machine.cuda_allocator import Block, CachingAllocator
from planner.machine.stepsim import Buf, Machine, Val
from planner.step.program import ReferenceProgram

MAX_EVENTS = 120_000  # allocations replayed per estimate (about 0.5 s)
MAX_BLOCK_PASSES = 256  # layers x micro-batches per step: larger setups are not replayed
STEPS = 3

# what torch.optim allocates per parameter and state (zeros_like / clone), in order
_PER_PARAM_STATES = {"adam": 2, "adamw": 2, "sgd-momentum": 1, "adagrad": 1, "adadelta": 2,
                     "lion": 1}


@dataclass(frozen=True)
class AllocatorPeaks:
    allocated: int  # steady-state peak of max_memory_allocated (blocks), steps 2-3
    first_step_allocated: int
    reserved: int  # peak of max_memory_reserved over the replay
    segments: int
    requested: int  # steady-state peak of the requested bytes (the step simulator's total)
    per_tensor_optimizer: bool  # False: an optimizer step's temporaries stayed one block


class _TooLarge(Exception):
    pass


class _AllocatorMachine(Machine):
    """The step simulator, each storage also taken from a caching allocator."""

    def __init__(self, allocator: CachingAllocator) -> None:
        super().__init__()
        self.ca = allocator
        self.blocks: dict[Buf, list[Block]] = {}
        self.expand = None  # (name, nbytes) -> event plan or None
        self.events = 0

    def alloc(self, nbytes: int, name: str, cat: str | None = None) -> Buf:
        b = super().alloc(nbytes, name, cat)
        if b.nbytes > 0:
            plan = self.expand(name, b.nbytes) if self.expand is not None else None
            self.blocks[b] = self._run(plan) if plan else [self.ca.malloc(b.nbytes)]
            self.events += 1
            if self.events > MAX_EVENTS:
                raise _TooLarge
        return b

    def _run(self, plan: list[tuple]) -> list[Block]:
        """Run ('a', key, nbytes) / ('f', key) steps; the blocks still held are the buffer's, in
        the order they are to be freed (reversed when the plan ends with ('reverse',))."""
        held: dict = {}
        for op in plan:
            if op[0] == "a":
                held[op[1]] = self.ca.malloc(op[2])
            elif op[0] == "f":
                self.ca.free(held.pop(op[1]))
        blocks = list(held.values())
        return blocks[::-1] if plan and plan[-1] == ("reverse",) else blocks

    def _release(self, b: Buf) -> None:
        for blk in self.blocks.pop(b, ()):
            self.ca.free(blk)

    def drop(self, *bufs: Buf | Val | None) -> None:
        for b in bufs:
            if b is None:
                continue
            buf = b.buf if isinstance(b, Val) else b
            super().drop(buf)
            if buf.refs == 0:
                self._release(buf)

    def set_refs(self, b: Buf, refs: int) -> None:
        was = b.refs
        super().set_refs(b, refs)
        if was > 0 and refs == 0:
            self._release(b)


class _AllocatorProgram(ReferenceProgram):
    """The reference program with torch's per-parameter optimizer allocations."""

    def __init__(self, model: ResolvedModel, training: TrainingSpec, machine: _AllocatorMachine,
                 checkpointed: set[int]) -> None:
        self.per_tensor = True
        machine.expand = self._expand
        super().__init__(model, training, device="cuda", checkpointed=checkpointed,
                         compress=False, machine=machine)

    def _state_esz(self) -> int:
        return self.master_esz if self.master else self.p_esz

    def _expand(self, name: str, nbytes: int) -> list[tuple] | None:
        if name not in ("master", "optimizer_state", "optimizer_step"):
            return None
        specs = self.trainable_specs()
        if not specs:
            return None
        tr = self.tr
        if name == "master":  # p.detach().to(torch.float32).clone(), per parameter
            plan: list[tuple] = []
            for i, (n, _) in enumerate(specs):
                if self.p_esz != self.master_esz:
                    plan += [("a", ("to", i), n * self.master_esz)]
                plan += [("a", i, n * self.master_esz)]
                if self.p_esz != self.master_esz:
                    plan += [("f", ("to", i))]
            return plan
        b = self._state_esz()
        if name == "optimizer_state":
            fused = tr.optimizer_implementation == "fused"
            if tr.optimizer == "adafactor":
                plan = []
                for i, (n, s) in enumerate(specs):
                    if len(s) > 1:  # row_var (shape[:-1] + (1,)), col_var (shape[-2] = 1)
                        rows = n // s[-1]
                        plan += [("a", (i, "row"), rows * b), ("a", (i, "col"), n // s[-2] * b)]
                    else:
                        plan += [("a", (i, "var"), n * b)]
                return plan if sum(op[2] for op in plan) == nbytes else None
            k = _PER_PARAM_STATES.get(tr.optimizer)
            if k is None:
                return None
            plan = []
            for i, (n, _) in enumerate(specs):
                if fused and tr.optimizer in ("adam", "adamw"):
                    plan.append(("a", (i, "step"), 4))  # the step tensor lives on the device
                plan += [("a", (i, j), n * b) for j in range(k)]
            return plan if sum(op[2] for op in plan) == nbytes else None
        if name == "optimizer_step":
            impl = tr.optimizer_implementation
            if tr.optimizer in ("adam", "adamw") and impl == "foreach":
                # exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs): one per parameter, in
                # order; the list is freed last to first
                return _reverse_held([("a", i, n * b) for i, (n, _) in enumerate(specs)])
            if tr.optimizer == "adafactor" and impl == "foreach":
                return _adafactor_foreach(specs, b)
            if tr.optimizer in ("adam", "adamw") and impl == "for-loop":
                plan = []  # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                for i, (n, _) in enumerate(specs):
                    plan += [("a", ("sqrt", i), n * b), ("a", ("denom", i), n * b),
                             ("f", ("sqrt", i))]
                    if i:
                        plan.append(("f", ("denom", i - 1)))
                return plan
            self.per_tensor = False
            return None
        return None


def _adafactor_foreach(specs: list[tuple[int, tuple[int, ...]]], b: int) -> list[tuple]:
    """torch/optim/_adafactor.py ``_multi_tensor_adafactor``: one group per dimensionality, in
    order of first appearance. A list a comprehension built is freed last element first."""
    groups: dict[bool, list[tuple[int, int, tuple[int, ...]]]] = {}
    for i, (n, s) in enumerate(specs):
        groups.setdefault(len(s) > 1, []).append((i, n, s))
    plan: list[tuple] = []
    prev: list[int] = []  # the previous group's `updates`, freed when rebound
    for multidim, members in groups.items():
        for i, _, _ in members:  # alphas: p.norm(2).item(), a 0-dim tensor each
            plan += [("a", ("norm", i), b), ("f", ("norm", i))]
        if multidim:
            for tag, size in (("row", lambda n, s: n // s[-1]), ("col", lambda n, s: n // s[-2])):
                plan += [("a", (tag, i), size(n, s) * b) for i, n, s in members]
                plan += [("f", (tag, i)) for i, _, _ in reversed(members)]  # del row/col_means
            plan += [("a", ("var", i), n * b) for i, n, _ in members]  # row_var @ col_var
            # row_var.mean(dim=-2, keepdim=True): shape[:-2] + (1, 1)
            plan += [("a", ("rvm", i), n // (s[-1] * s[-2]) * b) for i, n, s in members]
            plan += [("f", ("rvm", i)) for i, _, _ in reversed(members)]
        else:
            plan += [("a", ("sq", i), n * b) for i, n, _ in members]  # _foreach_mul(g, g)
            plan += [("f", ("sq", i)) for i, _, _ in reversed(members)]
            plan += [("a", ("var", i), n * b) for i, n, _ in members]  # v.clone()
        plan += [("f", ("var", i)) for i in reversed(prev)]  # updates = var_estimates
        prev = [i for i, _, _ in members]
        for i in prev:  # update.norm(2).item()
            plan += [("a", ("unorm", i), b), ("f", ("unorm", i))]
    return _reverse_held(plan)


def _reverse_held(plan: list[tuple]) -> list[tuple]:
    """Allocate in ``plan``'s order; the held blocks come back last first (freed in reverse)."""
    return plan + [("reverse",)]


_CACHE: dict[tuple, AllocatorPeaks | None] = {}
_CACHE_SIZE = 256


def allocator_peaks(model: ResolvedModel, tr: TrainingSpec,
                    checkpointed: frozenset[int]) -> AllocatorPeaks | None:
    """The allocator's figures for the single-device reference step on CUDA, or None when the
    replay would exceed ``MAX_EVENTS`` allocations (memoised)."""
    if model.num_layers * tr.gradient_accumulation_steps > MAX_BLOCK_PASSES:
        return None
    key = (model, tr.model_dump_json(), checkpointed)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = _replay(model, tr, checkpointed)
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()


def _replay(model: ResolvedModel, tr: TrainingSpec,
            checkpointed: frozenset[int]) -> AllocatorPeaks | None:
    ca = CachingAllocator()
    m = _AllocatorMachine(ca)
    try:
        prog = _AllocatorProgram(model, tr, m, set(checkpointed))
        peaks: list[tuple[int, int]] = []
        for step in range(STEPS):
            ca.reset_peaks()
            m.reset_peak()
            for _ in range(tr.gradient_accumulation_steps):
                m.phase = "forward"
                loss = prog.forward_loss()
                m.phase = "backward"
                prog.backward(loss)
                prog.ops.drop(loss)
            m.phase = "optimizer"
            prog.optimizer_step(first=step == 0)
            m.phase = "other"
            peaks.append((ca.peak_allocated, m.peak.total))
    except _TooLarge:
        return None
    steady = max(peaks[1:])
    return AllocatorPeaks(allocated=steady[0], first_step_allocated=peaks[0][0],
                          reserved=ca.reserved, segments=ca.segments,
                          requested=max(p[1] for p in peaks[1:]),
                          per_tensor_optimizer=prog.per_tensor)
