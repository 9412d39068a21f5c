"""The reference step under data parallelism, replayed per rank on the step simulator.

``ParallelProgram`` is ``ReferenceProgram`` (planner/step/program.py) plus what each data-parallel
implementation allocates and frees, at the points of the step where torch 2.13 does it. The
implementations are the ones ``service/validation/distributed.py`` runs (and ``planner/layouts/sharding.py``
names per stage):

- stage 0, ``DistributedDataParallel(gradient_as_bucket_view=True)``: the reducer allocates one
  flat bucket per ~25 MiB of gradients at construction, and ``param.grad`` becomes a view into it
  (torch/csrc/distributed/c10d/reducer.cpp, ``initialize_buckets``). Autograd's gradient for a
  parameter is stolen by AccumulateGrad, copied into the bucket view by the reducer's post-hook
  and freed: so gradients are the buckets, live for the whole step, and each autograd gradient is
  a temporary. The bucket all-reduce is in place.
- stage 1, DDP + ``ZeroRedundancyOptimizer``: as stage 0; the optimizer states and the step's
  temporaries cover the tensors this rank owns (``planner.layouts.rank_tables.zero1_partition``: whole tensors,
  greedy by size — uneven shards, so ranks differ).
- stages 2 and 3, FSDP2 ``fully_shard`` on every block and on the root (embeddings, final norm,
  output projection; the loss runs inside the root's forward): parameters are stored as padded
  dim-0 shards (``fsdp_shard_shape``, the same bytes on every rank); a group's pre-forward
  all-gathers a flat buffer of the unsharded size and copies it out into the unsharded
  parameters; the flat buffer is kept until
  the next group's copy-out (implicit forward prefetch, ``AllGatherState``). Stage 3 frees the
  unsharded parameters after each forward and gathers them again before backward, prefetching the
  next group's all-gather in backward order; stage 2 keeps them from forward to backward. Each
  group's post-backward (when its inputs' gradients are ready) frees the unsharded parameters,
  copies the unsharded gradients into a flat reduce-scatter input (kept until the next group's
  reduce-scatter, ``reduce_scatter_max_input_buffers=1``) and reduce-scatters into the sharded
  gradients (category gradients). The root's post-backward runs in the final callback. Each
  ``fully_shard`` call without a mesh builds its own default ``DeviceMesh``, whose rank map
  (``torch.arange(N, dtype=torch.int)``, on the host) lives as long as the module. The
  optimizer sees each parameter's local tensor, the rank's unpadded ``torch.chunk`` piece
  (``fsdp_local_shard_shape``): when N does not divide a tensor's dim 0 (GPT-2's vocabulary of
  50,257 rows) the last ranks hold fewer rows of it, so their optimizer states, fp32 masters and
  step temporaries are smaller than rank 0's, which holds the most of every tensor. The groups'
  allocations are ``FSDPGroups``' (planner/layouts/fsdp_groups.py).

Every precision preset runs under DDP, whose optimizer is the single-device one (fp32 master
copies for mixed-*, GradScaler for amp-fp16). Under ZeroRedundancyOptimizer and FSDP2 the
optimizer of mixed-* is the same master-weight optimizer over the rank's shard: fp32 masters,
gradient copies and states of the owned tensors (or dim-0 shards) only — the ZeRO paper's
2 + 2 + 12/N bytes per parameter at stage 1, (2 + 2 + 12)/N at stage 3; mixed-fp16's static
loss scale multiplies the loss before backward under every stage, as on one device. amp-fp16's
GradScaler is not run across shards.

``parallelism.fsdp_mixed_precision`` (mixed-bf16, stage 3): torchtitan's recipe, an fp32 model
under ``fully_shard(mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))``. The
fp32 shards are the master weights, stepped by the plain optimizer (fp32 states, no master copy,
no gradient copy); each all-gather first casts the group's shards into one flat bf16 input
(``_get_param_all_gather_inputs``, freed as ``foreach_all_gather`` returns), the unsharded
parameters and autograd's gradients are bf16 (forward and backward as mixed-bf16's), and the
reduce-scatter input and the sharded gradients are fp32 (``foreach_reduce``: reduce_dtype equals
the sharded parameters' dtype, so no cast back).

Activation checkpointing (torch.utils.checkpoint, non-reentrant) composes with all of them: under
FSDP2 a checkpointed block's recompute runs with FSDP's hooks idle (the group is in its
pre-backward state: the pre-backward hook has already gathered the parameters), and the
checkpoint frame keeps the block's input until the last node that packed a tensor has run.

LoRA (adapters trainable, the base frozen in the parameter dtype) runs under every stage: DDP
buckets and ZeroRedundancyOptimizer's partition cover the trainable tensors only; FSDP2 shards
and gathers the frozen base with its group but reduce-scatters the adapters' gradients only.

Periodic blocks. As on one device (``ReferenceProgram``, ``compression_plan``), a checkpoint
plan of period k is replayed as its first three periods and its last two, with phantoms standing
for the periods between (and for long runs of blocks alike inside a period), measured on the
third. This is exact here too because everything a rank does per block is the same for every
block of a period:

- FSDP2 groups are the blocks, and every block's tensors have the same shapes, so its padded
  shards, all-gather buffer, unsharded parameters, reduce-scatter input and sharded gradients are
  the same bytes for every block, on every rank (only the root's tensors, embeddings and output
  projection, have uneven unpadded shards, and they are simulated). The implicit prefetch keeps
  one neighbour's all-gather live across a block boundary: that neighbour is alike whichever it
  is. So a period leaves the same bytes behind: activations, and under ZeRO-2 the unsharded
  parameters kept to backward (the phantom holds both, per category), and in backward the
  sharded gradients (``_phantom_grad_bytes``). The blocks stood in for keep their shards and
  device-mesh rank maps from construction.
- DDP's buckets are modelled as one allocation of every trainable gradient at construction (the
  all-reduce is in place): no bucket event falls inside a block, whatever the bucket boundaries,
  and each autograd gradient is a temporary copied in and freed within its block.
- ZeroRedundancyOptimizer's partition, and FSDP2's uneven unpadded pieces, show only in the
  optimizer step (states, fp32 masters, the step's copies and temporaries). They are computed
  from the whole model's parameter list (``_owned``: every block, simulated or not), so a rank
  whose partition boundary falls inside a block stood in for gets its exact bytes.

Where the checkpoint plan does not repeat (``plan_period`` finds no period), every block is
replayed, as on one device.

Everything stays integer bytes; every rank is simulated on its own (``rank``).
"""

from __future__ import annotations

import math

from planner.step.ops import T
from planner.step.program import ReferenceProgram
from planner.catalog.specs import ParallelSpec, ResolvedModel, TrainingSpec
from planner.machine.stepsim import Buf, Leaf, Machine, Node
from planner.layouts.fsdp_groups import FSDPGroups
from planner.layouts.sharding import zero1_partition

_BUCKET = Buf(0, "gradients", "ddp_bucket_view")  # param.grad as a view: no bytes of its own


class _DPMixin:
    """Autograd's parameter gradients are temporaries: DDP copies them into its buckets, FSDP
    reduce-scatters them into sharded gradients; neither keeps the tensor autograd made. Mixed
    into the rank's machine class (the plain Machine, or the step template's recording one)."""

    ddp = True

    def grad_cat(self, node: Node, edge_index: int) -> str:
        return "temporaries"

    def _accumulate_input(self, have, new, target):
        if new is None:
            return have
        if have is None:
            return new
        s = self.alloc(max(have.nbytes, new.nbytes), "add(grad)", "temporaries")
        self.drop(have, new)
        return s

    def _accumulate_grad(self, leaf: Leaf, g: Buf | None) -> None:
        if g is None:
            return
        if leaf.grad is None:
            if g.nbytes != leaf.grad_bytes:
                c = self.alloc(leaf.grad_bytes, "to(grad)", "temporaries")
                self.drop(g)
                g = c
            if self.ddp:  # reducer post-hook: copy into the bucket view, drop autograd's tensor
                self.drop(g)
                leaf.grad = _BUCKET
            else:  # FSDP: the unsharded parameter's .grad until its group's post-backward
                leaf.grad = g
        else:
            self.drop(g)


_DP_CLASSES: dict[type, type] = {}


def _dp_class(base: type) -> type:
    cls = _DP_CLASSES.get(base)
    if cls is None:
        cls = _DP_CLASSES[base] = type(f"DP{base.__name__}", (_DPMixin, base), {"ddp": True})
    return cls


class ParallelProgram(FSDPGroups, ReferenceProgram):
    """One data-parallel rank of the reference step (see module docstring)."""

    def __init__(self, model: ResolvedModel, training: TrainingSpec, parallel: ParallelSpec,
                 rank: int = 0, *, device: str = "cuda", checkpointed: set[int] | None = None,
                 machine: Machine | None = None, sizes: tuple | None = None,
                 compress: bool = True, shard_rows=None) -> None:
        """``shard_rows(d0) -> (padded rows, this rank's rows)`` replaces ``fsdp_shard_shape``
        and ``fsdp_local_shard_shape`` on a first dimension (a structure template's compile,
        planner/step/rank_structure.py, where ``d0`` is a polynomial in the model's sizes and
        the rows are variables of their own)."""
        if parallel.tensor_parallel != 1 or parallel.pipeline_parallel != 1:
            raise ValueError("ParallelProgram describes data parallelism only")
        self.par, self.rank = parallel, rank
        self.n, self.z = parallel.data_parallel, parallel.zero_stage
        self._owned_cache = None
        # FSDP2's MixedPrecisionPolicy (below); set first: the program's setup reads it
        self.mp = bool(getattr(parallel, "fsdp_mixed_precision", False)) and self.z >= 2
        self._shard_rows = shard_rows
        # Blocks repeat as on one device (see "Periodic blocks" in the module docstring): the
        # first three periods of the checkpoint plan and the last two are simulated (the full
        # replay, compress=False, is the oracle the tests hold it to).
        super().__init__(model, training, device=device, checkpointed=checkpointed,
                         compress=compress, machine=machine, sizes=sizes)
        self.m.__class__ = _dp_class(type(self.m))
        m = self.m
        # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on an fp32 model: the
        # fp32 shards are the master weights (no copy), the unsharded parameters and autograd's
        # gradients bf16, the reduce-scatter and the sharded gradients fp32.
        if self.mp:
            m.drop(self.masters)
            self.master = False
        if self.z >= 1 and self.master:  # masters of the rank's shard only
            m.drop(self.masters)
            self.masters = m.alloc(sum(self._owned()[0]) * self.master_esz, "master",
                                   "optimizer_states")
        if self.z <= 1:
            m.ddp = True
            # DDP's buckets: every trainable gradient of the whole model, allocated at
            # construction
            self.bucket = m.alloc(sum(b for _, _, rg, b in self.param_specs if rg), "ddp_buckets",
                                  "gradients")
        else:
            m.ddp = False
            self._setup_fsdp()

    # ---- which tensors this rank's optimizer steps ------------------------------------------
    def _owned(self) -> tuple[list[int], list[tuple[int, ...]]]:
        """(numel, shape) of the tensors (or shards) this rank's optimizer steps, over the whole
        model's trainable parameters (blocks stood in for included), in registration order."""
        if self._owned_cache is None:
            specs = self.trainable_specs()
            numels, shapes = [n for n, _ in specs], [shp for _, shp in specs]
            if self.z == 1:
                keep = sorted(zero1_partition(numels, self.n)[self.rank])
                numels, shapes = [numels[i] for i in keep], [shapes[i] for i in keep]
            elif self.z >= 2:  # per distinct shape (a model's tensors have a few)
                local = {s: self._local_shape(s) for s in set(shapes)}
                shapes = list(map(local.__getitem__, shapes))
                numels = list(map(_numel, shapes))
            self._owned_cache = numels, shapes
        return self._owned_cache

    def _inner_dtype(self) -> str:
        return "fp32" if self.master or self.mp else {4: "fp32", 2: "bf16"}[self.p_esz]

    def _alloc_states(self):
        from planner.catalog.optimizers import optimizer_state_bytes

        numels, shapes = self._owned()
        return self.m.alloc(optimizer_state_bytes(
            self.tr, numels, self._inner_dtype(), shapes,
            device="cpu" if self.device == "cpu" else "cuda"), "optimizer_state", "optimizer_states")

    def optimizer_step(self, first: bool) -> None:
        from planner.catalog.optimizers import optimizer_step_temporary_bytes

        if self.z == 0 and (self.master or self.scaling):
            # DDP steps the single-device optimizer (fp32 masters / GradScaler) over every tensor
            return super().optimizer_step(first)
        m = self.m
        numels, shapes = self._owned()
        scratch = []
        if self.master and self.g_esz != self.master_esz and numels:
            # master.grad = p.grad.float(), at once: one tensor per parameter, all made before
            # anything is freed, so the live bytes only rise until the last, where the step's
            # highest point among them is; one buffer of their sum has the same peak (same op,
            # same phase) with a rank's ~10^4 allocations taken as one (no allocator is replayed
            # for a data-parallel rank)
            scratch.append(m.alloc(sum(numels) * self.master_esz, "_to_copy"))
        if first and self._states is None:
            self._states = self._alloc_states()
        tmp = m.alloc(optimizer_step_temporary_bytes(self.tr, numels, self._inner_dtype(), shapes),
                      "optimizer_step")
        m.drop(tmp, *scratch)
        self.zero_grad()

    def zero_grad(self) -> None:
        if self.z >= 2:
            for b in self.sharded_grads.values():
                self.m.drop(b)
            self.sharded_grads.clear()
            self._drop_phantom_grads()
            return
        for t in self.trainable():
            if isinstance(t.val.fn, Leaf):
                t.val.fn.grad = None  # the bucket stays

    # ---- FSDP2 -----------------------------------------------------------------------------------
    def _phantom_grad_bytes(self, blocks: int) -> int:
        """DDP: none (each autograd gradient is copied into the buckets, which exist from
        construction, and freed); FSDP2: the blocks' sharded gradients (reduce-scatter outputs)."""
        return 0 if self.z <= 1 else blocks * self.grad_sharded_bytes[0]

    def run_block(self, x: T, i: int, rope):
        if self.z <= 1:
            return super().run_block(x, i, rope)
        self._gather(i, forward=True)
        xi = self._hook_node(x, "post", i)
        out = super().run_block(xi, i, rope)
        self.ops.drop(xi)
        if self.z == 3:
            self._reshard(i)
        y = self._hook_node(out, "pre", i)
        self.ops.drop(out)
        return y

    def forward_loss(self) -> T:
        if self.z <= 1:
            return super().forward_loss()
        self._gather(-1, forward=True)
        loss = super().forward_loss()
        if self.z == 3:  # root post-forward
            self._reshard(-1)
        if self.ag_state is not None:
            self.m.drop(self.ag_state)
            self.ag_state = None
        return loss

    def backward(self, loss: T) -> None:
        if self.z <= 1:
            return super().backward(loss)
        m = self.m
        root, scaled = loss, None
        if self.scaling:  # mixed-fp16: static loss scale, loss * python float (as on one device)
            scaled = root = self.ops.scale(loss)
        g = m.alloc(root.numel * root.esz, "ones_like")
        m.hold(g)
        started = [False]

        def before(node: Node) -> None:
            # root pre-backward: hooked on the forward's output, so after the scaling's node
            if not started[0] and (scaled is None or node is not scaled.val.fn):
                started[0] = True
                if self.z == 3:
                    self._gather(-1, forward=False)
                    self._prefetch(len(self.real_blocks) - 1)
            if self._ck_nodes:
                self._before_node(node)

        m.backward(root.val, g, before_node=before,
                   after_node=self._after_node if self._ck_nodes else None)
        self._ck_nodes.clear()
        # final callback: the root's post-backward, then every reduce-scatter input released
        self._post_backward(-1)
        while self.rs_states:
            m.drop(self.rs_states.pop(0))
        for gg in list(self.unsharded):
            if self.z == 3 or gg not in range(-1, len(self.real_blocks)):
                self._reshard(gg)
        m.drop(g)
        self.ops.drop(scaled)


_numel = math.prod  # elements of a shape


__all__ = ["ParallelProgram"]
