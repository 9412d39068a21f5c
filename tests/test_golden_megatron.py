"""The megatron activation profile against Korthikanti et al. 2022 (arXiv:2205.05198).

Fig. 1 (22B model: h 6144, L 48, a 64, s 2048, b 4, t 8, p 1) plots the transformer layers'
activations only (Table 2 terms; no §4.3 embedding/output terms), 16-bit activations.
Tolerance: exact (the Table 2 formulas give whole bytes for this configuration).
"""

from planner.layouts.megatron import megatron_activation_bytes
from planner.catalog.specs import ActivationCheckpointing, ParallelSpec, ResolvedModel, TrainingSpec

GIB = 2**30
GPT_22B = ResolvedModel(family="gpt2", num_layers=48, hidden_size=6144, num_heads=64,
                        num_kv_heads=64, ffn_hidden_size=4 * 6144, vocab_size=51200,
                        max_sequence_length=2048, tie_embeddings=True, num_parameters=22 * 10**9,
                        architecture_known=True)


def _training(strategy: str = "none") -> TrainingSpec:
    return TrainingSpec(micro_batch_size=4, sequence_length=2048, implementation="megatron",
                        activation_checkpointing=ActivationCheckpointing(strategy=strategy))


def test_fig1_22b_tensor_parallel_no_recompute():
    # Table 2 "tensor parallel": sbh(10 + 24/t + 5as/(ht)) per layer x 48 = 59.25 GiB
    got = megatron_activation_bytes(GPT_22B, _training(), ParallelSpec(tensor_parallel=8),
                                    include_embedding_and_output=False)
    assert got == 59.25 * GIB


def test_fig1_22b_sequence_parallel_selective_recompute():
    # Table 2 "sequence + selective": sbh/t * 34 per layer x 48 = 9.5625 GiB
    got = megatron_activation_bytes(GPT_22B, _training("selective"),
                                    ParallelSpec(tensor_parallel=8, sequence_parallel=True),
                                    include_embedding_and_output=False)
    assert got == 9.5625 * GIB


def test_table2_rows():
    s, b, h, a, t, L = 2048, 4, 6144, 64, 8, 48
    sbh = s * b * h
    no_par = megatron_activation_bytes(GPT_22B, _training(), ParallelSpec(),
                                       include_embedding_and_output=False)
    assert no_par == L * (34 * sbh + 5 * a * s * s * b)  # sbh * 5as/h = 5as^2b
    tp_sp = megatron_activation_bytes(GPT_22B, _training(),
                                      ParallelSpec(tensor_parallel=t, sequence_parallel=True),
                                      include_embedding_and_output=False)
    assert tp_sp == L * (34 * sbh + 5 * a * s * s * b) // t
    full = megatron_activation_bytes(GPT_22B, _training("full"), ParallelSpec(tensor_parallel=t),
                                     include_embedding_and_output=False)
    assert full == L * 2 * sbh


def test_section_4_3_terms_and_pipeline_factor():
    s, b, h, t, V, L = 2048, 4, 6144, 8, 51200, 48
    base = megatron_activation_bytes(GPT_22B, _training("selective"),
                                     ParallelSpec(tensor_parallel=t, sequence_parallel=True),
                                     include_embedding_and_output=False)
    # §4.3: embedding dropout mask sbhp/t (p = 1) + output layer 4sbh/t (1 + V/h)
    full = megatron_activation_bytes(GPT_22B, _training("selective"),
                                     ParallelSpec(tensor_parallel=t, sequence_parallel=True))
    assert full - base == s * b * h // t + 4 * s * b * h // t + 4 * s * b * V // t
    # §4.2.3: 1F1B first stage holds L layers' worth; interleaving multiplies by 1 + (p-1)/(pv)
    train = _training("selective").model_copy(update={"gradient_accumulation_steps": 16})
    p4 = ParallelSpec(tensor_parallel=t, sequence_parallel=True, pipeline_parallel=4)
    assert megatron_activation_bytes(GPT_22B, train, p4, include_embedding_and_output=False) == base
    p4v = p4.model_copy(update={"pipeline_schedule": "interleaved-1f1b", "virtual_pipeline_stages": 3})
    assert megatron_activation_bytes(GPT_22B, train, p4v, include_embedding_and_output=False) == \
        base * (1 + 3 / 12)
