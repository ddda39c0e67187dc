"""BERT-family encoders (BERT, MiniLM, sentence-transformers checkpoints).

Word + position + token-type embeddings, then post-LayerNorm blocks:
`x = norm(x + attn(x))`, `x = norm(x + mlp(x))`. Tokens of a padded batch
[B, T] travel packed as [B*T, dim] through the shared layers; attention is
bidirectional over each row's real tokens (models/layers/encoder_attention.py).
The model returns the last hidden states; pooling lives in engine/embedding.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from models.layers import MLP, Attention, BaseModelArgs, Embedding, LayerNorm
from models.layers.activations import canonical_activation
from models.layers.encoder_attention import EncoderAttentionView


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    def __post_init__(self):
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"{self.model_type}: position_embedding_type {self.position_embedding_type!r} "
                "is not supported (only 'absolute')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.model_type}: hidden_size must be a multiple of "
                             "num_attention_heads")
        try:
            canonical_activation(self.hidden_act)
        except ValueError as exc:
            raise ValueError(f"{self.model_type}: hidden_act: {exc}") from None


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = Embedding(args.type_vocab_size, args.hidden_size)
        self.norm = LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, input_ids, positions, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.norm(x + self.token_type_embeddings(token_type_ids))


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, heads = args.hidden_size, args.num_attention_heads
        self.attention = Attention(dim, heads, heads, dim // heads, rope=None, bias=True)
        self.attention_norm = LayerNorm(dim, eps=args.layer_norm_eps)
        self.ffn = MLP(dim, args.intermediate_size, args.hidden_act, bias=True)
        self.ffn_norm = LayerNorm(dim, eps=args.layer_norm_eps)

    def __call__(self, x, view):
        x = self.attention_norm(x + self.attention(x, None, view))
        return self.ffn_norm(x + self.ffn(x))


# Hugging Face checkpoint names -> ours, applied in order to each key.
_RENAMES = [
    (re.compile(r"^(bert|model)\."), ""),
    (re.compile(r"^embeddings\.LayerNorm\."), "embeddings.norm."),
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.self\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.self\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.self\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.attention\.output\.LayerNorm\."), ".attention_norm."),
    (re.compile(r"\.intermediate\.dense\."), ".ffn.up_proj."),
    (re.compile(r"\.output\.dense\."), ".ffn.down_proj."),
    (re.compile(r"\.output\.LayerNorm\."), ".ffn_norm."),
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    (re.compile(r"norm\.gamma$"), "norm.weight"),
    (re.compile(r"norm\.beta$"), "norm.bias"),
]
# Heads and buffers an encoder does not use: pooler, MLM/NSP heads, position ids.
_DROP = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|.*\.num_batches_tracked$)")


class Model(nn.Module):
    """A BERT encoder: `model(input_ids, attention_mask)` -> hidden states [B, T, D]."""

    causal = False  # every token sees its whole row
    generates = False  # no LM head: an embedding model only
    # Position of a row's first token in the position table (RoBERTa's
    # numbering starts after its padding index).
    position_offset = 0

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embeddings = Embeddings(args)
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 view: EncoderAttentionView | None = None):
        for hidden in self.stages(input_ids, attention_mask, token_type_ids, view=view):
            pass
        return hidden

    def stages(self, input_ids, attention_mask=None, token_type_ids=None, *,
               view: EncoderAttentionView | None = None) -> Iterator:
        """The hidden states [B, T, D] after the embeddings and after each
        layer, built lazily; the last one is the model's output. A caller
        running several batches on several streams evaluates them layer by
        layer, interleaved. `view` is what attention runs through (a caller's
        with its kernel); by default one made from the mask."""
        if view is None:
            view = EncoderAttentionView.for_batch(input_ids, attention_mask)
        b, t = input_ids.shape
        ids = input_ids.reshape(-1)
        x = self.embeddings(ids, view.positions + self.position_offset,
                            view.zeros if token_type_ids is None else token_type_ids.reshape(-1))
        yield x.reshape(b, t, -1)
        for layer in self.layers:
            x = layer(x, view)
            yield x.reshape(b, t, -1)

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def max_length(self) -> int:
        """The most tokens a row may have: the position table's rows left."""
        return self.args.max_position_embeddings - self.position_offset

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face BertModel names onto this module tree."""
        out = {}
        for name, value in weights.items():
            for pattern, repl in _RENAMES:
                name = pattern.sub(repl, name)
            if _DROP.match(name):
                continue
            out[name] = value
        return out
