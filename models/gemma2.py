"""Gemma 2 (and, with other defaults, Gemma 3: models/gemma3_text.py).

A Llama-shaped decoder with Gemma's habits: embeddings scaled by
sqrt(hidden_size) and tied to the head, RMSNorms that scale by 1 + weight,
a norm after attention and after the MLP as well as before each, a GeGLU
MLP (`hidden_activation`), queries scaled by `query_pre_attn_scalar**-0.5`,
attention scores and final logits soft-capped (`attn_logit_softcapping`,
`final_logit_softcapping`), and layers alternating between a sliding window
(`sliding_window`) and full attention: `layer_types`, or every
`sliding_window_pattern`-th layer full. transformers' Gemma 2 honours the
window; mlx-lm's (which otherwise this file matches) attends every layer in
full.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.nn as nn

from models import llama
from models.layers import Attention, BaseModelArgs, GatedMLP, RMSNorm, RoPE, SoftCap


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "gemma2"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    vocab_size: int = 256000
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None   # full-attention layers only (Gemma 3)
    rope_local_base_freq: float | None = None    # sliding layers' RoPE base (Gemma 3)
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 2              # every n-th layer is full
    layer_types: list[str] | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    qk_norm: bool = False                        # Gemma 3: RMSNorm on q and k heads
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self):
        if self.rope_parameters:  # transformers >= 5: one per layer kind, or one for all
            params = self.rope_parameters
            full = params.get("full_attention", params) if isinstance(params, dict) else None
            local = params.get("sliding_attention") or {} if isinstance(params, dict) else None
            if not (isinstance(full, dict) and isinstance(local, dict)):
                raise ValueError("rope_parameters must be a mapping")
            self.rope_theta = full.get("rope_theta", self.rope_theta)
            if full.get("rope_type", "default") != "default":
                self.rope_scaling = full
            self.rope_local_base_freq = local.get("rope_theta", self.rope_local_base_freq)
        if self.layer_types is None and self.sliding_window is not None:
            n = self.sliding_window_pattern
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"sliding_window_pattern must be a positive integer, not {n!r}")
            self.layer_types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        llama.check_layer_types(self.layer_types, self.num_hidden_layers, self.sliding_window)
        if not (isinstance(self.query_pre_attn_scalar, (int, float)) and
                self.query_pre_attn_scalar > 0):
            raise ValueError("query_pre_attn_scalar must be a positive number")

    def window(self, layer: int) -> int | None:
        return llama.layer_window(self.layer_types, self.sliding_window, layer)

    def rope(self, layer: int) -> RoPE:
        """Sliding layers rotate with their own base where one is given
        (Gemma 3: 10k locally, 1M with `rope_scaling` globally)."""
        if self.window(layer) is not None and self.rope_local_base_freq is not None:
            return RoPE(self.head_dim, self.rope_local_base_freq, None, self.rope_traditional)
        return RoPE(self.head_dim, self.rope_theta, self.rope_scaling, self.rope_traditional,
                    self.max_position_embeddings)

    def embedding_scale(self) -> float:
        return self.hidden_size ** 0.5


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(
            d, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
            rope=args.rope(layer), scale=args.query_pre_attn_scalar ** -0.5,
            qk_norm_eps=eps if args.qk_norm else None, qk_norm_offset=1.0,
            window=args.window(layer), softcap=args.attn_logit_softcapping)
        self.mlp = GatedMLP(d, args.intermediate_size, args.hidden_activation)
        self.input_layernorm = RMSNorm(d, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(d, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)

    def __call__(self, x, positions, cache, delta=None):
        """(hidden, delta) as llama.TransformerBlock: residual adds run with
        the norm after them."""
        h, normed = llama.add_and_norm(self.input_layernorm, x, delta)
        h, normed = self.pre_feedforward_layernorm.add_and_norm(
            h, self.post_attention_layernorm(self.self_attn(normed, positions, cache)))
        return h, self.post_feedforward_layernorm(self.mlp(normed))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, llama.LlamaModel(args, TransformerBlock, args.embedding_scale(),
                                                norm_offset=1.0))
        if args.final_logit_softcapping is not None:
            self.final_softcap = SoftCap(args.final_logit_softcapping)

    def __call__(self, input_ids, positions=None, caches=None, logits_index=None):
        logits = super().__call__(input_ids, positions, caches, logits_index)
        return self.final_softcap(logits) if "final_softcap" in self else logits
