"""The plan's time model (planner/routes/plan_time.py) against published training runs.

The utilisation per GPU kind (plan_time.DEFAULT_MFU) is one number per kind, chosen once; these
checks hold what the model adds on top of it (recompute, exposed communication, the pipeline
bubble, the FLOPs of each architecture) against measured throughput. Stated errors:

- torchtitan FSDP (6 runs, communication hidden): within ±10 % of each published figure
  (−7.6 % to +2.7 %).
- Megatron-LM, Narayanan et al. 2021 (arXiv:2104.04473, SC21), Table 1 (weak scaling, GPT with
  vocabulary 51,200, sequence 2048, full activation recomputation, A100 80GB, 8 per node) and
  Table 2's PTD-P rows (GPT-3 175B at TP 8 × PP 12, 530B at TP 8 × PP 35). Micro-batch 1, 1F1B,
  fp16 gradient all-reduce; 2021's Megatron-LM attention (the [s, s] scores through HBM:
  ``unfused_attention``). The model's TFLOP/s per GPU (the paper's own FLOP count, Eq. 3)
  against the published, with the memory-bound work priced and, before it was (matmul FLOPs
  only), in the last column:

  params   t  p  GPUs  batch  published  model  error   (matmuls only)
  1.7B     1  1    32    512        137    142   +3.9 %   +45.7 %
  3.6B     2  1    64    512        138    144   +4.4 %   +38.1 %
  7.5B     4  1   128    512        142    148   +4.1 %   +26.2 %
  18.4B    8  1   256   1024        135    142   +4.8 %   +22.6 %
  39.1B    8  2   512   1536        138    148   +7.3 %   +21.8 %
  76.1B    8  4  1024   1792        140    149   +6.6 %   +18.5 %
  145.6B   8  8  1536   2304        148    151   +2.1 %   +11.9 %
  310.1B   8 16  1920   2160        155    152   −1.7 %    +5.5 %
  529.6B   8 35  2520   2520        163    153   −6.3 %    −1.4 %
  1008.0B  8 64  3072   3072        163    154   −5.4 %    −1.4 %
  174.6B   8 12   384   1536        153    158   +3.1 %   +13.0 %  (Table 2, PTD-P)
  174.6B   8 12   768   1536        149    153   +2.8 %   +12.6 %
  174.6B   8 12  1536   1536        141    145   +2.7 %   +12.4 %
  529.6B   8 35   560   2240        171    166   −2.7 %    +2.5 %
  529.6B   8 35  1120   2240        167    162   −3.2 %    +1.9 %
  529.6B   8 35  2240   2240        159    153   −4.0 %    +1.1 %

  Matmul FLOPs alone left the model optimistic below 300B, the more so the smaller the hidden
  size: the memory-bound work (the attention scores, a·s per token and block against the
  matmuls' 24h², layer norms, GeLU and residual adds replicated on every TP rank) grows
  relative to the matmuls as h shrinks. Priced at HBM bandwidth (plan_time.block_hbm_bytes),
  every row is within ±10 % (the checks); at 1.7B the scores alone are 89 % of the block's
  traffic. The TP all-reduces run at one direction of NVLink (300 GB/s on A100). The rows with
  t > 1 exercise the exposed TP all-reduces, those with p > 1 the bubble (up to 11 % of the
  step at p = 35 and 64).

  Table 2's ZeRO-3 rows and the ZeRO papers' V100 runs: tests/test_plan_time_zero.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from planner.catalog.presets import get_gpu, resolve_model
from planner.catalog.specs import ModelSpec
from planner.routes.plan_time import (
    Layout,
    Links,
    all_reduce_s,
    default_mfu,
    gather_s,
    intra_node_bytes_per_s,
    model_flops_per_token,
    step_time,
)


def _links(gpu: str, unfused_attention: bool = False) -> Links:
    g = get_gpu(gpu)
    return Links(8, intra_node_bytes_per_s(g), g.network_bytes_per_s, g.host_bytes_per_s,
                 g.peak_bf16_flops * default_mfu(g), hbm_bytes_per_s=g.memory_bandwidth_bytes_per_s,
                 unfused_attention=unfused_attention)


# torchtitan's "selective op" activation checkpointing keeps every second matmul's output and
# recomputes the rest of each block (torchtitan/models/llama3/infra/parallelize.py, _save_list
# and the "recompute every second mm" rule). Counting a Llama block's saved tensors per token
# (q, v, gate, down outputs and the attention output and block input kept: about 62k of the
# 165k elements a block keeps without checkpointing, h=8192, f=28672) it keeps ~3/8 of the
# block's activations: memplan states it as 5 of every 8 blocks recomputed (time) or
# checkpointed (memory, tests/test_plan.py).
SELECTIVE_OP_RECOMPUTE = 5 / 8

# pytorch/torchtitan docs/performance.md (FSDP2 on 64 A100 80GB; Llama 3 at sequence 8192,
# Llama 2 at 4096; WPS = tokens per second per GPU) and its Llama 3.1 8B table on 8 H100
# (local batch 2, selective AC, 5,762 TPS/GPU). (preset, gpu, GPUs, local batch, sequence,
# strategy, published tokens/s per GPU)
TORCHTITAN = [
    ("llama-3-8b", "a100-80gb", 64, 1, 8192, "selective-op", 2973),
    ("llama-3-70b", "a100-80gb", 64, 1, 8192, "full", 331),
    ("llama-2-13b", "a100-80gb", 64, 2, 4096, "none", 2162),
    ("llama-2-70b", "a100-80gb", 64, 1, 4096, "selective-op", 355),
    ("llama-2-70b", "a100-80gb", 64, 2, 4096, "full", 353),
    ("llama-3-8b", "h100-80gb", 8, 2, 8192, "selective-op", 5762),
]


@pytest.mark.parametrize("preset,gpu,n,b,s,strategy,published", TORCHTITAN)
def test_torchtitan_fsdp_throughput(preset, gpu, n, b, s, strategy, published):
    model = resolve_model(ModelSpec(preset=preset))
    op = strategy == "selective-op"
    lay = Layout(dp=n, tp=1, pp=1, v=1, schedule="1f1b", zero=3, offload_optimizer=False,
                 offload_parameters=False, checkpoint="none" if op else strategy, b=b, ga=1,
                 recompute=SELECTIVE_OP_RECOMPUTE if op else None)
    # FSDP2 in torchtitan: bf16 parameters gathered, fp32 gradient reduction
    t = step_time(model, s, 2, 4, lay, _links(gpu))
    tokens_per_gpu = b * s / t.step_s
    assert abs(tokens_per_gpu - published) / published <= 0.10, (tokens_per_gpu, published)


# Narayanan et al. 2021 (arXiv:2104.04473), Table 1: (parameters in billions, heads, hidden,
# layers, tensor parallel, pipeline parallel, GPUs, batch, achieved TFLOP/s per GPU)
MEGATRON_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
# Table 2, PTD-P rows (micro-batch 1): GPT-3 175B (96 heads, hidden 12288, 96 layers) at model
# parallel size 96 (TP 8 × PP 12) and 530B at 280 (TP 8 × PP 35)
MEGATRON_TABLE_2_PTDP = [
    (174.6, 96, 12288, 96, 8, 12, 384, 1536, 153),
    (174.6, 96, 12288, 96, 8, 12, 768, 1536, 149),
    (174.6, 96, 12288, 96, 8, 12, 1536, 1536, 141),
    (529.6, 128, 20480, 105, 8, 35, 560, 2240, 171),
    (529.6, 128, 20480, 105, 8, 35, 1120, 2240, 167),
    (529.6, 128, 20480, 105, 8, 35, 2240, 2240, 159),
]


def _megatron_error(row, unfused_attention: bool = True) -> tuple[float, object]:
    """(model / published − 1, step parts) of a Megatron-LM row: GPT, vocabulary 51,200,
    sequence 2048, full recomputation, micro-batch 1, 1F1B, fp16 gradients, A100 80GB."""
    billions, heads, h, L, t, p, n, batch, published = row
    V, s = 51200, 2048
    model = resolve_model(ModelSpec(family="gpt2", num_layers=L, hidden_size=h, num_heads=heads,
                                    vocab_size=V, max_sequence_length=s))
    assert model.num_parameters / 1e9 == pytest.approx(billions, abs=0.05)  # the table's count
    d = n // (t * p)
    lay = Layout(dp=d, tp=t, pp=p, v=1, schedule="1f1b", zero=0, offload_optimizer=False,
                 offload_parameters=False, checkpoint="full", b=1, ga=batch // d)
    st = step_time(model, s, 2, 2, lay, _links("a100-80gb", unfused_attention))
    # the paper's FLOP count (Eq. 3, recomputed forward included)
    flops = 96 * batch * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    return flops / st.step_s / n / (published * 1e12) - 1, st


@pytest.mark.parametrize("row", MEGATRON_TABLE_1, ids=lambda r: f"{r[0]}B")
def test_megatron_weak_scaling_table(row):
    err, st = _megatron_error(row)
    assert abs(err) <= 0.10, err
    if row[5] > 1:
        assert st.bubble_s > 0 and st.tp_s > 0


def test_memory_bound_work_is_the_small_models_gap():
    """Without the memory-bound work (HBM free) the 1.7B row is 46 % optimistic and the
    error falls along the table; with it, the table is flat within 14 points. At 1.7B most of
    it is the attention scores (89 % of a block's bytes): with them on chip (FlashAttention)
    the row is +39 %."""
    free = [_megatron_error(r, False)[0] for r in MEGATRON_TABLE_1]
    priced = [_megatron_error(r)[0] for r in MEGATRON_TABLE_1]
    assert max(priced) - min(priced) <= 0.14, priced
    assert all(a > b for a, b in zip(free, priced))
    row = MEGATRON_TABLE_1[0]
    _, heads, h, L, t, p, n, batch, _ = row
    model = resolve_model(ModelSpec(family="gpt2", num_layers=L, hidden_size=h, num_heads=heads,
                                    vocab_size=51200, max_sequence_length=2048))
    d = n // (t * p)
    lay = Layout(dp=d, tp=t, pp=p, v=1, schedule="1f1b", zero=0, offload_optimizer=False,
                 offload_parameters=False, checkpoint="full", b=1, ga=batch // d)
    links = dataclasses.replace(_links("a100-80gb"), hbm_bytes_per_s=math.inf)
    matmuls = step_time(model, 2048, 2, 2, lay, links).step_s
    flash = step_time(model, 2048, 2, 2, lay, _links("a100-80gb")).step_s
    unfused = step_time(model, 2048, 2, 2, lay, _links("a100-80gb", True)).step_s
    assert flash / matmuls - 1 == pytest.approx(0.046, abs=0.01)
    assert _megatron_error(row, False)[0] == pytest.approx(0.39, abs=0.02)
    assert unfused / matmuls - 1 == pytest.approx(0.40, abs=0.03)


@pytest.mark.parametrize("row", MEGATRON_TABLE_2_PTDP, ids=lambda r: f"{r[0]}B-{r[6]}")
def test_megatron_ptdp_rows(row):
    err, st = _megatron_error(row)
    assert abs(err) <= 0.10, err
    assert st.bubble_s > 0 and st.tp_s > 0


def test_megatron_trillion_parameter_run():
    """Narayanan et al. 2021 (arXiv:2104.04473), abstract and Table 1's last row: a 1T-parameter
    GPT (128 layers, hidden 25600, 160 heads, vocabulary 51200, sequence 2048) on 3072 A100s
    with tensor parallel 8, pipeline parallel 64 and batch 3072 runs at 502 petaFLOP/s, 163
    teraFLOP/s per GPU (52 % of peak). Their count includes the recomputed forward (full
    activation recomputation, 96·B·s·l·h²(1 + s/6h + V/16lh) per step)."""
    model = resolve_model(ModelSpec(family="gpt2", num_layers=128, hidden_size=25600,
                                    num_heads=160, vocab_size=51200, max_sequence_length=2048))
    n, t, p, batch, s = 3072, 8, 64, 3072, 2048
    d = n // (t * p)
    lay = Layout(dp=d, tp=t, pp=p, v=1, schedule="1f1b", zero=0, offload_optimizer=False,
                 offload_parameters=False, checkpoint="full", b=1, ga=batch // d)
    st = step_time(model, s, 2, 2, lay, _links("a100-80gb", unfused_attention=True))
    L, h, V = 128, 25600, 51200
    flops = 96 * batch * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    per_gpu = flops / st.step_s / n
    assert abs(per_gpu - 163e12) / 163e12 <= 0.10, per_gpu / 1e12
    assert st.bubble_s > 0 and st.tp_s > 0  # the pipeline and TP parts are in it


def test_collective_formulas():
    # ring all-reduce moves 2(n-1)/n of the buffer per rank; gathers (n-1)/n
    assert all_reduce_s(8e9, 8, 1e9) == pytest.approx(14.0)
    assert gather_s(8e9, 8, 1e9) == pytest.approx(7.0)
    assert all_reduce_s(8e9, 1, 1e9) == 0.0
    links = Links(8, 600e9, 25e9, 32e9, 1e14)
    assert links.bandwidth(8) == 600e9  # one node
    assert links.bandwidth(64) == 200e9  # 8 GPUs of the group per node, 8 NICs
    assert links.bandwidth(8, 8) == 25e9  # one GPU of the group per node


def test_model_flops_torchtitan_convention():
    # 6N + 12·l·h·s with N the matmul weights (blocks and output projection, not the embedding)
    m = resolve_model(ModelSpec(preset="llama-2-7b"))
    n = m.num_parameters - m.vocab_size * m.hidden_size - m.num_layers * 2 * m.hidden_size \
        - m.hidden_size  # minus the embedding and the norms
    got = model_flops_per_token(m, 4096)
    assert got == pytest.approx(6 * n + 12 * 32 * 4096 * 4096, rel=1e-3)


def test_recompute_and_bubble_cost_time():
    m = resolve_model(ModelSpec(preset="llama-2-7b"))
    links = _links("h100-80gb")
    base = dict(dp=1, tp=1, pp=1, v=1, schedule="1f1b", zero=0, offload_optimizer=False,
                offload_parameters=False, b=1, ga=8)
    none = step_time(m, 4096, 2, 2, Layout(checkpoint="none", **base), links)
    full = step_time(m, 4096, 2, 2, Layout(checkpoint="full", **base), links)
    assert full.compute_s / none.compute_s == pytest.approx(4 / 3, rel=0.03)
    piped = step_time(m, 4096, 2, 2, Layout(checkpoint="none", **{**base, "pp": 4}), links)
    # 1F1B: bubble (p-1)/(m+p-1) of the makespan (Narayanan et al. 2021 §2.2.1), uniform stages
    # apart from the output projection on the last
    frac = piped.bubble_s / (piped.step_s - piped.dp_s)
    assert frac == pytest.approx(3 / 11, abs=0.06)
