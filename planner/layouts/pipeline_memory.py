"""Per-rank memory of the pipelined reference step, replayed on the step simulator.

``service/validation/pipeline_run.py`` runs the reference model cut into stages
(``planner.layouts.sharding.pipeline_stage_layers``) under ``torch.distributed.pipelining``.
Each rank's step is replayed here op by op, action by action, in the order of the schedule's
per-rank action list (``planner.layouts.pipeline_schedules``), on one ``Machine`` per rank:

- **What a rank holds for the whole run** (torch 2.13, ``pipelining/stage.py``): the parameters
  of its stages (embeddings on stage 0, final norm and output projection on the last stage; the
  rotary tables on every stage, one storage per rank); the whole batch's ``input_ids`` and
  targets (every rank builds them; the micro-batches are ``tensor_split`` views); per stage and
  micro-batch one receive buffer for the stage input (not on stage 0, ``_create_act_recv_info``)
  and one for the output gradient (not on the last stage, ``_create_grad_recv_info``), made in
  the first step and reused.
- **F** (``forward_one_chunk``): the stage's forward under autocast for the amp precisions — the
  embeddings (stage 0) or the receive buffer as an autograd leaf, the blocks, the final norm and
  output projection (last stage) — its output and saved tensors kept in ``fwd_cache``. On the
  last stage the logits also go to ``output_chunks`` (kept until the next step's
  ``clear_runtime_states``) and the schedule computes that micro-batch's loss at once, outside
  autocast: ``cross_entropy(logits.float(), target)`` (``_maybe_compute_loss``; the loss is kept
  in ``_internal_losses`` until the step ends).
- **B** (``stage_backward``): ``autograd.backward`` from the loss (a ``ones_like`` seed) or from
  the stage output with the gradient receive buffer; the parameters' ``.grad`` appear at a
  stage's first backward and accumulate in place after. The input's gradient is handed to the
  send: it lives until the send's work is dropped — GPipe keeps every backward send's work to the
  end of its backward loop, 1F1B keeps the last one until after the next backward.
- **Sends** hold what they send (a gloo/NCCL send work keeps its tensor): the interleaved and
  zero-bubble schedules (``_PipelineScheduleRuntime``) keep every send's work in ``send_ops``
  until the action loop ends, so each stage output sent to another rank and each input gradient
  outlives its backward until then. Schedule1F1B and ScheduleGPipe keep the latest forward's
  output in their ``output`` variable (1F1B also in ``fwd_sends``) until the next forward
  returns, and 1F1B's warm-up ``send_work`` holds its second-to-last warm-up output until the
  1B1F loop ends.
- **V shape** (zb-v, dualpipe-v: rank r holds stages r and 2p-1-r): the two stages on the last
  rank pass tensors without a send. ``set_local_fwd_input`` makes stage p-1's output (detached,
  same storage) stage p's input buffer and ``set_local_bwd_input`` makes stage p's input
  gradient stage p-1's gradient receive buffer; each stays there until the next step's
  hand-off replaces it (the buffers allocated in the first step are freed at the first one).
  DualPipeV's overlapped F&B pairs run their two halves one after the other.
- **I / W** (``stage_backward_input`` / ``stage_backward_weight``, zero-bubble schedules):
  I runs ``autograd.grad`` for the stage input only, with ``retain_graph=True``: nodes on the path
  to the input run (their weight gradients are not computed), every saved tensor stays, and the
  gradient arriving at each node where a weight's path meets the input's path ("intermediates",
  ``get_param_groups``) is kept in the parameter group until W; the input gradient also stays as
  the receive buffer's ``.grad`` until the next step. The graph above the intermediates (the loss
  side) dies with the detached output. W runs ``autograd.grad`` from each group's intermediates
  to its weights (retain_graph=False: executed nodes free their saved tensors), drops the group's
  kept gradients, and then the rest of the graph is released. On stage 0 I does nothing and W is
  a full backward (``backward_weight_one_chunk``).
- **Step end**: the last stage concatenates ``output_chunks`` (``merge_chunks``; returned and
  dropped), then ``optimizer.step()`` over the rank's parameters and ``zero_grad``.

Categories follow the meter of pipeline_run: allocations inside F are activations, the loss and
everything else outside the stage computations are temporaries (the meter's phase is "other"
there), the receive buffers and the batch are activations, parameters' ``.grad`` gradients.
Two steps are replayed; the steady state is the second (optimizer states live).

This replay of the whole list is the oracle. Estimates replay shortened lists instead (the
middle periods of the list's periodic runs left out, ``planner/layouts/pipeline_periods.py``) and
extrapolate every instant's live bytes in the number of periods left out
(``planner/layouts/pipeline_replays.py``): the same peaks, to the byte, at a cost that does not grow
with the micro-batch count; ranks whose shortened lists are alike share their replays; and a
rank's repeated forwards and backwards are composed per kind, not replayed op by op
(``planner/layouts/pipeline_actions.py``: 1F1B, GPipe, interleaved 1F1B).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from planner.catalog.specs import ResolvedModel, TrainingSpec
from planner.layouts.pipeline_backward import Pending
from planner.layouts.pipeline_blocks import run_stage_blocks, stage_plan
from planner.layouts.pipeline_codes import decoded
from planner.layouts.pipeline_stage_backward import StageBackward
from planner.layouts.sharding import pipeline_stage_layers
from planner.machine.deadline import check as check_work_limit
from planner.machine.stepsim import Buf, Leaf, Machine, PeakSnap, Val
from planner.step.ops import F32, T
from planner.step.program import ReferenceProgram

# Schedules torch runs with one stage per rank (Schedule1F1B, ScheduleGPipe: their own send
# bookkeeping); the rest are PipelineScheduleMulti (each action's sends waited at once).
_SINGLE = ("gpipe", "1f1b")


HOLD_WARM_WORK, DROP_WARM_WORK = 1, 2


def rank_actions(schedule, rank: int) -> list[tuple[str, int, int, int]]:
    """The rank's actions as ``(kind, stage, micro-batch, flag)``. Flags (Schedule1F1B only):
    HOLD_WARM_WORK on the second-to-last warm-up forward (warm-up: min(m, S - stage) forwards,
    not on the last stage), whose send work ``send_work`` keeps until the 1B1F loop ends, at the
    backward of micro-batch m - warm-up (DROP_WARM_WORK)."""
    out = [(k, st, j, 0) for k, st, j in decoded(schedule, rank)]
    if schedule.name == "1f1b" and out:
        S, mb = schedule.num_stages, schedule.microbatches
        stage = out[0][1]
        warm = min(mb, S - stage)
        for i, (k, st, j, _) in enumerate(out):
            if k == "F" and st < S - 1 and j == warm - 2:
                out[i] = (k, st, j, HOLD_WARM_WORK)
            elif k == "B" and j == mb - warm:
                out[i] = (k, st, j, DROP_WARM_WORK)
    return out


@dataclass
class StagePeak:
    """One rank's replayed step."""

    rank: int
    stages: list[int]
    first: PeakSnap
    steady: PeakSnap
    in_flight: int = 0


class PipelineRankProgram(StageBackward, ReferenceProgram):
    """One pipeline rank: its stages' parameters and the schedule's actions on one Machine."""

    # the rank's optimizer is built once its stages are known (over their parameters only)
    optimizer_built_later = True
    # only the rank's own blocks get tensors (False: every block's are built and the others'
    # freed, as the full model is; the tests hold the two equal)
    own_blocks_only = True

    def __init__(self, model: ResolvedModel, training: TrainingSpec, schedule, rank: int, *,
                 device: str = "cuda", machine: Machine | None = None,
                 sizes: tuple | None = None, actions: list | None = None,
                 microbatches: int | None = None, compress_blocks: bool = False,
                 one_receive_buffer: bool = False) -> None:
        """``actions`` (with ``microbatches``) replaces the rank's action list: items
        ``(kind, stage, micro-batch, flag)`` as ``rank_actions`` gives them, and markers
        ``("|", ...)`` that call the machine's ``cut()`` (planner/layouts/pipeline_periods.py
        replays shortened lists this way). ``compress_blocks``: the middle blocks of stages of 7
        or more stood in for (planner/layouts/pipeline_blocks.py; under a split backward too).
        ``one_receive_buffer``: each stage's receive buffers as one storage of them all (the same
        bytes), for a loop that never takes one of them alone (planner/layouts/pipeline_tape.py)."""
        S = schedule.num_stages
        self.stages = [s for s in range(S) if schedule.stage_to_rank[s] == rank]
        bounds = [0]
        for n in pipeline_stage_layers(model.num_layers, S):
            bounds.append(bounds[-1] + n)
        self.bounds = bounds
        # only this rank's blocks get tensors (the others' parameters are declared, as the full
        # model is built, and would be freed at once)
        self.built_blocks = {i for st in self.stages for i in range(bounds[st], bounds[st + 1])} \
            if self.own_blocks_only else None
        super().__init__(model, training, device=device, compress=False, machine=machine,
                         sizes=sizes)
        self.sched, self.rank = schedule, rank
        mb = schedule.microbatches if microbatches is None else microbatches
        self.actions = rank_actions(schedule, rank) if actions is None else actions
        self.n_mb = mb
        split = any(a[0] in ("I", "W") for a in self.actions)
        self.split_blocks = split and compress_blocks
        self.block_plans = {st: stage_plan(bounds[st + 1] - bounds[st], compress_blocks)
                            for st in self.stages}
        self.backward_mode: str | None = None  # "I" / "W" while a split backward runs
        self.split_pending: Pending | None = None
        m, s = self.m, self.s
        # Keep only this rank's parameters (the full model's root tensors are built and freed).
        owner: dict[int, int] = {}
        for name, t in self.params.by_name.items():
            if name.startswith("b") and name[1].isdigit():
                i = int(name[1:name.index(".")])
                st = bisect.bisect_right(bounds, i) - 1  # bounds[st] <= i < bounds[st + 1]
            elif name in ("tok_emb", "pos_emb"):
                st = 0
            elif name in ("rope_cos", "rope_sin"):
                st = self.stages[0]  # registered on every stage with blocks: one storage
            else:
                st = S - 1
            owner[id(t)] = st
        # the declared parameters (``param_specs``: the root's before the blocks, ``k`` per
        # block, the root's after them) one of this rank's stages holds, as index ranges in
        # order (the root's tensors are all built: their owners are the ones found above; a
        # stage's blocks are one range, so a deep model's other blocks are never visited)
        head, k = self._spec_layout
        ts = self.params.tensors
        mine = set(self.stages)
        if self.built_blocks is None:  # every tensor built: one per declared parameter
            self._owned = [(i, i + 1) for i, t in enumerate(ts) if owner[id(t)] in mine]
        else:
            n = len(self.param_specs)
            tail = n - head - k * model.num_layers
            spans = [(i, i + 1) for i, t in enumerate(ts[:head]) if owner[id(t)] in mine]
            spans += [(head + k * bounds[st], head + k * bounds[st + 1]) for st in self.stages]
            spans += [(n - tail + i, n - tail + i + 1) for i, t in enumerate(ts[len(ts) - tail:])
                      if owner[id(t)] in mine]
            self._owned = spans
        # one block's parameters: what a phantom's blocks hold as gradients (pipeline_blocks)
        self._block_specs = self.param_specs[head:head + k]
        if self._states_at_init:  # the optimizer over this rank's stages (Adagrad: states now)
            self._states = self._alloc_states()
        for name, t in self.params.by_name.items():
            if owner[id(t)] not in self.stages and t.buf.nbytes:
                m.resize(t.buf, 0)
        # the whole batch's input ids and targets, on every rank (pipeline_run registers both)
        for b in (self.idx.buf, self.tgt.buf):
            m.resize(b, mb * b.nbytes)
        self.res_esz = self.p_esz  # the residual stream: parameter dtype (fp32 under amp)
        act = s.N * s.h * self.res_esz
        self.recv: dict[tuple[int, int], Buf] = {}
        self.grad_recv: dict[tuple[int, int], Buf] = {}
        for st in self.stages:
            for j in range(1 if one_receive_buffer else mb):
                n = mb * act if one_receive_buffer else act
                if st > 0:
                    self.recv[st, j] = m.alloc(n, f"recv[{st},{j}]", "activations")
                if st < S - 1:
                    self.grad_recv[st, j] = m.alloc(n, f"grad_recv[{st},{j}]", "activations")
        self.pending: dict[tuple[int, int], Pending] = {}
        self.output_chunks: list[T] = []
        self.losses: list[T] = []
        self.sends: list[Buf] = []  # input gradients still referenced by send works
        self.input_grads: list[Buf] = []  # receive buffers' .grad after an I (until next step)
        self.in_flight = 0
        self.memo = None  # an ActionMemo (planner/layouts/pipeline_actions.py): kinds composed
        self.tape = None  # the action loop evaluated at once (planner/layouts/pipeline_tape.py)
        self.step_no, self._counts = 0, {}
        m.reset_peak()

    def _trainable_rows(self, specs: list) -> list[tuple[int, tuple[int, ...]]]:
        """This rank's (``trainable_specs``, kept as the whole model's is)."""
        return [(n, shp) for a, b in self._owned for n, shp, rg, _ in specs[a:b] if rg]

    def count(self, key) -> int:
        """How many actions of kind ``key`` this step ran before this one."""
        c = self._counts.get(key, 0)
        self._counts[key] = c + 1
        return c

    def stage_forward(self, st: int, j: int) -> None:
        return self.real_forward(st, j) if self.memo is None else self.memo.forward(self, st, j)

    def stage_backward(self, st: int, j: int) -> None:
        """B (and W on a stage whose I did nothing)."""
        return self.real_backward(st, j) if self.memo is None else self.memo.backward(self, st, j)

    # ---- forward of one stage -------------------------------------------------------------------
    def real_forward(self, st: int, j: int) -> None:
        o, s, m = self.ops, self.s, self.m
        S = self.sched.num_stages
        m.phase = "forward"
        if self.amp_esz is not None:
            o.enter_autocast(self.amp_esz)
        inp = None
        if st == 0:
            x = self.embed()
        else:
            buf = self.recv[st, j]
            leaf = Leaf(f"recv[{st},{j}]", buf.nbytes)
            inp = T(Val(m.hold(buf), leaf), s.N * s.h, self.res_esz)
            x = o.view(inp)
        rope = self.rope()
        phantoms: list = []
        x = run_stage_blocks(self, st, x, rope, self.block_plans[st],
                             phantoms if self.split_blocks else None)
        if st == S - 1:
            x = self.head(x)
        if rope is not None:
            o.drop(*rope)
        if self.amp_esz is not None:
            o.exit_autocast()
        p = Pending(x, inp, phantoms=phantoms)
        m.phase = "other"
        if st < S - 1 and self.sched.stage_to_rank[st + 1] == self.rank:
            # V shape: set_local_fwd_input makes the output (detached, same storage) the next
            # stage's input buffer, which keeps it until the next step replaces it
            old, self.recv[st + 1, j] = self.recv[st + 1, j], m.hold(x.buf)
            m.drop(old)
        elif self.sched.name not in _SINGLE and st < S - 1:
            # _PipelineScheduleRuntime keeps every send's work (which holds the sent tensor)
            # in ``send_ops`` until its action loop ends
            self.sends.append(m.hold(x.buf))
        if st == S - 1:  # output_chunks, then _maybe_compute_loss outside autocast
            self.output_chunks.append(o.view(x))
            lf = o.cast(x, F32) if x.esz != F32 else o.view(x)
            p.loss = o.cross_entropy(lf, s.N, s.V, self.tgt)
            o.drop(lf)
            self.losses.append(o.view(p.loss))
        self.pending[st, j] = p
        self.in_flight += 1

    def _flush_sends(self) -> None:
        self.m.drop(*self.sends)
        self.sends.clear()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> None:
        m, o = self.m, self.ops
        m.phase = "other"
        self.step_no, self._counts = self.step_no + 1, {}
        # clear_runtime_states: previous outputs and receive buffers' .grad
        o.drop(*self.output_chunks)
        self.output_chunks.clear()
        m.drop(*self.input_grads)
        self.input_grads.clear()
        for b in self.grad_recv.values():  # pipeline_run registers the receive buffers
            m.recategorize(b, "activations")  # (V shape: last step's input gradients)
        name = self.sched.name
        single = name in _SINGLE
        # Schedule1F1B / ScheduleGPipe: the ``output`` variable (and 1F1B's ``fwd_sends``
        # P2P ops) hold the latest forward's output until the next forward returns, or to the
        # end of the step. 1F1B's warm-up keeps the send work of its second-to-last warm-up
        # forward in ``send_work`` until the 1B1F loop ends (flags of ``rank_actions``).
        latest: Buf | None = None
        warm_work: Buf | None = None
        taped = self.tape is not None and self.tape(self)  # the whole loop at once
        for kind, st, j, flag in () if taped else self.actions:
            check_work_limit()
            if kind == "|":  # a cut between kept and stood-in periods (pipeline_periods)
                m.cut()
                continue
            if kind == "F":
                self.stage_forward(st, j)
                if single:
                    m.drop(latest)
                    latest = m.hold(self.pending[st, j].out.buf)
                    if flag == HOLD_WARM_WORK:
                        warm_work = m.hold(latest)
            elif kind == "B":
                if name == "1f1b":  # the previous backward's send is kept until this one ends
                    keep, self.sends = self.sends, []
                    self.stage_backward(st, j)
                    m.drop(*keep)
                    if flag == DROP_WARM_WORK and warm_work is not None:
                        m.drop(warm_work)
                        warm_work = None
                else:
                    self.stage_backward(st, j)
            elif kind == "I":
                self.stage_backward_input(st, j)
            else:
                self.stage_backward_weight(st, j)
        self._flush_sends()
        m.drop(latest, warm_work)
        o.drop(*self.losses)  # _update_losses
        self.losses.clear()
        if self.output_chunks:  # merge_chunks: torch.cat of every micro-batch's output
            b = m.alloc(sum(t.numel * t.esz for t in self.output_chunks), "cat")
            m.drop(b)
        m.phase = "optimizer"

    def run_steps(self) -> StagePeak:
        return StagePeak(self.rank, self.stages, *self.step_windows())

    def step_windows(self) -> list:
        """Two steps: the first (no optimizer states yet) and the steady one; the machine's peak
        of each (a window id on the step template's recording machine)."""
        m = self.m
        m.reset_peak()
        self.step()
        self.optimizer_step(first=True)
        first = m.peak
        m.phase = "other"
        m.reset_peak()
        self.step()
        self.optimizer_step(first=False)
        return [first, m.peak]


def unsupported_reason(training: TrainingSpec, parallel) -> str | None:
    """Why this pipelined setup is outside the replay (None when it is replayed)."""
    if parallel.data_parallel != 1 or parallel.tensor_parallel != 1 or parallel.zero_stage:
        return "pipeline parallelism combined with data or tensor parallelism is not replayed"
    if parallel.offload_optimizer or parallel.offload_parameters:
        return "CPU offload is not replayed"
    if training.precision not in ("fp32", "amp-bf16", "bf16") or training.precision_overrides:
        return f"precision {training.precision!r} is not run pipelined"
    if (training.activation_checkpointing.strategy != "none"
            or training.activation_checkpointing.blocks):
        return "activation checkpointing is not replayed per pipeline stage"
    if training.lora is not None:
        return "LoRA is not replayed per pipeline stage"
    if training.dropout > 0:
        return "dropout is not replayed per pipeline stage"
    if training.optimizer in ("adam-8bit", "lion"):
        return f"optimizer {training.optimizer!r} has no torch.optim implementation"
    if parallel.pipeline_schedule not in ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v",
                                          "dualpipe-v"):
        return f"schedule {parallel.pipeline_schedule!r} is not replayed per rank"
    return None


__all__ = ["PipelineRankProgram", "StagePeak", "rank_actions", "unsupported_reason"]
