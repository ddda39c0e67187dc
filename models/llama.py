"""Llama-family decoder (Llama 2/3, Mistral-style configs, SmolLM2).

Tokens arrive packed: `input_ids` is [N] for all sequences of a step, each
with its own position. Attention is delegated to a per-layer cache view
(`attend(q, k, v, scale)`), so the model never knows about blocks or batching.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.layers.base import BaseModelArgs, causal_attention
from models.layers.fast_math import default_fast_math, silu_mul_fast
from models.layers.linear import Linear
from models.layers.rope import RoPE


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_traditional: bool = False
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope = RoPE(self.head_dim, args.rope_theta, args.rope_scaling, args.rope_traditional)

    def __call__(self, x: mx.array, positions: mx.array, cache) -> mx.array:
        n = x.shape[0]
        q = self.q_proj(x).reshape(n, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(n, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(n, self.n_kv_heads, self.head_dim)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = cache.attend(q, k, v, self.scale)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        # On the CPU, MLX's scalar sigmoid cost more than the matmuls' share.
        self.fast_silu = default_fast_math()

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul_fast(g, u) if self.fast_silu else nn.silu(g) * u)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, positions: mx.array, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, positions: mx.array, caches=None) -> mx.array:
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, None if caches is None else caches[i])
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, positions: mx.array | None = None, caches=None,
                 logits_index: mx.array | None = None) -> mx.array:
        """Logits for packed tokens `input_ids` [N] (a single sequence when
        `caches` is None). `logits_index` picks the rows that need logits
        (usually each sequence's last token), sparing the vocab projection."""
        if positions is None:
            positions = mx.arange(input_ids.shape[0], dtype=mx.int32)
        h = self.model(input_ids, positions, caches)
        if logits_index is not None:
            h = h[logits_index]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # Rotary tables are computed, never loaded; tied heads have no lm_head.
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
