"""Linear layers: float weights, and MLX's group-quantized form.

Checkpoint quantization (`quantization` in config.json) turns a `Linear` into
MLX's `nn.QuantizedLinear` through `nn.quantize`, as in mlx-lm; a platform may
replace either with its own form at load (engine/platform)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from models.layers.base import Layer


class Linear(Layer):
    """y = x W^T (+ b), W [out, in] as checkpoints store it."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__()
        bound = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-bound, bound, (output_dims, input_dims))
        if bias:
            self.bias = mx.random.uniform(-bound, bound, (output_dims,))

    def forward(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight.T)
        return x @ self.weight.T

    def to_quantized(self, group_size: int | None = None, bits: int | None = None,
                     mode: str = "affine", **kwargs) -> nn.QuantizedLinear:
        return nn.QuantizedLinear.from_linear(self, group_size, bits, mode)
