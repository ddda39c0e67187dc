"""Integer matmul on the CPU for group-quantized weights (cpu_int8_matmul.c).

MLX's CPU quantized matmul runs at ~2 GFLOP/s, so the engine used to turn a
4-bit checkpoint into fp32 and hand it to MKL (~120 GFLOP/s at 64 rows on the
2-core box). With AVX-512 VNNI the CPU multiplies 8-bit integers four times as
densely as fp32, and the checkpoint's codes already are small integers: this
kernel keeps them, quantizes each activation row per group, and multiplies in
integers. Activations go to int16 ("wide", the engine's default: about as
exact as fp16 activations) or to int8 (llama.cpp's scheme for its Q4/Q8
weights: ~1.5x faster, visibly less exact).

`pack` turns an MLX quantized weight into the kernel's layout once, at load.
The kernel is part of the native library built at install (engine/platform/
native.py); `load()` returns None where there is none or the CPU has no
AVX-512 VNNI, and callers keep fp32.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import NamedTuple

import numpy as np

_F32 = ctypes.POINTER(ctypes.c_float)


class PackedWeight(NamedTuple):
    """A weight [N, K] in the kernel's layout (see cpu_int8_matmul.c)."""

    codes: np.ndarray   # [Np/16, K/L, 16, L] uint8; L = 2 if wide else 4
    scales: np.ndarray  # [Np/16, K/G, 16] float32
    biases: np.ndarray  # [Np/16, K/G, 16] float32
    out_dim: int
    in_dim: int
    group_size: int
    wide: bool          # int16 activations (else int8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX's quantized uint32 words [N, K*bits/32] -> codes [N, K] uint8.
    The words are one little-endian bit stream per row: code j sits at bits
    [bits*j, bits*(j+1)) of it (for 3, 5 and 6 bits codes straddle words)."""
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        codes = (packed[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1).astype(np.uint8)
    stream = np.unpackbits(np.ascontiguousarray(packed).view(np.uint8), axis=1,
                           bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint8)
    return (stream.reshape(packed.shape[0], -1, bits) * weights).sum(axis=2, dtype=np.uint8)


# Codes of up to 8 bits: the kernel holds one code a byte, whatever its width.
BITS = (2, 3, 4, 5, 6, 8)


def supports(bits: int, group_size: int, in_dim: int, out_dim: int) -> bool:
    return bits in BITS and group_size % 4 == 0 and in_dim % group_size == 0 and out_dim > 0


def pack(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
         group_size: int, wide: bool = False) -> PackedWeight:
    """Re-lay an MLX quantized weight (its uint32 words, scales, biases) for
    int8 activations, or int16 ones if `wide`."""
    codes = unpack_codes(np.asarray(packed), bits)
    n, k = codes.shape
    n_pad = -(-n // 32) * 32
    groups = k // group_size

    def padded(a: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros((n_pad, width), a.dtype)
        out[:n] = a
        return out

    lanes = 2 if wide else 4
    codes = padded(codes, k).reshape(n_pad // 16, 16, k // lanes, lanes).transpose(0, 2, 1, 3)

    def per_tile(a: np.ndarray) -> np.ndarray:
        a = padded(np.asarray(a, np.float32), groups)
        return _aligned(a.reshape(n_pad // 16, 16, groups).transpose(0, 2, 1))

    return PackedWeight(_aligned(codes), per_tile(scales), per_tile(biases), n, k, group_size,
                        wide)


def concat(weights: list[PackedWeight]) -> PackedWeight | None:
    """One weight whose outputs are those of `weights` in turn (e.g. q, k, v
    sharing an input), or None where their layouts don't line up: same input
    size, group and activations, and every output count but the last a
    multiple of 32 (the packed tiles then simply follow each other)."""
    first = weights[0]
    if any((w.in_dim, w.group_size, w.wide) != (first.in_dim, first.group_size, first.wide)
           for w in weights) or any(w.out_dim % 32 for w in weights[:-1]):
        return None
    return PackedWeight(*(_aligned(np.concatenate([getattr(w, f) for w in weights]))
                          for f in ("codes", "scales", "biases")),
                        sum(w.out_dim for w in weights), first.in_dim, first.group_size,
                        first.wide)


def parts_of(fused: PackedWeight, weights: list[PackedWeight]) -> list[PackedWeight]:
    """`weights` as views into `fused` (made by `concat` of them): the same
    values without a second copy in memory. Each part starts on a whole tile,
    so the views keep the kernel's alignment."""
    out, tile = [], 0
    for w in weights:
        tiles = -(-w.out_dim // 16)
        out.append(w._replace(**{f: getattr(fused, f)[tile:tile + tiles]
                                 for f in ("codes", "scales", "biases")}))
        tile += tiles
    return out


def _aligned(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts on an `alignment` boundary
    (the kernel uses aligned vector loads)."""
    raw = np.empty(a.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class Int8Matmul:
    """Callable: x [M, K] float32 -> x @ W.T [M, N] float32 for a PackedWeight."""

    def __init__(self, library: ctypes.CDLL, threads: int):
        """`library`: the native kernels (engine.platform.native.library())."""
        lib = library
        self.supported = bool(lib.int8_matmul_supported())
        self.threads = threads
        self._fn = lib.int8_matmul
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_F32, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             _F32, _F32, ctypes.c_int, ctypes.c_int, _F32, ctypes.c_long,
                             ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def __call__(self, x: np.ndarray, w: PackedWeight) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != w.in_dim:
            raise ValueError(f"x must be [M, {w.in_dim}], got {x.shape}")
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty((x.shape[0], w.out_dim), np.float32)
        if x.shape[0] == 0:
            return y
        rc = self._fn(x.ctypes.data_as(_F32), x.shape[1], x.shape[0], w.in_dim,
                      w.codes.ctypes.data, w.scales.ctypes.data_as(_F32),
                      w.biases.ctypes.data_as(_F32), w.out_dim, w.group_size,
                      y.ctypes.data_as(_F32), w.out_dim, 0, int(w.wide), self.threads)
        if rc != 0:
            raise MemoryError("int8 matmul: no scratch memory")
        return y


def reference(x: np.ndarray, w: PackedWeight, codes: np.ndarray, scales: np.ndarray,
              biases: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in numpy (float64), for tests: codes [N, K] uint8,
    scales/biases [N, K/G] as MLX stores them."""
    g = w.group_size
    m, k = x.shape
    top = 32767.0 if w.wide else 127.0
    xg = x.astype(np.float64).reshape(m, k // g, g)
    amax = np.abs(xg).max(axis=2, keepdims=True)
    inv = np.divide(top, amax, out=np.zeros_like(amax), where=amax > 0)
    qx = np.rint((xg.astype(np.float32) * inv.astype(np.float32)).astype(np.float64))
    dx = amax / top
    cg = codes.astype(np.float64).reshape(codes.shape[0], k // g, g)
    dots = np.einsum("mgi,ngi->mng", qx, cg)
    return (np.einsum("mng,ng,mg->mn", dots, scales.astype(np.float64), dx[:, :, 0])
            + np.einsum("ng,mg->mn", biases.astype(np.float64), xg.sum(axis=2)))


@functools.lru_cache(maxsize=4)
def load(threads: int | None = None) -> Int8Matmul | None:
    """The kernel for this CPU on `threads` threads (default: every core), or
    None (no native kernels, or no AVX-512 VNNI)."""
    from engine.platform import native

    library = native.library()
    if library is None:
        return None
    matmul = Int8Matmul(library, threads=threads or os.cpu_count() or 1)
    return matmul if matmul.supported else None
