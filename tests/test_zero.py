"""planner.layouts.sharding against torch's own sharding code and the reference model.

Sources: torch.distributed.optim.ZeroRedundancyOptimizer._partition_parameters (run on a real
1-process gloo group, its world size then set to N so torch's algorithm partitions for N ranks);
FSDP2 ``_chunk_with_empty`` (the padded shard of each rank); service.validation.model.Transformer.
Tolerance: exact.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty
from torch.distributed.optim import ZeroRedundancyOptimizer

from planner.catalog.presets import resolve_model
from planner.catalog.optimizers import optimizer_state_bytes
from planner.catalog.parameters import count_parameters
from planner.catalog.specs import ModelSpec, ParallelSpec, TrainingSpec
from planner.layouts.parameter_tensors import parameter_shapes
from planner.layouts.sharding import (
    fsdp_shard_shape,
    pipeline_stage_layers,
    shard_model_states,
    zero1_partition,
)
from service.validation.model import Transformer

TINY_GPT2 = ModelSpec(family="gpt2", num_layers=3, hidden_size=48, num_heads=4, vocab_size=101,
                      max_sequence_length=32)
TINY_LLAMA = ModelSpec(family="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                       vocab_size=97, max_sequence_length=32)


@pytest.fixture(scope="module")
def gloo_group():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("spec", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_parameter_shapes_match_reference_model(spec):
    m = resolve_model(spec)
    model = Transformer(m)
    assert [tuple(p.shape) for p in model.parameters()] == parameter_shapes(m)
    assert [p.numel() for p in model.parameters()] == count_parameters(m).tensor_sizes()


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
@pytest.mark.parametrize("spec", [TINY_GPT2, TINY_LLAMA], ids=["gpt2", "llama"])
def test_zero1_partition_equals_torch(gloo_group, spec, world_size):
    model = Transformer(resolve_model(spec))
    params = list(model.parameters())
    zro = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW)
    zro.world_size = world_size  # torch's own algorithm, partitioning for world_size ranks
    zro._partition_parameters_cache = []
    torch_parts = zro._partition_parameters()
    index = {id(p): i for i, p in enumerate(params)}
    torch_idx = [[index[id(p)] for g in groups for p in g["params"]] for groups in torch_parts]
    assert zero1_partition([p.numel() for p in params], world_size) == torch_idx


def test_zero1_worst_rank_optimizer_states_are_measured(gloo_group):
    # The worst rank's AdamW states: build them with torch.optim on that rank's tensors.
    m = resolve_model(TINY_LLAMA)
    training = TrainingSpec(precision="fp32", optimizer="adamw")
    model = Transformer(m)
    params = list(model.parameters())
    parts = zero1_partition([p.numel() for p in params], 4)
    measured = []
    for part in parts:
        owned = [params[i] for i in part]
        opt = torch.optim.AdamW(owned, foreach=True)
        for p in owned:
            p.grad = torch.zeros_like(p)
        opt.step()
        measured.append(sum(t.untyped_storage().nbytes() for s in opt.state.values()
                            for t in s.values()))
    ms = shard_model_states(m, training, ParallelSpec(data_parallel=4, zero_stage=1))
    assert ms.optimizer_states == max(measured)
    assert ms.worst_rank == measured.index(max(measured))
    shapes = parameter_shapes(m)
    assert optimizer_state_bytes(training, [p.numel() for p in params], "fp32", shapes) == \
        sum(measured)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 64])
def test_fsdp2_padded_shard_equals_torch_chunk(world_size):
    for shape in [(101, 48), (48,), (7, 3), (3, 7), (1,), (64, 64), (97, 64)]:
        chunks = _chunk_with_empty(torch.empty(shape), world_size, dim=0)
        assert tuple(chunks[0].shape) == fsdp_shard_shape(shape, world_size)


def test_zero3_states_divide_and_pad():
    m = resolve_model(TINY_GPT2)
    training = TrainingSpec(precision="fp32", optimizer="adamw")
    n = 4
    ms = shard_model_states(m, training, ParallelSpec(data_parallel=n, zero_stage=3))
    shard_elems = sum(torch.chunk(torch.empty(s), n, 0)[0].numel() for s in parameter_shapes(m))
    assert ms.parameters == 4 * shard_elems
    assert ms.gradients == 4 * shard_elems
    assert ms.optimizer_states == 2 * 4 * shard_elems + 4 * len(parameter_shapes(m))


def test_stage0_is_full_replica_and_mixed_holds_masters():
    m = resolve_model(TINY_LLAMA)
    psi = m.num_parameters
    ms = shard_model_states(m, TrainingSpec(precision="mixed-bf16", optimizer="adamw"),
                            ParallelSpec(data_parallel=8))
    k = len(parameter_shapes(m))
    assert (ms.parameters, ms.gradients) == (2 * psi, 2 * psi)
    assert ms.optimizer_states == 4 * psi + 8 * psi + 4 * k  # master + exp_avg/exp_avg_sq + steps
    # step(): fp32 grad copies (4 B/param) + foreach sqrt list on the masters (4 B/param)
    assert ms.step_temporaries == 8 * psi


def test_tensor_and_pipeline_split():
    m = resolve_model(TINY_LLAMA)  # h 64, kv 32, f 256 (multiple_of 256), V 97, L 3, untied
    h, kv, f, V = 64, 32, m.ffn_hidden_size, 97
    t = 2
    layer_t2 = h + h * h // t + 2 * kv * h // t + h * h // t + h + 3 * f * h // t
    fp32 = TrainingSpec(precision="fp32", optimizer="sgd")
    ms = shard_model_states(m, fp32, ParallelSpec(tensor_parallel=t))
    assert ms.parameters == 4 * (-(-V // t) * h + 3 * layer_t2 + h + -(-V // t) * h)
    # pipeline: layers 2 + 1; first stage holds the embedding, last the norm and head
    assert pipeline_stage_layers(3, 2) == [2, 1]
    ms = shard_model_states(m, fp32, ParallelSpec(pipeline_parallel=2))
    layer = count_parameters(m).per_layer
    assert ms.parameters == 4 * max(V * h + 2 * layer, layer + h + V * h)


def test_offload_moves_optimizer_states_to_host():
    m = resolve_model(TINY_GPT2)
    t = TrainingSpec(precision="mixed-bf16", optimizer="adamw")
    on = shard_model_states(m, t, ParallelSpec(data_parallel=4, zero_stage=2))
    off = shard_model_states(m, t, ParallelSpec(data_parallel=4, zero_stage=2, offload_optimizer=True))
    assert off.optimizer_states == 0 and off.step_temporaries == 0 and off.gradients == 0
    assert off.offloaded_bytes == on.optimizer_states + on.gradients
    with pytest.raises(ValueError):
        shard_model_states(m, t, ParallelSpec(data_parallel=4, zero_stage=2, offload_parameters=True))
