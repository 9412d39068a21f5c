"""Step time of one parallel layout: compute, exposed communication and the pipeline bubble.

What it assumes (each stated in the plan's ``assumptions``):
- Compute: FLOPs per token per block forward 2·P_block + 4·s·h (matmuls and attention scores,
  the convention of torchtitan's and PaLM's MFU), backward twice the forward (Kaplan et al.
  2020 §2.1); the output projection 2·V·h forward on the last stage. Recompute adds the forward
  of every checkpointed block ('full': all, 'sqrt': those the planner checkpoints) or the attention
  core 4·s·h ('selective'); the 'chunked-linear' loss the output projection's forward (each
  chunk's logits recomputed in backward; 'chunked' computes as 'standard'). Time = FLOPs / (tensor_parallel × peak 16-bit FLOP/s × utilisation),
  the utilisation one number per GPU kind (``DEFAULT_MFU``).
- Memory-bound work (``block_hbm_bytes``): the elementwise kernels between the matmuls move
  their tensors through HBM at the catalog's memory bandwidth, added to the compute time: per
  token and block forward, two norms (read and write h), two residual adds (read 2h, write h),
  the MLP activation (fused bias-GeLU: read and write f; SwiGLU: SiLU read and write f, the
  product read 2f and write f) and Llama's rotary embedding (q and k read and written); norms
  and adds on every TP rank, the rest split. With ``unfused_attention`` (2021's Megatron-LM,
  not FlashAttention/SDPA) the [s, s] scores of each head go through HBM too: written by QK^T,
  read and written by the softmax and by the attention dropout (with a 1-byte mask), read by the
  PV matmul. Backward moves 1.5 times the forward's bytes (output gradient and saved input
  read, input gradient written, where forward reads one and writes one); a recomputed forward
  its bytes again. Left out: the loss's logits traffic, dropout elsewhere, optimizer step.
- Collectives on n ranks moving B bytes (ring, bandwidth term only): all-reduce 2(n−1)/n·B/bw,
  all-gather and reduce-scatter (n−1)/n·B/bw; p2p B/bw; bw one direction (the intra-node link
  half the catalog's both-directions figure, ``intra_node_bytes_per_s``). Ranks are ordered tensor-parallel
  innermost, then data-parallel, then pipeline (Megatron-LM's order): a group within one node
  uses the intra-node bandwidth; a group across nodes with k GPUs in each node min(intra,
  k × per-GPU inter-node bandwidth) (topology-aware rings cross a node boundary once per
  channel, one channel per NIC).
- Tensor parallelism: two all-reduces of the (b, s, h) activation per block in forward, two in
  backward, two more in a recomputed forward; on the critical path (not overlapped).
- Data parallelism: gradients reduced once per step (all-reduce for ZeRO 0; reduce-scatter and
  parameter all-gather for ZeRO 1/2), overlapped with the last micro-batch's backward: only what
  exceeds it is exposed. ZeRO-3 gathers parameters twice and reduce-scatters gradients every
  micro-batch, prefetched under that micro-batch's compute: only the excess is exposed.
- Pipeline: per-stage forward/backward costs (TP communication included) and the activation
  send go through the schedule simulator (``planner/layouts/pipeline_sim.py``); its makespan
  minus the slowest rank's busy time is the bubble.
- Offload (ZeRO-Offload's schedule, Ren et al. 2021, arXiv:2101.06840, §4): with the optimizer
  offloaded, the gradient shard goes to the host during the last micro-batch's backward (only
  what exceeds it is exposed), the optimizer step runs on the host CPU at DeepSpeed's CPU-Adam
  rate (``CPU_ADAM_PARAMS_PER_S``, one host's CPUs shared by the GPUs of its node), and the
  updated 16-bit parameter shard comes back chunk by chunk while the CPU works on the next
  chunk: max(CPU step, copy back) is exposed. Parameter offload moves the parameter shard in
  for forward and backward of every micro-batch, over the host link, not overlapped.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from planner.catalog.parameters import count_parameters
from planner.catalog.presets import GPU
from planner.catalog.specs import Assumption, ResolvedModel
from planner.layouts.pipeline_schedules import schedule_of
from planner.layouts.pipeline_sim import simulate

# Fraction of the dense 16-bit peak the step's matmuls reach, per GPU kind. Chosen once per kind
# and checked against published runs (tests/test_plan_time.py): A100 from torchtitan's FSDP runs
# on 64 A100-80GB (docs/performance.md, 50.5-61.1% MFU), H100 from torchtitan's Llama 3.1 8B on
# 8 H100 at a 500 W limit (33-39% MFU) and Megatron-Core's up to 47% on H100; V100 from
# ZeRO-100B's 100B-parameter GPT on 400 V100s at 15 petaFLOP/s, 37.5 teraFLOP/s per GPU
# (Rajbhandari et al. 2020, arXiv:1910.02054, abstract and §10.2), checked against ZeRO-Offload's
# 10B model on one V100 (tests/test_plan_time_zero.py).
DEFAULT_MFU = {"a100": 0.64, "h100": 0.42, "h200": 0.42, "v100": 0.39}
FALLBACK_MFU = 0.45

# DeepSpeed's CPU-Adam (DeepSpeedCPUAdam: AVX-512, unrolled, OpenMP over every core) updates a
# 10B-parameter model in 2.57 s on one DGX-2's host CPUs (Ren et al. 2021, ZeRO-Offload,
# arXiv:2101.06840, its Adam latency table: 0.22 s for 1B, 1.03 s for 4B, 2.57 s for 10B
# parameters; 5-7x PyTorch's CPU Adam). Parameters per second of one host, all its cores: the
# GPUs of a node share it. Taken for every optimizer (lighter ones update faster).
CPU_ADAM_PARAMS_PER_S = 10e9 / 2.57


def intra_node_bytes_per_s(gpu: GPU) -> float:
    """One direction of the catalog's intra-node bandwidth (the catalog gives both directions
    together, ``GPU.interconnect_one_direction_bytes_per_s``); a ring sends each rank's share one
    way while it receives the other, so its bandwidth term takes one direction."""
    return gpu.interconnect_one_direction_bytes_per_s


def default_mfu(gpu: GPU) -> float:
    for prefix, v in DEFAULT_MFU.items():
        if gpu.name.startswith(prefix):
            return v
    return FALLBACK_MFU


@dataclass(frozen=True)
class Links:
    gpus_per_node: int
    intra_bytes_per_s: float
    inter_bytes_per_s: float
    host_bytes_per_s: float
    flops_per_s: float  # peak x utilisation
    cpu_adam_params_per_s: float = CPU_ADAM_PARAMS_PER_S  # one host's optimizer rate
    hbm_bytes_per_s: float = math.inf  # GPU memory bandwidth (inf: memory-bound work free)
    unfused_attention: bool = False  # the [s, s] attention scores go through HBM

    def bandwidth(self, size: int, stride: int = 1) -> float:
        """Of a collective over ``size`` ranks ``stride`` apart. Within a node: the intra-node
        link. Across nodes: a topology-aware ring (NCCL's rings cross each node boundary once
        per channel) is limited by the node's share, k GPUs of the group per node each with its
        own NIC: min(intra, k × inter)."""
        if size * stride <= self.gpus_per_node:
            return self.intra_bytes_per_s
        k = max(1, min(size, self.gpus_per_node // stride))
        return min(self.intra_bytes_per_s, k * self.inter_bytes_per_s)


def all_reduce_s(nbytes: float, n: int, bw: float) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw


def gather_s(nbytes: float, n: int, bw: float) -> float:
    """All-gather or reduce-scatter of a ``nbytes`` whole."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bw


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    v: int
    schedule: str
    zero: int
    offload_optimizer: bool
    offload_parameters: bool
    checkpoint: str
    b: int
    ga: int
    recompute: float | None = None  # fraction of blocks recomputed, overriding the strategy's
    loss: str = "standard"  # 'chunked-linear' recomputes the output projection in backward


@dataclass(frozen=True)
class TimeParts:
    compute_s: float
    tp_s: float
    dp_s: float
    pp_s: float
    offload_s: float
    bubble_s: float
    step_s: float


def model_flops_per_token(model: ResolvedModel, s: int) -> float:
    """6·N (matmul weights: blocks and output projection) + 12·l·h·s (torchtitan's MFU)."""
    c = count_parameters(model)
    n = c.num_layers * c.per_layer + model.vocab_size * model.hidden_size
    return 6 * n + 12 * model.num_layers * model.hidden_size * s


def block_hbm_bytes(model: ResolvedModel, s: int, t: int, act_bytes: int,
                    unfused_attention: bool) -> tuple[float, float]:
    """(bytes per token one block's forward moves through HBM outside the matmuls on one of
    ``t`` TP ranks, the part of it that is the attention scores); see the module docstring."""
    h = model.hidden_size
    f = model.ffn_hidden_size or 4 * h
    gated = model.family != "gpt2"
    elems = 4 * h + 6 * h + (5 * f if gated else 2 * f) / t
    if gated:  # rotary embedding: q and k read and written
        kv = (model.num_kv_heads or model.num_heads) * (h // model.num_heads)
        elems += 2 * (h + kv) / t
    scores = (6 * act_bytes + 1) * model.num_heads * s / t if unfused_attention else 0.0
    return elems * act_bytes + scores, scores


def _recomputed_blocks(checkpoint: str, num_layers: int) -> float:
    """Fraction of blocks whose forward runs again (the planner's own plans)."""
    if checkpoint == "full":
        return 1.0
    if checkpoint == "sqrt":  # planner.routes.checkpoint_blocks.checkpointed_blocks
        k = max(1, round(math.sqrt(num_layers)))
        return sum(1 for i in range(num_layers) if i % k != k - 1) / num_layers
    return 0.0


@functools.lru_cache(maxsize=1 << 17)
def step_time(model: ResolvedModel, seq: int, act_bytes: int, grad_bytes: int, lay: Layout,
              links: Links, exact: bool = True) -> TimeParts:
    """One optimizer step of ``lay`` (see the module docstring). ``exact=False``: a lower
    bound without simulating the pipeline (no bubble, no exposed p2p: the makespan is at
    least the slowest rank's busy time)."""
    makespan, busy, bubble, p2p_exposed, tp_total, f_slow, b_slow = _pipeline_part(
        model, seq, act_bytes, lay.dp, lay.tp, lay.pp, lay.v, lay.schedule, lay.checkpoint,
        lay.b, lay.ga, links, exact, lay.recompute, lay.loss == "chunked-linear")
    compute = busy - tp_total
    # data parallelism over the stage's parameter shard (worst stage: most layers + head)
    c = _counts(model)
    h, L, m, t = model.hidden_size, model.num_layers, lay.ga, lay.tp
    params = (math.ceil(L / lay.pp) * c.per_layer + model.vocab_size * h) / t
    d, dbw = lay.dp, links.bandwidth(lay.dp, lay.tp)
    if lay.zero == 3:
        per_mb = 2 * gather_s(params * act_bytes, d, dbw) + gather_s(params * grad_bytes, d, dbw)
        dp_exposed = m * max(0.0, per_mb - (f_slow + b_slow))
    else:
        if lay.zero == 0:
            grads = all_reduce_s(params * grad_bytes, d, dbw)
            gather = 0.0
        else:  # reduce-scatter the gradients, all-gather the updated parameters
            grads = gather_s(params * grad_bytes, d, dbw)
            gather = gather_s(params * act_bytes, d, dbw)
        dp_exposed = max(0.0, grads - b_slow) + gather
    shard = params / (d if lay.zero >= 1 else 1)
    offload = 0.0
    if lay.offload_optimizer:
        to_host = shard * grad_bytes / links.host_bytes_per_s
        back = shard * act_bytes / links.host_bytes_per_s
        offload += max(0.0, to_host - b_slow) + max(back, cpu_optimizer_s(shard, lay, links))
    if lay.offload_parameters:
        offload += m * 2 * shard * act_bytes / links.host_bytes_per_s
    step = makespan + dp_exposed + offload
    return TimeParts(compute_s=compute, tp_s=tp_total, dp_s=dp_exposed, pp_s=p2p_exposed,
                     offload_s=offload, bubble_s=bubble, step_s=step)


def cpu_optimizer_s(shard: float, lay: Layout, links: Links) -> float:
    """The host CPU's optimizer step over one GPU's ``shard`` of parameters: the node's GPUs
    (all of the layout's, up to ``gpus_per_node``) update their shards on the same host at
    once, so each gets its share of the host's rate."""
    sharing = min(lay.dp * lay.tp * lay.pp, links.gpus_per_node)
    return shard * sharing / links.cpu_adam_params_per_s


@functools.lru_cache(maxsize=64)
def _counts(model: ResolvedModel):
    return count_parameters(model)


@functools.lru_cache(maxsize=65536)
def _pipeline_part(model: ResolvedModel, s: int, act_bytes: int, dp: int, t: int, pp: int,
                   v: int, schedule: str, checkpoint: str, b: int, m: int, links: Links,
                   exact: bool, recompute: float | None = None, head_recompute: bool = False,
                   free_p2p: bool = False):
    """(makespan, slowest rank's busy time, bubble, exposed p2p, TP time, slowest rank's
    forward and backward per micro-batch) of the forward/backward passes."""
    c = _counts(model)
    h, L = model.hidden_size, model.num_layers
    tokens = b * s
    n_stages = pp * v
    block_fwd = tokens * (2 * c.per_layer + 4 * s * h)
    head_fwd = tokens * 2 * model.vocab_size * h
    rec = _recomputed_blocks(checkpoint, L) if recompute is None else recompute
    attn_rec = tokens * 4 * s * h if checkpoint == "selective" else 0
    hbm, scores = block_hbm_bytes(model, s, t, act_bytes, links.unfused_attention)
    mem_fwd = tokens * hbm / links.hbm_bytes_per_s
    mem_rec = tokens * scores / links.hbm_bytes_per_s if checkpoint == "selective" else 0.0
    # TP: 2 all-reduces of (b, s, h) per block forward, 2 backward, 2 per recomputed forward
    tp_ar = all_reduce_s(tokens * h * act_bytes, t, links.bandwidth(t))
    rate = t * links.flops_per_s
    f_s, bwd_s, tp_st = [], [], []
    for st in range(n_stages):
        layers = (st + 1) * L // n_stages - st * L // n_stages
        fwd = layers * block_fwd + (head_fwd if st == n_stages - 1 else 0)
        bwd = 2 * fwd + layers * (rec * block_fwd + attn_rec)
        if head_recompute and st == n_stages - 1:
            bwd += head_fwd
        tf, tb = layers * 2 * tp_ar, layers * (2 + 2 * rec) * tp_ar
        mem_f = layers * mem_fwd
        mem_b = layers * (1.5 * mem_fwd + rec * mem_fwd + mem_rec)
        f_s.append(fwd / rate + mem_f + tf)
        bwd_s.append(bwd / rate + mem_b + tb)
        tp_st.append(tf + tb)
    rf = [sum(f_s[r::pp]) for r in range(pp)]
    rb = [sum(bwd_s[r::pp]) for r in range(pp)]
    slow = max(range(pp), key=lambda r: rf[r] + rb[r])
    tp_total = m * sum(tp_st[slow::pp])
    if pp == 1 or not exact:
        busy = m * (rf[slow] + rb[slow])
        return busy, busy, 0.0, 0.0, tp_total, rf[slow], rb[slow]
    p2p = 0.0 if free_p2p else tokens * h * act_bytes / links.bandwidth(2, t * dp)
    makespan, busy, p2p_exposed = _pipeline(schedule, pp, m, v, f_s, bwd_s, p2p)
    bubble = max(0.0, makespan - busy)
    return makespan, busy, bubble, p2p_exposed, tp_total, rf[slow], rb[slow]


def _pipeline(schedule: str, p: int, m: int, v: int, f_s: list[float], b_s: list[float],
              p2p: float) -> tuple[float, float, float]:
    """(makespan, slowest rank's busy time, exposed p2p) from the schedule simulator. Costs are
    memoised relative to the first stage's forward, rounded to 0.1 %: the makespan scales with
    them."""
    unit = f_s[0]
    key = tuple(round(x / unit, 3) for x in f_s + b_s) + (round(p2p / unit, 3),)
    mk, busy = _simulated(schedule, p, m, v, key)
    return mk * unit, busy * unit, 0.0


def p2p_exposed_s(model: ResolvedModel, seq: int, act_bytes: int, lay: Layout,
                  links: Links) -> float:
    """The part of the pipeline's makespan the stage-to-stage sends add: the makespan minus
    that of the same schedule with free links (a second simulation, run for reported layouts
    only)."""
    if lay.pp == 1:
        return 0.0
    args = (model, seq, act_bytes, lay.dp, lay.tp, lay.pp, lay.v, lay.schedule, lay.checkpoint,
            lay.b, lay.ga, links, True, lay.recompute, lay.loss == "chunked-linear")
    return max(0.0, _pipeline_part(*args)[0] - _pipeline_part(*args, True)[0])


@functools.lru_cache(maxsize=8192)
def _simulated(schedule: str, p: int, m: int, v: int, key: tuple[float, ...]):
    n = p * v
    f, bwd, comm = list(key[:n]), list(key[n:2 * n]), key[-1]
    sched = schedule_of(schedule, p, m, v)
    zero = [0.0] * n
    out = simulate(sched, f, bwd, zero, comm)
    return out.makespan_s, max(out.busy_s)


def assumptions(gpu: GPU, links: Links, mfu: float) -> list[Assumption]:
    return [
        Assumption(name="model_flops_utilization", value=f"{mfu:g}",
                   note=f"fraction of {gpu.name}'s dense 16-bit peak ({gpu.peak_bf16_flops:.4g} "
                   "FLOP/s) the matmuls reach; compute = FLOPs (recompute included) at that rate"),
        Assumption(name="memory_bound_work", value=f"{links.hbm_bytes_per_s:.4g} B/s",
                   note="norms, residual adds, the MLP activation and rotary embedding move their "
                   "tensors through HBM at this rate (backward 1.5x the forward's bytes), added "
                   "to compute; attention fused (FlashAttention/SDPA: the scores stay on chip)")
        if math.isfinite(links.hbm_bytes_per_s) else
        Assumption(name="memory_bound_work", value="not priced",
                   note="compute is the FLOPs alone; the elementwise work is left out"),
        Assumption(name="intra_node_bytes_per_s", value=f"{links.intra_bytes_per_s:.4g}",
                   note=f"{links.gpus_per_node} GPUs per node, one direction (half the "
                   f"catalog's {gpu.interconnect_bytes_per_s:.4g}, both directions); groups "
                   "within a node"),
        Assumption(name="inter_node_bytes_per_s", value=f"{links.inter_bytes_per_s:.4g}",
                   note="per GPU, one direction; any group spanning nodes"),
        Assumption(name="collectives", value="ring, bandwidth term",
                   note="all-reduce 2(n-1)/n·B/bw, all-gather and reduce-scatter (n-1)/n·B/bw, "
                   "p2p B/bw; ranks ordered tensor, data, pipeline (innermost first); a group "
                   "across nodes gets min(intra, k × inter) with k of its GPUs per node"),
        Assumption(name="overlap", value="TP exposed; DP hidden under backward; ZeRO-3 gathers "
                   "prefetched; p2p overlapped by the pipeline simulator; gradients to the host "
                   "under the last backward; CPU optimizer step and parameter offload exposed",
                   note="only communication longer than the compute it overlaps is added"),
        Assumption(name="host_bytes_per_s", value=f"{links.host_bytes_per_s:.4g}",
                   note="offloaded states cross the host link once per use; gradients to the "
                   "host under the last backward, the updated parameters back while the CPU "
                   "steps (ZeRO-Offload's schedule)"),
        Assumption(name="cpu_optimizer_params_per_s",
                   value=f"{links.cpu_adam_params_per_s:.4g}",
                   note="with the optimizer offloaded, the step runs on the host CPU at "
                   "DeepSpeed CPU-Adam's rate (10B parameters in 2.57 s on a DGX-2's CPUs, "
                   "Ren et al. 2021), shared by the node's GPUs; exposed"),
    ]
