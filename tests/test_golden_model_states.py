"""Model-state bytes against published figures.

Sources: Rajbhandari et al. 2020 (ZeRO), §3.1 (mixed-precision Adam = 2 + 2 + 12 = 16 bytes/param,
"a 1.5B-parameter GPT-2 needs at least 24 GB") and Fig. 1 (Ψ = 7.5B, Nd = 64, K = 12:
120 / 31.4 / 16.6 / 1.875 GB for stages 0 / 1 / 2 / 3; GB = 10^9 bytes).
Tolerance: exact where the paper's figure is exact (24, 120, 1.875); 0.5% for 31.4 and 16.6,
which the paper rounds from 31.40625 and 16.640625.
"""

import pytest

from planner.catalog.optimizers import bytes_per_param
from planner.catalog.specs import ModelSpec, ParallelSpec, PrecisionOverrides, TrainingSpec
from planner.catalog.presets import resolve_model
from planner.layouts.sharding import shard_model_states

GB = 10**9


def _states_bytes(psi: int, training: TrainingSpec, parallel: ParallelSpec) -> int:
    ms = shard_model_states(resolve_model(ModelSpec(num_parameters=psi)), training, parallel)
    return ms.parameters + ms.gradients + ms.optimizer_states


MIXED_ADAM = TrainingSpec(precision="mixed-fp16", optimizer="adam")


def test_gpt2_1_5b_needs_24_gb():
    assert _states_bytes(1_500_000_000, MIXED_ADAM, ParallelSpec()) == 24 * GB


@pytest.mark.parametrize("stage,expected_gb,rel", [(0, 120, 0), (1, 31.4, 0.005),
                                                   (2, 16.6, 0.005), (3, 1.875, 0)])
def test_zero_paper_figure_1(stage, expected_gb, rel):
    got = _states_bytes(7_500_000_000, MIXED_ADAM, ParallelSpec(data_parallel=64, zero_stage=stage))
    assert got == pytest.approx(expected_gb * GB, rel=rel, abs=0)


# Bytes per parameter for model states (params + grads + optimizer states incl. master copy).
# Sources: ZeRO §3.1 (mixed Adam 16); SGD/momentum/Adagrad/RMSprop/Adadelta state counts from
# torch.optim; Lion one buffer (Chen et al. 2023); 8-bit Adam 2 bytes/param of states (Dettmers et
# al. 2022, Table 1; block absmax excluded here). Tolerance: exact.
TABLE = [
    ("mixed-bf16", "adam", 16), ("mixed-bf16", "adamw", 16), ("mixed-bf16", "sgd", 8),
    ("mixed-bf16", "sgd-momentum", 12), ("mixed-bf16", "adagrad", 12),
    ("mixed-bf16", "rmsprop", 12), ("mixed-bf16", "adadelta", 16), ("mixed-bf16", "lion", 12),
    ("mixed-bf16", "adam-8bit", 10),
    ("fp32", "adam", 16), ("amp-bf16", "adamw", 16), ("fp32", "sgd", 8), ("bf16", "adamw", 8),
    ("bf16", "sgd-momentum", 6), ("amp-fp16", "lion", 12),
]


@pytest.mark.parametrize("precision,optimizer,per_param", TABLE)
def test_bytes_per_param_table(precision, optimizer, per_param):
    training = TrainingSpec(precision=precision, optimizer=optimizer)
    psi = 1_000_000
    assert _states_bytes(psi, training, ParallelSpec()) == per_param * psi


def test_rmsprop_options_add_buffers():
    t = TrainingSpec(precision="fp32", optimizer="rmsprop", rmsprop_centered=True,
                     rmsprop_momentum=True)
    assert bytes_per_param(t) == 12  # square_avg, grad_avg, momentum_buffer


def test_fp32_gradient_accumulation_is_18_bytes_per_param():
    # mixed-bf16 with fp32 gradients: 2 (bf16 params) + 4 (fp32 grads) + 12 (master + Adam)
    training = TrainingSpec(precision="mixed-bf16", optimizer="adamw",
                            precision_overrides=PrecisionOverrides(gradients="fp32"))
    assert _states_bytes(10**6, training, ParallelSpec()) == 18 * 10**6


def test_zero_paper_communication_stage3_is_1_5x():
    # ZeRO §7: stages 0-2 move 2Ψ per rank, stage 3 moves 3Ψ
    m = resolve_model(ModelSpec(num_parameters=10**9))
    c = [shard_model_states(m, MIXED_ADAM, ParallelSpec(data_parallel=8, zero_stage=z))
         .comm_bytes_per_step for z in range(4)]
    assert c[0] == c[1] == c[2] == 2 * 2 * 10**9 * 7 // 8
    assert c[3] * 2 == c[0] * 3
