"""The reference transformer that memplan's estimates describe, op by op.

Two families, built from the planner's ``ResolvedModel``:
- ``gpt2``: learned positions, LayerNorm, GELU (tanh) MLP, biases, tied embeddings
  (Radford et al. 2019; same layout as nanoGPT's model.py).
- ``llama``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases, untied output
  (Touvron et al. 2023).

Everything the planner's activation model counts is visible here: each tensor saved for backward
comes from one of the ops below. Change an op here and ``planner/activations.py`` must change too;
the accuracy tests catch a mismatch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from planner.catalog.specs import ResolvedModel


class LoRALinear(nn.Module):
    """y = x W^T (+ b) + (alpha/r) * (x A^T) B^T with W frozen (Hu et al. 2021, eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ResolvedModel, attention: str, dropout: float) -> None:
        super().__init__()
        self.family = cfg.family
        self.n_head = cfg.num_heads
        self.n_kv = cfg.num_kv_heads or cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        bias = cfg.family == "gpt2"
        h, kv = cfg.hidden_size, self.n_kv * self.head_dim
        self.q = nn.Linear(h, h, bias=bias)
        self.k = nn.Linear(h, kv, bias=bias)
        self.v = nn.Linear(h, kv, bias=bias)
        self.o = nn.Linear(h, h, bias=bias)
        self.attention = attention
        self.dropout = dropout
        self.core_runner: Callable | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        # Core attention: softmax(q k^T / sqrt(hd)) v. ``core_runner`` (set by the training step)
        # wraps it for selective recompute, Megatron's "core attention" checkpointing.
        if self.core_runner is not None:
            y = self.core_runner(self._core, q, k, v)
        else:
            y = self._core(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.o(y)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[2]
        gqa = self.n_kv != self.n_head  # grouped-query attention: each kv head serves a group
        # No dropout on attention probabilities (modern LLM practice); dropout, when configured,
        # applies to the embeddings and the residual branches (GPT-2's embd/resid dropout).
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # eager: the (B, nh, T, T) score matrix is materialised and saved
        if gqa:
            rep = self.n_head // self.n_kv
            k = k.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        return att @ v  # (B, nh, T, hd)


def rope_tables(max_len: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_len, head_dim) for rotary embeddings (Su et al. 2021, eq. 34)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (T, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (T, hd)
    return ang.cos(), ang.sin()


def rope_for(cos: torch.Tensor, sin: torch.Tensor, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first T rows of the tables, cast once per forward to the dtype q and k will have."""
    if torch.is_autocast_enabled(cos.device.type):
        dtype = torch.get_autocast_dtype(cos.device.type)
    return cos[:T].to(dtype), sin[:T].to(dtype)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """x / rms(x) * g, computed in fp32 as Llama does (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out (not F.rms_norm) so every device runs, and saves, the same ops.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class MLP(nn.Module):
    def __init__(self, cfg: ResolvedModel) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.family = cfg.family
        if cfg.family == "gpt2":
            self.up = nn.Linear(h, f)
            self.down = nn.Linear(f, h)
        else:  # SwiGLU (Shazeer 2020)
            self.gate = nn.Linear(h, f, bias=False)
            self.up = nn.Linear(h, f, bias=False)
            self.down = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ResolvedModel, attention: str, dropout: float) -> None:
        super().__init__()
        norm = nn.LayerNorm if cfg.family == "gpt2" else RMSNorm
        self.norm1 = norm(cfg.hidden_size)
        self.attn = CausalSelfAttention(cfg, attention, dropout)
        self.norm2 = norm(cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.dropout = dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x), rope))  # (B, T, C)
        x = x + self._drop(self.mlp(self.norm2(x)))
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ResolvedModel, attention: str = "sdpa", dropout: float = 0.0) -> None:
        super().__init__()
        if not cfg.architecture_known:
            raise ValueError("the reference model needs architecture fields, not a bare parameter count")
        self.cfg = cfg
        h = cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, h)
        self.pos_emb = nn.Embedding(cfg.max_sequence_length, h) if cfg.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, attention, dropout) for _ in range(cfg.num_layers))
        self.norm_f = nn.LayerNorm(h) if cfg.family == "gpt2" else RMSNorm(h)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # weight tying (Press & Wolf 2017)
        if cfg.family == "llama":
            cos, sin = rope_tables(cfg.max_sequence_length, cfg.hidden_size // cfg.num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.dropout = dropout

    def forward(self, idx: torch.Tensor, run_block: Callable | None = None,
                head: bool = True) -> torch.Tensor:
        """Logits (B, T, V). ``run_block(i, block, x, rope)`` replaces ``block(x, rope)`` when
        given (the training step uses it to checkpoint blocks). ``head=False``: the final norm's
        output (B, T, C) instead, for a loss that runs the head itself (a chunked loss)."""
        B, T = idx.shape
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        else:
            rope = rope_for(self.rope_cos, self.rope_sin, T, x.dtype)
        if self.dropout > 0:
            x = F.dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = run_block(i, block, x, rope) if run_block is not None else block(x, rope)
        x = self.norm_f(x)
        return self.lm_head(x) if head else x  # (B, T, V) or (B, T, C)
