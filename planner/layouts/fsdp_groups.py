"""FSDP2's parameter groups on one data-parallel rank: the bytes ``fully_shard`` allocates and
frees around the reference step, at ZeRO stages 2 and 3.

``FSDPGroups`` is mixed into ``ParallelProgram`` (planner/layouts/data_parallel.py, whose module
docstring follows torch 2.13 through each stage). At construction a group per block and one for
the root (embeddings, final norm, output projection) trade the parameters' storage for padded
dim-0 shards (``fsdp_shard_shape``) and a default ``DeviceMesh``'s rank map; in the step a group
all-gathers into a flat buffer and copies out into the unsharded parameters (``_gather``;
``_prefetch`` issues the next group's all-gather early), frees them again (``_reshard``), and in
its post-backward reduce-scatters the unsharded gradients into the sharded ones
(``_post_backward``). ``_hook_node`` is the identity autograd node whose backward runs a group's
pre- or post-backward; ``ParallelProgram`` places the hooks around each block and the root.
Under ``parallelism.fsdp_mixed_precision`` the shards are fp32 and each all-gather first casts
them into one flat bf16 input (``_all_gather_output``).
"""

from __future__ import annotations

import math

from planner.step.ops import F32, T
from planner.machine.stepsim import Buf, Leaf, Machine, Node, Val
from planner.layouts.sharding import fsdp_local_shard_shape, fsdp_shard_shape


class FSDPGroups:
    """FSDP2's groups, shards, all-gathers and reduce-scatters on a data-parallel rank's program
    (see module docstring). They read the reference program's machine, parameters and simulated
    blocks, and what ``ParallelProgram`` sets: the world size ``n``, the rank, the ZeRO stage
    ``z``, the MixedPrecisionPolicy flag ``mp`` and ``_shard_rows``."""

    def _padded_shape(self, shape: tuple) -> tuple:
        """Every rank's padded shard of a parameter (``fsdp_shard_shape``)."""
        if self._shard_rows is None:
            return fsdp_shard_shape(shape, self.n)
        return (self._shard_rows(shape[0])[0], *shape[1:])

    def _local_shape(self, shape: tuple) -> tuple:
        """This rank's unpadded piece of a parameter (``fsdp_local_shard_shape``)."""
        if self._shard_rows is None:
            return fsdp_local_shard_shape(shape, self.n, self.rank)
        return (self._shard_rows(shape[0])[1], *shape[1:])

    def _setup_fsdp(self) -> None:
        m, n = self.m, self.n
        L = len(self.real_blocks)  # the simulated blocks; the phantom ones are below
        groups: dict[int, list[T]] = {g: [] for g in range(-1, L)}  # -1: the root
        seen: set[int] = set()
        for name, t in self.params.by_name.items():
            if name in ("rope_cos", "rope_sin") or id(t) in seen:
                continue  # buffers (rotary tables) are not sharded
            seen.add(id(t))
            g = int(name[1:name.index(".")]) if name.startswith("b") and name[1].isdigit() else -1
            groups[g].append(t)
        self.groups = groups
        self.unsharded_bytes: dict[int, int] = {}
        self.sharded_bytes: dict[int, int] = {}
        # frozen parameters (a LoRA base) are sharded and gathered too, but get no gradient:
        # the reduce-scatter covers the parameters with one
        self.grad_unsharded_bytes: dict[int, int] = {}
        self.grad_sharded_bytes: dict[int, int] = {}
        for g, ts in groups.items():
            full = shard = gfull = gshard = 0
            for t in ts:
                rows = _numel(self._padded_shape(self.shapes[id(t.val)]))
                store = F32 if self.mp else t.esz  # the sharded (stored) dtype
                shard += rows * store
                full += rows * n * t.esz
                if t.val.fn is not None:
                    gshard += rows * store
                    gfull += rows * n * store  # reduce_dtype: the sharded parameter's
            self.grad_unsharded_bytes[g], self.grad_sharded_bytes[g] = gfull, gshard
            for t in ts:
                # the module's parameter now points at unsharded storage gathered on demand
                m.resize(t.buf, 0)
            self.unsharded_bytes[g], self.sharded_bytes[g] = full, shard
            if ts:
                m.alloc(shard, f"sharded[{self._real(g)}]", "parameters")
                # the default DeviceMesh this fully_shard call builds keeps its rank map,
                # torch.arange(N, dtype=torch.int32) (device_mesh.py, init_device_mesh)
                m.alloc(4 * n, f"fsdp_state[{self._real(g)}]", "temporaries")
        if self.n_phantom:  # the blocks stood in for: their shards and meshes (all blocks alike)
            m.resize(self._phantom_params, 0)
            m.alloc(self.n_phantom * self.sharded_bytes[0], "sharded[phantom blocks]", "parameters")
            m.alloc(self.n_phantom * 4 * n, "fsdp_state[phantom blocks]", "temporaries")
        self.unsharded: dict[int, Buf] = {}
        self.flat_pending: dict[int, Buf] = {}  # prefetched all-gathers awaiting copy-out
        self.ag_state: Buf | None = None  # forward: last all-gather output, freed at next copy-out
        self.rs_states: list[Buf] = []
        self.sharded_grads: dict[int, Buf] = {}
        self._fsdp_nodes: dict[int, tuple[str, int]] = {}

    def _real(self, g: int) -> int:
        """The model's index of group ``g`` (a simulated block's position; -1, the root, as is):
        the name the step's peak reports."""
        return self.real_blocks[g] if g >= 0 else g

    def _gather(self, g: int, forward: bool) -> None:
        """unshard() + wait_for_unshard(): all-gather into a flat buffer, copy out."""
        m = self.m
        if g in self.unsharded or not self.groups[g]:
            return
        if self.n == 1:  # world size 1: the unsharded parameters copied from the shards, no
            # all-gather buffer (FSDPParamGroup.unshard / wait_for_unshard, world_size == 1)
            self.unsharded[g] = m.alloc(self.unsharded_bytes[g], f"unsharded[{self._real(g)}]",
                                        "parameters")
            return
        flat = self.flat_pending.pop(g, None) or self._all_gather_output(g)
        self.unsharded[g] = m.alloc(self.unsharded_bytes[g], f"unsharded[{self._real(g)}]",
                                    "parameters")
        if forward:
            if self.ag_state is not None:
                m.drop(self.ag_state)
            self.ag_state = flat
        else:
            m.drop(flat)

    def _reshard(self, g: int) -> None:
        b = self.unsharded.pop(g, None)
        if b is not None:
            self.m.drop(b)

    def _prefetch(self, g: int) -> None:
        if self.n == 1:  # world size 1: unshard() allocates nothing
            return
        if g >= 0 and g not in self.unsharded and g not in self.flat_pending and self.groups[g]:
            self.flat_pending[g] = self._all_gather_output(g)

    def _all_gather_output(self, g: int) -> Buf:
        """foreach_all_gather's flat output. Under a MixedPrecisionPolicy the shards are first
        cast into one flat bf16 input (``_get_param_all_gather_inputs``' foreach copy), allocated
        before the output and freed as foreach_all_gather returns."""
        m = self.m
        cast = m.alloc(self.unsharded_bytes[g] // self.n, "all_gather_input",
                       "temporaries") if self.mp else None
        out = m.alloc(self.unsharded_bytes[g], "all_gather", "temporaries")
        m.drop(cast)
        return out

    def _post_backward(self, g: int) -> None:
        m = self.m
        grads = []
        for t in self.groups[g]:
            leaf = t.val.fn
            if isinstance(leaf, Leaf) and leaf.grad is not None:
                grads.append(leaf.grad)
                leaf.grad = None
        self._reshard(g)
        while self.rs_states:  # reduce_scatter_max_input_buffers = 1
            m.drop(self.rs_states.pop(0))
        if not grads:
            return
        rs_in = m.alloc(self.grad_unsharded_bytes[g], "reduce_scatter_input", "temporaries")
        m.drop(*grads)
        out = m.alloc(self.grad_sharded_bytes[g], "reduce_scatter_output", "gradients")
        if g in self.sharded_grads:  # accumulate into the existing sharded gradient
            m.drop(out)
        else:
            self.sharded_grads[g] = out
        self.rs_states.append(rs_in)

    def _hook_node(self, x: T, kind: str, g: int) -> T:
        """An identity autograd node: its backward runs FSDP's pre-/post-backward for ``g``."""
        m = self.m

        def bw(mm: Machine, node: Node, grads: list) -> list:
            if kind == "post":
                self._post_backward(g)
            else:
                if self.z == 3:
                    self._gather(g, forward=False)
                    self._prefetch(g - 1)
            return [mm.hold(grads[0]) if grads[0] is not None else None]

        node = m.node(f"FSDP::{kind}_backward[{g}]", [x.val], [], bw)
        if node is None:
            return self.ops.view(x)
        return T(Val(m.hold(x.buf), node), x.numel, x.esz)


_numel = math.prod  # elements of a shape


__all__ = ["FSDPGroups"]
