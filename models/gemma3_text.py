"""Gemma 3 (text only): Gemma 2's decoder (models/gemma2.py) with an RMSNorm
on each head's queries and keys, no soft-capping, and five sliding-window
layers (RoPE base `rope_local_base_freq`) to each full one (base
`rope_theta`, with `rope_scaling`). The embedding scale is rounded to
bfloat16, as mlx-lm and the bfloat16 checkpoints have it."""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from models import gemma2


@dataclasses.dataclass
class ModelArgs(gemma2.ModelArgs):
    model_type: str = "gemma3_text"
    hidden_size: int = 1152
    num_hidden_layers: int = 26
    intermediate_size: int = 6912
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    vocab_size: int = 262144
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float | None = 10_000.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = 512
    sliding_window_pattern: int = 6
    qk_norm: bool = True

    def embedding_scale(self) -> float:
        return mx.array(self.hidden_size ** 0.5, mx.bfloat16).item()


class Model(gemma2.Model):
    pass
