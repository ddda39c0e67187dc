"""Token embeddings, optionally scaled (Gemma multiplies by sqrt(hidden)),
and their use as a tied LM head."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from models.layers.base import Layer
from models.layers.linear import quantizable, with_group_size


class Embedding(Layer):
    def __init__(self, num_embeddings: int, dims: int, scale: float | None = None):
        super().__init__()
        self.weight = mx.random.normal((num_embeddings, dims)) * math.sqrt(1.0 / dims)
        self.scale = scale

    host_as_linear = None  # a platform's tied-head kernel for host arrays, if bound

    def forward(self, ids: mx.array) -> mx.array:
        x = self.weight[ids]
        return x * mx.array(self.scale, x.dtype) if self.scale else x

    def as_linear(self, x):
        """x @ W^T: the embedding table as a (tied) LM head."""
        if self.host_as_linear is not None and not isinstance(x, mx.array):
            return self.host_as_linear(x)
        return x @ self.weight.T

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", **kwargs):
        return ScaledQuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class ScaledQuantizedEmbedding(Layer, nn.QuantizedEmbedding):
    """MLX's quantized embedding as a shared layer, keeping the layer's scale."""

    host_as_linear = None

    def __init__(self, num_embeddings: int, dims: int, group_size=None, bits=None,
                 mode: str = "affine", scale: float | None = None):
        nn.QuantizedEmbedding.__init__(self, num_embeddings, dims, group_size, bits, mode)
        self.scale = scale

    @classmethod
    def from_embedding(cls, embedding: Embedding, group_size=None, bits=None,
                       mode: str = "affine"):
        num, dims = embedding.weight.shape
        made = quantizable(group_size, mode)
        layer = cls(num, dims, made, bits, mode, embedding.scale)
        quantized = nn.QuantizedEmbedding.from_embedding(embedding, made, bits, mode)
        layer.update(quantized.parameters())
        return with_group_size(layer, group_size)

    def forward(self, ids: mx.array) -> mx.array:
        x = nn.QuantizedEmbedding.__call__(self, ids)
        return x * mx.array(self.scale, x.dtype) if self.scale else x

    def as_linear(self, x):
        if self.host_as_linear is not None and not isinstance(x, mx.array):
            return self.host_as_linear(x)
        return nn.QuantizedEmbedding.as_linear(self, x)
