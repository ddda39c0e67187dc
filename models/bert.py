"""BERT-family encoders (BERT, MiniLM, sentence-transformers checkpoints).

Word + position + token-type embeddings, then post-LayerNorm blocks:
`x = norm(x + attn(x))`, `x = norm(x + ffn(x))`. The model returns the last
hidden states; pooling and normalisation live in engine/pooling.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from models.layers.base import BaseModelArgs
from models.layers.fast_math import default_fast_math, exp_from_arg, exp_shifted_arg, gelu_erf_fast


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
                f"bert: position_embedding_type {self.position_embedding_type!r} "
                "is not supported (only 'absolute')")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("bert: hidden_size must be a multiple of num_attention_heads")


def _activation(name: str):
    # HF's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" the tanh one.
    table = {
        "gelu": nn.gelu,
        "gelu_new": nn.gelu_approx,
        "gelu_pytorch_tanh": nn.gelu_approx,
        "gelu_fast": nn.gelu_fast_approx,
        "relu": nn.relu,
        "silu": nn.silu,
    }
    if name not in table:
        raise ValueError(f"bert: hidden_act {name!r} is not supported")
    return table[name]


def attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float,
                  key_bias: mx.array | None) -> mx.array:
    """softmax(q k^T * scale + bias) v for q, k, v [B, H, T, d]; `key_bias` is
    [B, 1, T, 1] (additive, per key). The softmax runs on exp_nonpositive."""
    # Scores are laid out keys-first, [B, H, T_keys, T_queries]: the max and the
    # sum then reduce over a non-inner axis, which MLX vectorises along the
    # contiguous query axis (3x faster than reducing the inner axis at T=220).
    scores = k @ (q * scale).swapaxes(-1, -2)
    if key_bias is not None:
        scores = scores + key_bias
    e = exp_from_arg(exp_shifted_arg(scores, scores.max(axis=-2, keepdims=True)))
    # Normalise after the product: [B, H, T, d] is smaller than [B, H, T, T].
    return (e.swapaxes(-1, -2) @ v) / e.sum(axis=-2, keepdims=True).swapaxes(-1, -2)


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array | None) -> mx.array:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings.weight[:seq_len]
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.norm(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.scale = 1.0 / math.sqrt(dim // self.n_heads)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None, fast: bool) -> mx.array:
        B, T, D = x.shape

        def heads(t):
            return t.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if fast:
            o = attention_cpu(q, k, v, self.scale, mask)
        else:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.out(o.transpose(0, 2, 1, 3).reshape(B, T, D))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up = nn.Linear(args.hidden_size, args.intermediate_size)
        self.down = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = _activation(args.hidden_act)
        self.erf_gelu = args.hidden_act == "gelu"

    def __call__(self, x: mx.array, fast: bool) -> mx.array:
        h = self.up(x)
        h = gelu_erf_fast(h) if fast and self.erf_gelu else self.act(h)
        return self.down(h)


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.attention_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.ffn = FeedForward(args)
        self.ffn_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None, fast: bool) -> mx.array:
        x = self.attention_norm(x + self.attention(x, mask, fast))
        return self.ffn_norm(x + self.ffn(x, fast))


# Hugging Face checkpoint names -> ours, applied in order to each key.
_RENAMES = [
    (re.compile(r"^(bert|model)\."), ""),
    (re.compile(r"^embeddings\.LayerNorm\."), "embeddings.norm."),
    (re.compile(r"^encoder\.layer\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attention\.self\.(query|key|value)\."), r".attention.\1."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.out."),
    (re.compile(r"\.attention\.output\.LayerNorm\."), ".attention_norm."),
    (re.compile(r"\.intermediate\.dense\."), ".ffn.up."),
    (re.compile(r"\.output\.dense\."), ".ffn.down."),
    (re.compile(r"\.output\.LayerNorm\."), ".ffn_norm."),
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    (re.compile(r"norm\.gamma$"), "norm.weight"),
    (re.compile(r"norm\.beta$"), "norm.bias"),
]
# Heads and buffers an encoder does not use: pooler, MLM/NSP heads, position ids.
_DROP = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|.*\.num_batches_tracked$)")


class Model(nn.Module):
    """A BERT encoder: `model(input_ids, attention_mask)` -> hidden states [B, T, D]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embeddings = Embeddings(args)
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]
        # Plain attribute, not a parameter: which kernels to use (see above).
        self.fast_math = default_fast_math()

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> mx.array:
        for hidden in self.stages(input_ids, attention_mask, token_type_ids):
            pass
        return hidden

    def stages(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        token_type_ids: mx.array | None = None,
    ) -> Iterator[mx.array]:
        """The hidden states after the embeddings and after each layer, built
        lazily; the last one is the model's output. A caller running several
        batches on several streams evaluates them layer by layer, interleaved."""
        fast = self.fast_math
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None:
            # Every query attends to the real keys only: the fast path takes an
            # additive bias per key [B, 1, T, 1], the portable one a boolean
            # mask [B, 1, 1, T].
            keep = attention_mask != 0
            if fast:
                mask = mx.where(keep, 0.0, -1e4).astype(x.dtype)[:, None, :, None]
            else:
                mask = keep[:, None, None, :]
        yield x
        for layer in self.layers:
            x = layer(x, mask, fast)
            yield x

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

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
