"""Rotary position embeddings applied per token of a packed batch.

Tokens of many sequences travel as one packed row, each with its own position,
so RoPE takes a vector of positions (mx.fast.rope's array offset, one per
token) instead of mlx-lm's single cache offset.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn


class RoPE(nn.Module):
    def __init__(self, dims: int, base: float, scaling: dict[str, Any] | None = None,
                 traditional: bool = False):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.scale = 1.0
        self._freqs = None
        self.base: float | None = base
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif kind == "llama3":
            self._freqs = _llama3_freqs(dims, base, scaling)
            self.base = None
        elif kind not in (None, "default"):
            raise ValueError(f"unsupported rope_scaling type {kind!r}")

    def angle_rates(self) -> list[float]:
        """Radians per position of each rotated pair (scale included): the
        angles mx.fast.rope uses, for code that rotates outside MLX."""
        if self._freqs is not None:
            periods = self._freqs.tolist()
        else:
            periods = [self.base ** (i / self.dims) for i in range(0, self.dims, 2)]
        return [self.scale / p for p in periods]

    def __call__(self, x: mx.array, positions: mx.array) -> mx.array:
        """x: [N, heads, head_dim] packed tokens; positions: [N] int32."""
        y = mx.fast.rope(x[:, :, None, :], self.dims, traditional=self.traditional,
                         base=self.base, scale=self.scale, offset=positions,
                         freqs=self._freqs)
        return y[:, :, 0, :]


def _llama3_freqs(dims: int, base: float, scaling: dict[str, Any]) -> mx.array:
    # Llama 3.1 stretches low-frequency bands by `factor` and leaves high ones,
    # blending smoothly between the two wavelength thresholds.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = original / low, original / high
    periods = []
    for i in range(0, dims, 2):
        period = base ** (i / dims)
        wavelen = 2 * math.pi * period
        if wavelen > low_wavelen:
            period *= factor
        elif wavelen >= high_wavelen:
            smooth = (original / wavelen - low) / (high - low)
            period = period / ((1 - smooth) / factor + smooth)
        periods.append(period)
    return mx.array(periods, dtype=mx.float32)
