"""A byte-exact simulator of PyTorch's memory behaviour during one training step.

The planner does not guess "activations ≈ 34·s·b·h": it replays the reference step
(``planner/step/program.py``) op by op on this small machine, which models the three things that
decide what is live at any instant:

1. **Storages** (``Buf``) with reference counts: an op's outputs are allocated when it runs and
   freed when the last reference goes — a Python variable (the program drops it where the model's
   Python code would) or a tensor saved for backward.
2. **Autograd nodes** (``Node``): each differentiable op records the buffers it saves and what its
   backward allocates. ``backward()`` runs them like torch's engine
   (torch/csrc/autograd/engine.cpp): a ready queue ordered by sequence number (later nodes first),
   gradients for the same input summed in an input buffer (a new allocation, both parts freed),
   a node's saved tensors and incoming gradients freed when it finishes, and AccumulateGrad for
   leaves, which runs as soon as it is ready and steals the incoming gradient as ``param.grad``
   (or adds in place when a gradient already exists).
3. **Categories**, decided at allocation: forward → activations, backward → temporaries, a stolen
   gradient → gradients, optimizer state → optimizer_states; the peak snapshot is the per-category
   sum at the instant the total is highest.

Everything is integers; nothing is allocated for real.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Sequence

from planner.machine.deadline import check as check_work_limit

CATEGORIES = ("parameters", "gradients", "optimizer_states", "activations", "temporaries")
_INDEX = {c: i for i, c in enumerate(CATEGORIES)}


class Buf:
    """One storage."""

    __slots__ = ("nbytes", "cat", "refs", "name")

    def __init__(self, nbytes: int, cat: str, name: str) -> None:
        self.nbytes, self.cat, self.refs, self.name = nbytes, cat, 0, name


@dataclass
class Leaf:
    """A parameter (or any leaf requiring grad); ``grad`` is its current .grad storage."""

    name: str
    grad_bytes: int
    grad: Buf | None = None


class Node:
    """An autograd node: saved buffers and a backward that maps grad outputs to grad inputs.

    ``unpacked``: saved tensors that only the node's ``apply()`` holds once unpacked (a
    checkpointed region's recomputed tensors: the unpack hook hands over the last reference).
    They die when ``apply()`` returns (``Machine.apply_returned``), before the engine reduces or
    casts the gradients it returned (validate_outputs); ``saved`` lives until the node is done."""

    __slots__ = ("seq", "saved", "fn", "edges", "name", "n_out", "unpacked")

    def __init__(self, seq: int, name: str, saved: list[Buf], fn: Callable,
                 edges: Sequence[tuple["Node | Leaf", int] | None], n_out: int = 1) -> None:
        self.seq, self.name, self.saved, self.fn, self.edges, self.n_out = seq, name, saved, fn, list(edges), n_out
        self.unpacked: list[Buf] = []


@dataclass
class Val:
    """A tensor value in the program: its storage and where its gradient goes."""

    buf: Buf
    fn: "Node | Leaf | None" = None
    out_idx: int = 0

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes


@dataclass
class PeakSnap:
    total: int = 0
    by_cat: list[int] = field(default_factory=lambda: [0] * len(CATEGORIES))
    op: str = ""
    phase: str = ""

    def as_dict(self) -> dict[str, int]:
        d = {c: self.by_cat[i] for i, c in enumerate(CATEGORIES)}
        d["total"] = self.total
        return d


def activation_snap(nbytes: int, phase: str) -> PeakSnap:
    """The activation peak as a snapshot: ``total`` and the activations category are the live
    activation bytes; the other categories and the op are not recorded (the instant is the first
    at which those bytes are live)."""
    by = [0] * len(CATEGORIES)
    by[3] = nbytes
    return PeakSnap(nbytes, by, "", phase)


class Machine:
    """Live-byte accounting, the autograd engine, and the peak."""

    def __init__(self) -> None:
        self.cur = [0] * len(CATEGORIES)
        self.total = 0
        self.peak = PeakSnap()
        # Peak of activations + temporaries alone (what a sharded layout adds to model states).
        self.act_peak = PeakSnap()
        # Highest live activation bytes outside the optimizer step (``total`` holds them; the
        # phase is where they were first reached): what checkpointing lowers, whichever window
        # holds the step's peak.
        self.act_max = PeakSnap()
        self.phase = "other"
        self._seq = 0
        self.grad_enabled = True
        # Saved-tensor hook for checkpointed regions: when set, ``save`` hands buffers to it.
        self.save_hook: Callable[[Node, list[Buf]], None] | None = None
        self.on_alloc: Callable[[Buf], None] | None = None

    # ---- storage ----------------------------------------------------------------------------
    def default_cat(self) -> str:
        if self.phase in ("forward", "recompute"):
            return "activations"
        return "temporaries"

    def alloc(self, nbytes: int, name: str, cat: str | None = None) -> Buf:
        b = Buf(int(nbytes), cat or self.default_cat(), name)
        b.refs = 1  # the caller's reference
        if self.on_alloc is not None:
            self.on_alloc(b)
        i = _INDEX[b.cat]
        self.cur[i] += b.nbytes
        self.total += b.nbytes
        if self.total > self.peak.total:
            self.peak = PeakSnap(self.total, list(self.cur), name, self.phase)
        at = self.cur[3] + self.cur[4]
        if at > self.act_peak.total and self.phase != "optimizer":
            self.act_peak = PeakSnap(at, list(self.cur), name, self.phase)
        if i == 3 and self.cur[3] > self.act_max.total and self.phase != "optimizer":
            self.act_max = activation_snap(self.cur[3], self.phase)
        return b

    def hold(self, b: Buf) -> Buf:
        if b.refs <= 0:  # pragma: no cover - a program bug
            raise AssertionError(f"hold of freed {b.name}")
        b.refs += 1
        return b

    def drop(self, *bufs: "Buf | Val | None") -> None:
        for b in bufs:
            if b is None:
                continue
            if isinstance(b, Val):
                b = b.buf
            b.refs -= 1
            if b.refs == 0:
                i = _INDEX[b.cat]
                self.cur[i] -= b.nbytes
                self.total -= b.nbytes
            elif b.refs < 0:  # pragma: no cover - a program bug
                raise AssertionError(f"double free of {b.name}")

    def set_refs(self, b: Buf, refs: int) -> None:
        """Force a buffer's reference count (what Python's GC does to an aborted frame)."""
        if b.refs > 0 and refs == 0:
            self.cur[_INDEX[b.cat]] -= b.nbytes
            self.total -= b.nbytes
        b.refs = refs

    def resize(self, b: Buf, nbytes: int) -> None:
        """Change a storage's size in place (a parameter that now points at storage gathered on
        demand shrinks to 0)."""
        if b.refs > 0:
            i = _INDEX[b.cat]
            self.cur[i] += nbytes - b.nbytes
            self.total += nbytes - b.nbytes
        b.nbytes = nbytes

    def recategorize(self, b: Buf, cat: str) -> None:
        if b.refs > 0:
            self.cur[_INDEX[b.cat]] -= b.nbytes
            self.cur[_INDEX[cat]] += b.nbytes
        b.cat = cat

    def reset_peak(self) -> None:
        self.peak = PeakSnap(self.total, list(self.cur), "(window start)", self.phase)

    # ---- graph building ---------------------------------------------------------------------
    def node(self, name: str, inputs: Sequence[Val | None], saved: Sequence[Buf], fn: Callable,
             n_out: int = 1) -> Node | None:
        """Record a node if any input needs grad; holds ``saved`` until the node runs."""
        edges = [(v.fn, v.out_idx) if v is not None and v.fn is not None else None for v in inputs]
        if not self.grad_enabled or all(e is None for e in edges):
            return None
        self._seq += 1
        n = Node(self._seq, name, [], fn, edges, n_out)
        if saved:
            self.save(n, list(saved))
        return n

    def save(self, node: Node | None, bufs: list[Buf]) -> None:
        """Save buffers for ``node``'s backward (one pack event). The node holds them, unless a
        checkpointed region's hook takes them instead."""
        if node is None:
            return
        if self.save_hook is not None:
            self.save_hook(node, bufs)
            return
        for b in bufs:
            node.saved.append(self.hold(b))

    # ---- backward ---------------------------------------------------------------------------
    def apply_returned(self, node: Node) -> None:
        """``node``'s ``apply()`` has returned: the tensors only its locals held (``unpacked``)
        are freed. A backward calls this before the engine's work on its outputs (sum_to_size of
        a broadcast input, a cast to the input's dtype: torch/csrc/autograd/engine.cpp,
        validate_outputs); the engine calls it after every node (a no-op when already done)."""
        if node.unpacked:
            self.drop(*node.unpacked)
            node.unpacked = []

    def backward(self, root: Val, grad: Buf, before_node: Callable[[Node], None] | None = None,
                 after_node: Callable[[Node], None] | None = None) -> None:
        """Run the engine from ``root`` with incoming gradient ``grad`` (ownership passes in)."""
        assert isinstance(root.fn, Node)
        deps: dict[int, int] = {}
        seen = {id(root.fn)}
        stack = [root.fn]
        while stack:
            n = stack.pop()
            for edge in n.edges:
                if edge is None:
                    continue
                e = edge[0]
                deps[id(e)] = deps.get(id(e), 0) + 1
                if id(e) not in seen and isinstance(e, Node):
                    seen.add(id(e))
                    stack.append(e)
        self._deps = deps
        buffers: dict[int, list[Buf | None]] = {id(root.fn): [None] * root.fn.n_out}
        self._buffers = buffers
        buffers[id(root.fn)][root.out_idx] = grad
        ready: list[tuple[int, int, Node]] = [(-root.fn.seq, 0, root.fn)]
        tie = 0
        ran: list[Node] = []
        while ready:
            check_work_limit()
            _, _, n = heapq.heappop(ready)
            grads_in = buffers.pop(id(n))
            if before_node is not None:
                before_node(n)
            outs = n.fn(self, n, grads_in)
            self.apply_returned(n)
            # Node done: release its saved tensors and the incoming gradients.
            for b in n.saved:
                self.drop(b)
            n.saved = []
            ran.append(n)
            for g in grads_in:
                self.drop(g)
            if after_node is not None:
                after_node(n)
            for edge, g in zip(n.edges, outs):
                if edge is None:
                    self.drop(g)
                    continue
                e, idx = edge
                if isinstance(e, Leaf):
                    # AccumulateGrad has the highest priority: it runs when its last input lands.
                    slot = buffers.setdefault(id(e), [None])
                    slot[0] = self._accumulate_input(slot[0], g, e)
                    deps[id(e)] -= 1
                    if deps[id(e)] == 0:
                        self._accumulate_grad(e, buffers.pop(id(e))[0])
                    continue
                slot = buffers.setdefault(id(e), [None] * e.n_out)
                slot[idx] = self._accumulate_input(slot[idx], g, e)
                deps[id(e)] -= 1
                if deps[id(e)] == 0:
                    tie += 1
                    heapq.heappush(ready, (-e.seq, tie, e))
        # the graph is freed once it ran (its backward closures hold tensors whose nodes are
        # theirs: cycles the collector would otherwise find); kept until here, so the ids the
        # engine keys by stay unique while it runs
        for n in ran:
            n.fn = None

    def grad_cat(self, node: Node, edge_index: int) -> str:
        """Category of a gradient produced for ``node.edges[edge_index]``: ``gradients`` when it
        will become a parameter's .grad as it is (sole contribution to a leaf without a grad)."""
        edge = node.edges[edge_index]
        if edge is not None and isinstance(edge[0], Leaf):
            leaf = edge[0]
            pending = self._buffers.get(id(leaf), [None])[0]
            if leaf.grad is None and self._deps.get(id(leaf), 0) == 1 and pending is None:
                return "gradients"
        return "temporaries"

    def galloc(self, node: Node, edge_index: int, nbytes: int, name: str) -> Buf | None:
        """Allocate the gradient for one input edge (None when that input needs no grad)."""
        if node.edges[edge_index] is None:
            return None
        return self.alloc(nbytes, name, self.grad_cat(node, edge_index))

    def _accumulate_input(self, have: Buf | None, new: Buf | None, target: "Node | Leaf") -> Buf | None:
        if new is None:
            return have
        if have is None:
            return new
        cat = "temporaries"
        if isinstance(target, Leaf) and target.grad is None and self._deps.get(id(target)) == 1:
            cat = "gradients"  # the sum is what AccumulateGrad will steal
        s = self.alloc(max(have.nbytes, new.nbytes), "add(grad)", cat)
        self.drop(have, new)
        return s

    def _accumulate_grad(self, leaf: Leaf, g: Buf | None) -> None:
        if g is None:
            return
        if leaf.grad is None:
            # Steals the incoming gradient (torch/csrc/autograd/functions/accumulate_grad.h);
            # a gradient of another dtype/size is first copied into one of the parameter's kind.
            if g.nbytes != leaf.grad_bytes:
                c = self.alloc(leaf.grad_bytes, "to(grad)")
                self.drop(g)
                g = c
            self.recategorize(g, "gradients")
            leaf.grad = g
        else:  # in-place accumulate: the incoming gradient is a temporary
            self.drop(g)
