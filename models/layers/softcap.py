"""Soft-capping: `cap * tanh(x / cap)` bounds values smoothly to (-cap, cap).
Gemma 2 caps its final logits this way; attention scores are capped inside
the attention backends (the Attention layer's `softcap`)."""

from __future__ import annotations

import mlx.core as mx

from models.layers.base import Layer


class SoftCap(Layer):
    def __init__(self, cap: float):
        super().__init__()
        if not (isinstance(cap, (int, float)) and cap > 0):
            raise ValueError(f"soft-capping must be positive, not {cap!r}")
        self.cap = float(cap)

    def forward(self, x: mx.array) -> mx.array:
        return mx.tanh(x / self.cap) * self.cap
