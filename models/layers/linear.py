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
        layer = nn.QuantizedLinear.from_linear(self, quantizable(group_size, mode), bits, mode)
        return with_group_size(layer, group_size)


# The group sizes mx.quantize makes. A checkpoint may bring codes in others
# (GGUF's Q6_K: 16), which mx.dequantize and MLX's CPU matmul take: such a
# layer is made at 32, then given its own group size (the load fills it).
QUANTIZE_GROUP_SIZES = (32, 64, 128)


def quantizable(group_size: int | None, mode: str = "affine") -> int | None:
    """The group size to build a quantized layer at before `with_group_size`."""
    if group_size is None or group_size in QUANTIZE_GROUP_SIZES or mode != "affine":
        return group_size
    return 32


def with_group_size(layer: nn.Module, group_size: int | None) -> nn.Module:
    """A quantized layer (built at `quantizable(group_size)`) with scales and
    biases shaped for `group_size`, zero until its weights are loaded."""
    if group_size is None or layer.group_size == group_size:
        return layer
    rows, groups = layer.scales.shape
    width = groups * layer.group_size
    layer.group_size = group_size
    layer.scales = mx.zeros((rows, width // group_size), layer.scales.dtype)
    if "biases" in layer:
        layer.biases = mx.zeros_like(layer.scales)
    return layer
