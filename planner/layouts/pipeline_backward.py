"""The zero-bubble schedules' split backward on the step simulator: I (``stage_backward_input``)
and W (``stage_backward_weight``) of torch 2.13's ``pipelining/_backward.py``, as
``planner/layouts/pipeline_memory.py`` replays them (its docstring says what each keeps alive).

- ``closure``: the backward nodes on the path from the stage output to its input, and the
  "intermediates" where a weight's path meets the input's (``get_param_groups``).
- ``split_backward_input``: ``autograd.grad`` for the input only with ``retain_graph=True``: the
  nodes on the input's path run, every saved tensor stays, and the gradient arriving at each
  intermediate is kept until W.
- ``split_backward_weight``: ``autograd.grad`` from each group's intermediates to its weights
  (``retain_graph=False``), then the kept gradients and the rest of the graph are released.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from planner.machine.stepsim import Buf, Leaf, Machine, Node, Val
from planner.step.ops import T

__all__ = ["Pending", "closure", "split_backward_input", "split_backward_weight"]


@dataclass
class Pending:
    """What a stage keeps for one micro-batch between F and its backward."""

    out: T
    inp: T | None  # the receive buffer as an autograd leaf (None on stage 0)
    loss: T | None = None
    kept: list[Buf] = field(default_factory=list)  # I -> W: intermediates' grads
    nodes: list[Node] = field(default_factory=list)  # I -> W: the retained graph
    inter: list[tuple[Node, list]] = field(default_factory=list)
    phantoms: list = field(default_factory=list)  # stood-in blocks (planner/layouts/pipeline_blocks)


def closure(root: Node, leaf: Leaf) -> tuple[set[int], set[int]]:
    """Nodes from which ``leaf`` is reachable (the input's path), and among them the
    "intermediates": nodes with an edge off that path leading to a parameter."""
    memo: dict[int, bool] = {}

    def reaches(n) -> bool:  # iterative DFS would be nicer; graphs are a few hundred nodes deep
        k = id(n)
        if k in memo:
            return memo[k]
        if isinstance(n, Leaf):
            memo[k] = n is leaf
            return memo[k]
        memo[k] = False
        r = False
        for e in n.edges:
            if e is not None and reaches(e[0]):
                r = True
        memo[k] = r
        return r

    import sys
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 100000))
    try:
        reaches(root)
    finally:
        sys.setrecursionlimit(old)
    on_path = {k for k, v in memo.items() if v}
    inter = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        n = stack.pop()
        if id(n) in seen or not isinstance(n, Node):
            continue
        seen.add(id(n))
        for e in n.edges:
            if e is None:
                continue
            if id(e[0]) in on_path:
                stack.append(e[0])
            elif id(n) in on_path and _to_param(e[0]):
                inter.add(id(n))
    return on_path, inter


def _to_param(n) -> bool:
    if isinstance(n, Leaf):
        return True
    return any(e is not None and _to_param(e[0]) for e in n.edges)


def _run(m: Machine, roots: list[tuple[Node, list]], allowed, retain: bool, hook=None) -> list[Node]:
    """The engine restricted to edges whose target ``allowed(target)`` accepts; returns the nodes
    it ran. ``retain``: saved tensors stay (retain_graph=True)."""
    deps: dict[int, int] = {}
    seen: set[int] = set()
    stack = [n for n, _ in roots]
    for n in stack:
        seen.add(id(n))
    while stack:
        n = stack.pop()
        for e in n.edges:
            if e is None or not allowed(e[0]):
                continue
            deps[id(e[0])] = deps.get(id(e[0]), 0) + 1
            if isinstance(e[0], Node) and id(e[0]) not in seen:
                seen.add(id(e[0]))
                stack.append(e[0])
    m._deps = deps
    buffers: dict[int, list] = {}
    m._buffers = buffers
    ready = []
    tie = 0
    for n, grads in roots:
        buffers[id(n)] = grads
        tie += 1
        heapq.heappush(ready, (-n.seq, tie, n))
    ran = []
    while ready:
        _, _, n = heapq.heappop(ready)
        grads_in = buffers.pop(id(n))
        if hook is not None:
            hook(n, grads_in)
        saved_edges = n.edges
        n.edges = [e if e is not None and allowed(e[0]) else None for e in saved_edges]
        try:
            outs = n.fn(m, n, grads_in)
        finally:
            masked, n.edges = n.edges, saved_edges
        ran.append(n)
        if not retain:
            for b in n.saved:
                m.drop(b)
            n.saved = []
        for g in grads_in:
            m.drop(g)
        for edge, g in zip(masked, outs):
            if edge is None:
                m.drop(g)
                continue
            e, idx = edge
            if isinstance(e, Leaf):
                slot = buffers.setdefault(id(e), [None])
                slot[0] = m._accumulate_input(slot[0], g, e)
                deps[id(e)] -= 1
                if deps[id(e)] == 0:
                    m._accumulate_grad(e, buffers.pop(id(e))[0])
                continue
            slot = buffers.setdefault(id(e), [None] * e.n_out)
            slot[idx] = m._accumulate_input(slot[idx], g, e)
            deps[id(e)] -= 1
            if deps[id(e)] == 0:
                tie += 1
                heapq.heappush(ready, (-e.seq, tie, e))
    return ran


def split_backward_input(m: Machine, root: Val, seed: Buf, leaf: Leaf, on_path: set[int],
                          inter: set[int], p: Pending, watch=None) -> list[Node]:
    """I: autograd.grad(output, input, retain_graph=True) with pre-hooks on the intermediates.
    ``watch(node)`` is called before each node runs."""
    def hook(n: Node, grads: list) -> None:
        if watch is not None:
            watch(n)
        if id(n) in inter:
            p.inter.append((n, [m.hold(g) if g is not None else None for g in grads]))

    buffers = [None] * root.fn.n_out
    buffers[root.out_idx] = seed
    m.hold(seed)  # valid_output_grads (ones_like on the last stage) live through the call
    ran = _run(m, [(root.fn, buffers)], lambda t: id(t) in on_path, retain=True, hook=hook)
    m.drop(seed)
    # Nodes no intermediate keeps alive (the loss side) die with the detached output.
    alive: set[int] = set()
    stack = [n for n, _ in p.inter]
    while stack:
        n = stack.pop()
        if id(n) in alive or not isinstance(n, Node):
            continue
        alive.add(id(n))
        stack.extend(e[0] for e in n.edges if e is not None)
    keep = []
    for n in ran:
        if id(n) in alive:
            keep.append(n)
        else:
            for b in n.saved:
                m.drop(b)
            n.saved = []
    # nodes below the intermediates that I did not run (weight-only paths) keep their saved too
    return keep


def split_backward_weight(m: Machine, p: Pending, watch=None) -> None:
    """W: per parameter group (forward order of its parameters), autograd.grad from the kept
    intermediate gradients to the weights, then the group's kept gradients are dropped; finally
    the graph's remaining saved tensors go. ``watch(node)`` is called before each group."""
    on_input = set()
    for n in p.nodes:
        on_input.add(id(n))
    for n, grads in sorted(p.inter, key=lambda ng: ng[0].seq):
        # only the edges off the input's path (toward the weights)
        def allowed(t, n=n) -> bool:
            return id(t) not in on_input and not (isinstance(t, Leaf) and t.name.startswith("recv"))
        if watch is not None:
            watch(n)
        _run(m, [(n, list(grads))], allowed, retain=False)
    for n in p.nodes:
        for b in n.saved:
            m.drop(b)
        n.saved = []
    p.inter = []
