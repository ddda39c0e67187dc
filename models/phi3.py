"""Phi-3 / Phi-3.5 / Phi-4-mini decoder.

The Llama block with two fused projections (`self_attn.qkv_proj`: q, k and v
rows in turn; `mlp.gate_up_proj`: gate rows, then up rows), optional partial
rotary dims (Phi-4-mini) and Phi-3's LongRoPE ("su" / "longrope") schedule,
whose original context length is a top-level config key here. The fused
weights stay one tensor: the shared layers split their output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.layers import Attention, BaseModelArgs, Embedding, GatedMLP, Linear, RMSNorm, RoPE


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "phi3"
    hidden_size: int = 3072
    num_hidden_layers: int = 32
    intermediate_size: int = 8192
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-5
    vocab_size: int = 32064
    num_key_value_heads: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # always hidden_size / heads, as in mlx-lm

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.head_dim = self.hidden_size // self.num_attention_heads

    def rope(self) -> RoPE:
        scaling = dict(self.rope_scaling or {})
        if (scaling.get("type") or scaling.get("rope_type")) in ("longrope", "su"):
            scaling.setdefault("original_max_position_embeddings",
                               self.original_max_position_embeddings)
        dims = int(self.head_dim * self.partial_rotary_factor)
        return RoPE(dims, self.rope_theta, scaling or None, self.rope_traditional,
                    self.max_position_embeddings)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args.hidden_size, args.num_attention_heads,
                                   args.num_key_value_heads, args.head_dim, rope=args.rope(),
                                   fused_qkv=True)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, "silu", fused=True)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x, positions, cache):
        h = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, input_ids, positions, caches=None):
        h = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, positions, None if caches is None else caches[i])
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Phi3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids, positions=None, caches=None, logits_index=None):
        """Logits for packed tokens `input_ids` [N]; see models/llama.py."""
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
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
