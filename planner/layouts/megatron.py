"""The ``megatron`` activation profile: Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv:2205.05198).

Per-layer activation bytes with 16-bit activations (Table 2; s sequence, b micro-batch, h hidden,
a heads, t tensor-parallel size):

    no parallelism            s·b·h·(34 + 5·a·s/h)
    tensor parallel           s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tensor + sequence par.    s·b·h/t·(34 + 5·a·s/h)
    selective recompute       the 5·a·s/h term (attention scores, softmax, its dropout) dropped
    full recompute            2·s·b·h (only each layer's input is kept)

First pipeline stage (§4.2.3): with 1F1B it holds p micro-batches of L/p layers = L layers' worth,
whatever p; interleaving v model chunks adds the factor 1 + (p-1)/(p·v). Embedding and output
terms (§4.3): the input-embedding dropout mask s·b·h·p/t on the first stage, and on the last
stage the final layer norm, output projection input and cross entropy, 4·s·b·h/t·(1 + V/h).
The paper's Fig. 1 plots the transformer layers only (no §4.3 terms); pass
``include_embedding_and_output=False`` to reproduce it.
"""

from __future__ import annotations

from fractions import Fraction

from planner.catalog.specs import ParallelSpec, ResolvedModel, TrainingSpec


def megatron_layer_activation_bytes(model: ResolvedModel, training: TrainingSpec,
                                    parallel: ParallelSpec) -> Fraction:
    """One transformer layer, one micro-batch (Korthikanti et al. 2022, Table 2)."""
    s, b = training.sequence_length, training.micro_batch_size
    h, a, t = model.hidden_size, model.num_heads, parallel.tensor_parallel
    sbh = Fraction(s * b * h)
    strategy = training.activation_checkpointing.strategy
    if strategy == "full":
        return 2 * sbh  # Table 2, "full activation recompute"
    if strategy not in ("none", "selective"):
        raise ValueError(f"the megatron profile models activation_checkpointing 'none', "
                         f"'selective' and 'full', not {strategy!r}")
    scores = Fraction(5 * a * s, h) if strategy == "none" else Fraction(0)  # §5 selective
    if parallel.sequence_parallel:
        return sbh / t * (34 + scores)  # §4.2.2, eq. (5)
    return sbh * (10 + Fraction(24, t) + scores / t)  # §4.2.1, eq. (2)


def megatron_activation_bytes(model: ResolvedModel, training: TrainingSpec,
                              parallel: ParallelSpec, *,
                              include_embedding_and_output: bool = True) -> int:
    """Activation bytes of the first pipeline stage's device at its peak (ceil to whole bytes)."""
    if not model.architecture_known:
        raise ValueError("activations need architecture fields, not a bare parameter count")
    p, v, t = parallel.pipeline_parallel, parallel.virtual_pipeline_stages, parallel.tensor_parallel
    L = model.num_layers
    m = training.gradient_accumulation_steps  # micro-batches per step
    per_layer = megatron_layer_activation_bytes(model, training, parallel)
    schedule = parallel.pipeline_schedule
    if p == 1:
        layers_in_flight = Fraction(L)  # one micro-batch at a time
        in_flight_mb = 1
    elif schedule == "gpipe":
        layers_in_flight = Fraction(L, p) * m  # all micro-batches' forwards before any backward
        in_flight_mb = m
    else:
        # 1F1B (§4.2.3): the first stage holds min(p, m) micro-batches of L/p layers
        in_flight_mb = min(p, m)
        layers_in_flight = Fraction(L, p) * in_flight_mb
        if schedule == "interleaved-1f1b" and v > 1 and m >= p:
            layers_in_flight *= 1 + Fraction(p - 1, p * v)  # §4.2.3 interleaving factor
    total = per_layer * layers_in_flight
    if include_embedding_and_output:
        s, b, h, V = training.sequence_length, training.micro_batch_size, model.hidden_size, \
            model.vocab_size
        total += Fraction(s * b * h * in_flight_mb, t)  # §4.3 input-embedding dropout mask
        if p == 1:
            total += Fraction(4 * s * b * h, t) * (1 + Fraction(V, h))  # §4.3 output layer + loss
    return -(-total.numerator // total.denominator)


__all__ = ["megatron_activation_bytes", "megatron_layer_activation_bytes"]
