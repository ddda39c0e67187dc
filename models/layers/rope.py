"""Rotary position embeddings for packed tokens, with the scaling variants
checkpoints use (config.json's `rope_scaling` / `rope_parameters`).

Tokens of many sequences travel as one packed row, each with its own position,
so RoPE takes a vector of positions (mx.fast.rope's array offset, one per
token) instead of mlx-lm's single cache offset. Every variant reduces to the
same three numbers per rotated pair: a period (radians per position is
scale / period) and one magnitude `mscale` for the rotated dims (YaRN, LongRoPE).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from models.layers.base import Layer

SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope", "su")


class RoPE(Layer):
    def __init__(self, dims: int, base: float = 10000.0, scaling: dict[str, Any] | None = None,
                 traditional: bool = False, max_position_embeddings: int | None = None):
        super().__init__()
        if not (isinstance(base, (int, float)) and base > 0):
            raise ValueError(f"a RoPE base must be a positive number, not {base!r}")
        self.dims, self.base, self.traditional = dims, base, traditional
        self.scale, self.mscale = 1.0, 1.0
        short, self.switch = None, None
        scaling = scaling or {}
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        periods = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        elif kind == "llama3":
            periods = _llama3_periods(periods, scaling)
        elif kind == "yarn":
            periods, self.mscale = _yarn(periods, dims, base, scaling)
        elif kind in ("longrope", "su"):
            periods, self.mscale, short, self.switch = _longrope(periods, scaling,
                                                                 max_position_embeddings)
        elif kind != "default":
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: "
                             f"{', '.join(SUPPORTED)}")
        self.kind = kind
        self._periods = periods
        # mx.fast.rope takes the base for the plain schedule, else explicit periods.
        self._freqs = None if kind in ("default", "linear") else mx.array(periods, mx.float32)
        # LongRoPE's short factors rotate positions below `switch`, its long
        # ones the rest (per position, so a cached key keeps its rotation).
        self._short_periods = short
        self._short_freqs = None if short is None else mx.array(short, mx.float32)
        # Radians per position of each pair, for kernels that rotate themselves.
        self._inv = mx.array(self.scale / periods, mx.float32)
        self._short_inv = None if short is None else mx.array(self.scale / short, mx.float32)
        self._schedule = (dims, traditional, self.mscale, self.scale, periods.tobytes(),
                          None if short is None else short.tobytes(), self.switch)

    def schedule(self) -> tuple:
        """What decides the rotation (hashable): equal schedules rotate alike."""
        return self._schedule

    def cos_sin(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """cos and sin [N, dims/2] (float32) of each rotated pair at `positions`,
        the magnitude folded in: what a kernel that rotates inside attention
        multiplies by (kvcache/attention/cuda.py)."""
        pos = positions.astype(mx.float32)[:, None]
        angles = pos * self._inv[None, :]
        if self._short_inv is not None:
            angles = mx.where(pos < self.switch, pos * self._short_inv[None, :], angles)
        if self.mscale != 1.0:
            return mx.cos(angles) * self.mscale, mx.sin(angles) * self.mscale
        return mx.cos(angles), mx.sin(angles)

    def angles(self, positions: np.ndarray) -> np.ndarray:
        """Radians [N, dims/2] of each rotated pair at `positions` (float64),
        for code that rotates outside MLX."""
        pos = np.asarray(positions, np.float64)[:, None]
        angles = pos * (self.scale / self._periods)[None, :]
        if self._short_periods is not None:
            short = pos * (self.scale / self._short_periods)[None, :]
            angles = np.where(pos < self.switch, short, angles)
        return angles

    def forward(self, x: mx.array, positions: mx.array) -> mx.array:
        """x: [N, heads, head_dim] packed tokens; positions: [N] int32."""
        if self.mscale != 1.0:
            x = _scale_rotated(x, self.dims, self.mscale)
        y = self._rotate(x, positions, self._freqs)
        if self._short_freqs is not None:
            short = (positions < self.switch)[:, None, None]
            y = mx.where(short, self._rotate(x, positions, self._short_freqs), y)
        return y

    def _rotate(self, x: mx.array, positions: mx.array, freqs: mx.array | None) -> mx.array:
        y = mx.fast.rope(x[:, :, None, :], self.dims, traditional=self.traditional,
                         base=None if freqs is not None else self.base,
                         scale=self.scale, offset=positions, freqs=freqs)
        return y[:, :, 0, :]


def _scale_rotated(x: mx.array, dims: int, factor: float) -> mx.array:
    if dims == x.shape[-1]:
        return x * factor
    return mx.concatenate([x[..., :dims] * factor, x[..., dims:]], axis=-1)


def _llama3_periods(periods: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    # Llama 3.1 stretches low-frequency bands by `factor` and leaves high ones,
    # blending smoothly between the two wavelength thresholds.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi * periods
    # Equal thresholds (as Llama 4 configs have) leave no band to blend.
    smooth = (original / wavelen - low) / (high - low) if high != low else np.ones_like(periods)
    blended = periods / ((1 - smooth) / factor + smooth)
    return np.where(wavelen > original / low, periods * factor,
                    np.where(wavelen < original / high, periods, blended))


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(periods: np.ndarray, dims: int, base: float, scaling: dict[str, Any]):
    # YaRN: dimensions that turn many times within the original context keep
    # their period, slow ones are interpolated by `factor`, a linear ramp between.
    factor = float(scaling["factor"])
    original = float(scaling.get("original_max_position_embeddings", 4096))
    fast, slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(fast)), 0)
    high = min(math.ceil(correction_dim(slow)), dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp
    stretched = factor * periods
    out = stretched * periods / (stretched * keep + periods * (1 - keep))
    mscale = _yarn_mscale(factor, float(scaling.get("mscale", 1))) / _yarn_mscale(
        factor, float(scaling.get("mscale_all_dim", 0)))
    return out, mscale


def _longrope(periods: np.ndarray, scaling: dict[str, Any], max_positions: int | None):
    # Phi-3's LongRoPE ("su"): per-pair factors stretch the periods, short ones
    # within the original context and long ones past it (as transformers and
    # vLLM do; mlx-lm always uses the long ones), and a magnitude keeps
    # attention entropy steady. Returns (long periods, magnitude, short
    # periods or None, the first position on the long ones).
    original = int(scaling.get("original_max_position_embeddings") or max_positions or 4096)

    def stretched(key: str) -> np.ndarray:
        factors = np.asarray(scaling[key], np.float64)
        if factors.shape not in ((), periods.shape):
            raise ValueError(f"rope_scaling {key} has {factors.size} values, expected "
                             f"{periods.size}")
        return factors * periods

    ratio = (max_positions or original) / original
    mscale = scaling.get("long_mscale") or (
        1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original)))
    short = stretched("short_factor") if scaling.get("short_factor") is not None else None
    return stretched("long_factor"), float(mscale), short, original
