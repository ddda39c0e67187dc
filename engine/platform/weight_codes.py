"""16-bit integer codes for float weights (kernels/cpu_int16_matmul.c).

A float checkpoint's Linear weights can be quantized once, at load, and
multiplied in integers with int16 activations, about twice as fast as float32
sgemm on an AVX-512 VNNI CPU. 8-bit codes (cpu_int8_matmul.c) are the same
speed but move a sentence embedding too far from float32 (all-MiniLM-L6-v2:
cosine ~0.9998); these keep 12 bits a weight (symmetric, a scale per group of
32 inputs) and land within ~1e-6 of it (bench/RESULTS.md).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

WEIGHT_TOP = 2047   # |code| of a weight: 12-bit signed
ACTIVATION_TOP = 16383  # |code| of an activation, as the kernel quantizes it


class Codes16(NamedTuple):
    """A weight [N, K] as int16 codes in the kernel's layout."""

    codes: np.ndarray   # [Np/16, K/2, 16, 2] int16
    scales: np.ndarray  # [Np/16, K/G, 16] float32
    out_dim: int
    in_dim: int
    group_size: int


def supports(group_size: int, in_dim: int, out_dim: int) -> bool:
    # A group's integer sum must stay below 2^31: G * 2047 * 16383 < 2^31.
    return 0 < group_size <= 64 and group_size % 2 == 0 and in_dim % group_size == 0 \
        and out_dim > 0


def quantize(weight: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric codes [N, K] int16 and scales [N, K/G] float32 of a float weight."""
    n, k = weight.shape
    groups = weight.astype(np.float32).reshape(n, k // group_size, group_size)
    amax = np.abs(groups).max(axis=2)
    scales = (amax / WEIGHT_TOP).astype(np.float32)
    inv = np.divide(WEIGHT_TOP, amax, out=np.zeros_like(amax), where=amax > 0)
    codes = np.rint(groups * inv[:, :, None]).astype(np.int16)
    return codes.reshape(n, k), scales


def pack(weight: np.ndarray, group_size: int) -> Codes16:
    """Quantize a float weight [N, K] and lay it out for the kernel."""
    if not supports(group_size, weight.shape[1], weight.shape[0]):
        raise ValueError(f"no 16-bit codes for a {weight.shape} weight in groups of "
                         f"{group_size}")
    codes, scales = quantize(weight, group_size)
    n, k = codes.shape
    n_pad = -(-n // 32) * 32
    padded = np.zeros((n_pad, k), np.int16)
    padded[:n] = codes
    tiled = padded.reshape(n_pad // 16, 16, k // 2, 2).transpose(0, 2, 1, 3)
    groups = k // group_size
    per_tile = np.zeros((n_pad, groups), np.float32)
    per_tile[:n] = scales
    per_tile = per_tile.reshape(n_pad // 16, 16, groups).transpose(0, 2, 1)
    return Codes16(_aligned(tiled), _aligned(per_tile), n, k, group_size)


def concat(weights: list[Codes16]) -> Codes16 | None:
    """One weight whose outputs are those of `weights` in turn (same input),
    or None where the tiles don't line up (every output count but the last
    a multiple of 32, same input size and group)."""
    first = weights[0]
    if any((w.in_dim, w.group_size) != (first.in_dim, first.group_size) for w in weights) \
            or any(w.out_dim % 32 for w in weights[:-1]):
        return None
    return Codes16(_aligned(np.concatenate([w.codes for w in weights])),
                   _aligned(np.concatenate([w.scales for w in weights])),
                   sum(w.out_dim for w in weights), first.in_dim, first.group_size)


def reference(x: np.ndarray, weight: np.ndarray, group_size: int) -> np.ndarray:
    """The kernel's arithmetic in numpy (float64), for tests: x [M, K] @ the
    quantized weight's transpose, activations quantized per row and group."""
    codes, scales = quantize(weight, group_size)
    m, k = x.shape
    xg = x.astype(np.float32).reshape(m, k // group_size, group_size)
    amax = np.abs(xg).max(axis=2, keepdims=True)
    inv = np.divide(np.float32(ACTIVATION_TOP), amax, out=np.zeros_like(amax), where=amax > 0)
    qx = np.rint(xg * inv).astype(np.float64)
    dx = amax.astype(np.float64) / ACTIVATION_TOP
    cg = codes.astype(np.float64).reshape(codes.shape[0], k // group_size, group_size)
    dots = np.einsum("mgi,ngi->mng", qx, cg)
    return np.einsum("mng,ng,mg->mn", dots, scales.astype(np.float64), dx[:, :, 0])


def _aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` starting on an `alignment` boundary (the
    kernel uses aligned vector loads)."""
    raw = np.empty(a.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out
