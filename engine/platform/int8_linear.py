"""Quantized layers whose matmul runs in the CPU's integer kernel.

They stand where a checkpoint's QuantizedLinear / QuantizedEmbedding stood,
with the same call signature, so model files don't change. The weight codes
live outside MLX in the kernel's packed layout (models/cpu_int8_matmul.py);
a call evaluates its input (the kernel reads host memory), multiplies, and
hands the result back to MLX as a new array. A tied embedding keeps MLX's
quantized lookup for token ids and uses the kernel for `as_linear` (the LM head).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.platform.int8_matmul import Int8Matmul, PackedWeight, pack
from models.layers.base import Layer
from models.layers.embedding import ScaledQuantizedEmbedding
from models.layers.linear import quantizable, with_group_size


def _packed_from(module: nn.Module, wide: bool) -> PackedWeight:
    def host(a: mx.array) -> np.ndarray:
        return np.array(a.astype(mx.float32) if a.dtype != mx.uint32 else a)

    return pack(host(module.weight), host(module.scales), host(module["biases"]),
                module.bits, module.group_size, wide)


def _host_matmul(kernel: Int8Matmul, weight: PackedWeight, x: mx.array) -> mx.array:
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype != mx.float32:
        rows = rows.astype(mx.float32)
    y = kernel(np.array(rows, copy=False), weight)
    return mx.array(y).reshape(*lead, weight.out_dim)


class Int8Linear(Layer):
    def __init__(self, weight: PackedWeight, bias: mx.array | None, kernel: Int8Matmul):
        super().__init__()
        self._packed, self._kernel = weight, kernel
        if bias is not None:
            self.bias = bias

    @property
    def packed(self) -> PackedWeight:
        """The weight in the kernel's layout (read by the CPU fast path)."""
        return self._packed

    def share_packed(self, weight: PackedWeight) -> None:
        """Replace the weight by an equal one (a view into a fused copy)."""
        if (weight.out_dim, weight.in_dim) != (self._packed.out_dim, self._packed.in_dim):
            raise ValueError("a packed weight of another shape")
        self._packed = weight

    @classmethod
    def from_quantized(cls, module: nn.QuantizedLinear, kernel: Int8Matmul,
                       wide: bool = False) -> Int8Linear:
        """`wide`: int16 activations instead of int8."""
        bias = module.bias.astype(mx.float32) if "bias" in module else None
        return cls(_packed_from(module, wide), bias, kernel)

    def forward(self, x: mx.array) -> mx.array:
        y = _host_matmul(self._kernel, self._packed, x)
        return y + self.bias if "bias" in self else y


class Int8Embedding(ScaledQuantizedEmbedding):
    """MLX's quantized lookup; the kernel for the tied LM head."""

    @classmethod
    def from_quantized(cls, module: nn.QuantizedEmbedding, kernel: Int8Matmul,
                       wide: bool = False) -> Int8Embedding:
        layer = cls(module.num_embeddings, module.dims, quantizable(module.group_size),
                    module.bits, scale=getattr(module, "scale", None))
        with_group_size(layer, module.group_size)
        layer.update(module.parameters())
        # float32 scales: looked-up rows come out in the model's compute dtype
        layer.scales = module.scales.astype(mx.float32)
        layer.biases = module["biases"].astype(mx.float32)
        layer.freeze()
        layer._packed, layer._kernel = _packed_from(module, wide), kernel
        return layer

    @property
    def packed(self) -> PackedWeight:
        return self._packed

    def as_linear(self, x):
        if self.host_as_linear is not None and not isinstance(x, mx.array):
            return self.host_as_linear(x)
        return _host_matmul(self._kernel, self._packed, x)
