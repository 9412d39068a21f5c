"""Exact parameter counts, layer by layer, for the reference model's two families."""

from __future__ import annotations

from dataclasses import dataclass

from planner.catalog.specs import LoraSpec, ResolvedModel


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int  # token (and learned position) embeddings
    per_layer: int  # one transformer block
    final_norm: int
    lm_head: int  # 0 when tied to the token embedding
    num_layers: int
    # numel of every parameter tensor (optimizers' per-tensor work, ZeRO-1 whole-tensor assignment)
    layer_tensors: tuple[int, ...]  # one block, in registration order
    embedding_tensors: tuple[int, ...]  # token (and position) embedding tables
    head_tensors: tuple[int, ...]  # final norm, then the untied output projection if any

    @property
    def total(self) -> int:
        return self.embedding + self.num_layers * self.per_layer + self.final_norm + self.lm_head

    def tensor_sizes(self) -> list[int]:
        """numel of every parameter tensor in the reference model's registration order."""
        return list(self.embedding_tensors) + list(self.layer_tensors) * self.num_layers + \
            list(self.head_tensors)


def layer_tensor_sizes(m: ResolvedModel) -> tuple[int, ...]:
    """numel of each parameter of one block, in the reference model's registration order."""
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
    if m.family == "gpt2":
        # norm1 (w, b), q, k, v, o (w, b each), norm2 (w, b), mlp up (w, b), down (w, b)
        return (h, h) + (h * h, h, h * kv, kv, h * kv, kv, h * h, h) + (h, h, h * f, f, f * h, h)
    # norm1, q, k, v, o, norm2, gate, up, down — no biases
    return (h, h * h, h * kv, h * kv, h * h, h, h * f, h * f, f * h)


def count_parameters(m: ResolvedModel) -> ParameterCounts:
    """Exact count; equals ``sum(p.numel())`` of service.validation.model.Transformer."""
    h, V = m.hidden_size, m.vocab_size
    layer = layer_tensor_sizes(m)
    if m.family == "gpt2":
        emb, norm = (V * h, m.max_sequence_length * h), (h, h)  # wte, wpe; ln_f weight, bias
    else:
        emb, norm = (V * h,), (h,)  # tok_emb; norm_f weight
    lm_head = 0 if m.tie_embeddings else V * h
    head = norm + ((lm_head,) if lm_head else ())
    return ParameterCounts(embedding=sum(emb), per_layer=sum(layer), final_norm=sum(norm),
                           lm_head=lm_head, num_layers=m.num_layers, layer_tensors=layer,
                           embedding_tensors=emb, head_tensors=head)


def lora_parameters(m: ResolvedModel, lora: LoraSpec) -> int:
    """Trainable adapter parameters: r * (in + out) per targeted projection per block."""
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
    shapes = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "up": (h, f), "down": (f, h),
              "gate": (h, f)}
    if m.family == "gpt2":
        shapes.pop("gate")
    return m.num_layers * sum(lora.rank * (i + o) for t, (i, o) in shapes.items()
                              if t in lora.target_modules)
