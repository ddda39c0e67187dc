"""Normalisation layers.

`RMSNorm(offset=1.0)` is the Gemma variant whose checkpoints store `weight`
as a difference from one (it scales by `1 + weight`).
"""

from __future__ import annotations

import mlx.core as mx

from models.layers.base import Layer, is_host


class RMSNorm(Layer):
    # A platform's kernel for `add_and_norm` in one launch, bound per layer
    # (engine/platform/cuda_norm.py); None: MLX's add, then this norm.
    fused_add = None

    def __init__(self, dims: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.weight = mx.ones((dims,)) if offset == 0.0 else mx.zeros((dims,))
        self.eps, self.offset = eps, offset

    def scale(self) -> mx.array:
        """The multiplier applied after normalising (weight + offset)."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale().astype(x.dtype), self.eps)

    def add_and_norm(self, x, delta):
        """(x + delta, this norm of it): a residual add and the norm after it."""
        if self.fused_add is not None and not is_host(x):
            return self.fused_add(x, delta, self.scale(), self.eps)
        h = x + delta
        return h, self(h)


class LayerNorm(Layer):
    def __init__(self, dims: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.eps = eps

    def forward(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.get("bias"), self.eps)
