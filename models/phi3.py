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

import mlx.nn as nn

from models import llama
from models.layers import Attention, BaseModelArgs, GatedMLP, RMSNorm, RoPE


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
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args.hidden_size, args.num_attention_heads,
                                   args.num_key_value_heads, args.head_dim, rope=args.rope(),
                                   fused_qkv=True)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, "silu", fused=True)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    __call__ = llama.TransformerBlock.__call__


class Model(llama.Model):
    """Llama's decoder and head around Phi-3's blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, llama.LlamaModel(args, TransformerBlock))
