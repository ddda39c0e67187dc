"""Llama-family decoder (Llama 2/3, SmolLM2; Mistral and Qwen build on it).

Tokens arrive packed: `input_ids` is [N] for all sequences of a step, each
with its own position. Attention goes through a per-layer cache view, so the
model never knows about blocks or batching.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from models.layers import Attention, BaseModelArgs, Embedding, GatedMLP, Linear, RMSNorm, RoPE


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
    attention_out_bias: bool | None = None  # o_proj's bias; None: as attention_bias
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_parameters: dict[str, Any] | None = None  # transformers >= 5 nests RoPE here
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    # Per layer "full_attention" or "sliding_attention" (the latter sees only
    # its `sliding_window` latest tokens); None: every layer full, as mlx-lm.
    layer_types: list[str] | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_parameters.get("rope_type", "default") != "default":
                self.rope_scaling = self.rope_parameters
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_layer_types(self.layer_types, self.num_hidden_layers, self.sliding_window)

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        return layer_window(self.layer_types, self.sliding_window, layer)


def layer_window(layer_types: list[str] | None, sliding_window: int | None,
                 layer: int) -> int | None:
    sliding = layer_types is not None and layer_types[layer] == "sliding_attention"
    return sliding_window if sliding else None


def check_layer_types(layer_types: list[str] | None, num_layers: int,
                      sliding_window: int | None) -> None:
    """ValueError unless `layer_types` names one known kind per layer, with a
    positive window wherever a layer slides."""
    if layer_types is None:
        return
    kinds = {"full_attention", "sliding_attention"}
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or \
            not set(layer_types) <= kinds:
        raise ValueError(f"layer_types must list one of {sorted(kinds)} per layer "
                         f"({num_layers})")
    if "sliding_attention" in layer_types and not (
            isinstance(sliding_window, int) and 0 < sliding_window < 2**31):
        raise ValueError(f"sliding layers need a positive integer sliding_window, "
                         f"not {sliding_window!r}")


def add_and_norm(norm, x, delta):
    """(x + delta, norm of it); x and norm(x) where there is no delta yet."""
    return (x, norm(x)) if delta is None else norm.add_and_norm(x, delta)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling, args.rope_traditional,
                    args.max_position_embeddings)
        self.self_attn = Attention(args.hidden_size, args.num_attention_heads,
                                   args.num_key_value_heads, args.head_dim, rope=rope,
                                   bias=args.attention_bias,
                                   out_bias=args.attention_out_bias,
                                   qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
                                   window=args.window(layer))
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act,
                            args.mlp_bias)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x, positions, cache, delta=None):
        """(hidden, delta): this layer's input is x + delta (the previous
        layer's last branch, not yet added), its output hidden + the delta
        returned, so that every residual add runs with the norm after it."""
        h, normed = add_and_norm(self.input_layernorm, x, delta)
        h, normed = self.post_attention_layernorm.add_and_norm(
            h, self.self_attn(normed, positions, cache))
        return h, self.mlp(normed)


class LlamaModel(nn.Module):
    """Embedding, blocks, final norm; other decoders pass their own block
    class, embedding scale and norm offset (Gemma)."""

    def __init__(self, args: ModelArgs, block=TransformerBlock, embed_scale: float | None = None,
                 norm_offset: float = 0.0):
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size, embed_scale)
        self.layers = [block(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, norm_offset)

    def __call__(self, input_ids, positions, caches=None):
        h, delta = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            h, delta = layer(h, positions, None if caches is None else caches[i], delta)
        return add_and_norm(self.norm, h, delta)[1]


class Model(nn.Module):
    def __init__(self, args: ModelArgs, decoder: LlamaModel | None = None):
        super().__init__()
        self.args = args
        self.model = decoder or LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids, positions=None, caches=None, logits_index=None):
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

    @property
    def generates(self) -> bool:
        """False for a checkpoint without an LM head (an embedding model)."""
        return self.args.tie_word_embeddings or "lm_head" in self

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # A bare decoder saved without its wrapper (Qwen3-Embedding's
        # checkpoints) names its weights without the "model." prefix.
        if not any(k.startswith("model.") for k in weights):
            weights = {k if k.startswith("lm_head.") else f"model.{k}": v
                       for k, v in weights.items()}
        # Rotary tables are computed, never loaded; tied heads have no lm_head.
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        elif not any(k.startswith("lm_head.") for k in weights):
            del self.lm_head  # headless: it embeds (engine/embedding), never generates
        return weights
