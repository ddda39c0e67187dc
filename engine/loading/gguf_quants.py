"""GGML's quantized blocks re-laid, once at import, as MLX's affine form.

Every quantized type read here stores, per group of inputs, small unsigned
integer codes q with one scale s and one offset b such that the weight is
s * q + b, which is exactly MLX's affine quantization (packed uint32 codes,
`scales`, `biases`) and what the CPU's integer kernel multiplies. So nothing
is dequantized to float: the codes are moved, never rounded.

  type  values/block  group  bits  weight                  s            b
  Q4_0      32          32    4    d * (q - 8)             d            -8 d
  Q4_1      32          32    4    d * q + m               d            m
  Q5_0      32          32    5    d * (q - 16)            d            -16 d
  Q5_1      32          32    5    d * q + m               d            m
  Q8_0      32          32    8    d * (q' - 128)          d            -128 d
  Q4_K     256          32    4    d*sc_j * q - dmin*m_j   d*sc_j       -dmin*m_j
  Q5_K     256          32    5    d*sc_j * q - dmin*m_j   d*sc_j       -dmin*m_j
  Q6_K     256          16    6    d*sc_j * (q - 32)       d*sc_j       -32 d*sc_j

(q' = Q8_0's signed byte + 128.) The legacy types' s and b are float16 like
their d and m (-8d, -16d and -128d are exact in float16 short of overflow).
The K-quants' products of a float16 d and a 6- or 8-bit integer need up to
19 significant bits, so their s and b are float32, where the products are
exact: s * q + b is GGML's own value (tests/test_gguf_quants.py checks it
against the `gguf` package's dequantization). Q6_K's sub-blocks are 16 wide,
a group size MLX's quantize refuses but its dequantize and the CPU kernel take.

Block layouts follow ggml-common.h (little-endian, float16 d/dmin).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# type -> (values per block, bytes per block)
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


class Affine(NamedTuple):
    """codes [rows, cols] uint8, scales/biases [rows, cols / group_size]."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    group_size: int
    bits: int


def to_affine(ggml_type: str, raw: np.ndarray, cols: int) -> Affine:
    """The blocks of a tensor with rows of `cols` values (raw: uint8 [rows,
    bytes per row]) as codes with a scale and offset per group."""
    per_block, nbytes = BLOCKS[ggml_type]
    rows = raw.shape[0]
    blocks = raw.reshape(rows * (cols // per_block), nbytes)
    codes, scales, biases, group, bits = _DECODERS[ggml_type](blocks)
    return Affine(codes.reshape(rows, cols), scales.reshape(rows, cols // group),
                  biases.reshape(rows, cols // group), group, bits)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, cols] -> MLX's uint32 words [rows, cols * bits / 32]:
    one little-endian bit stream, element j at bits [bits*j, bits*(j+1))."""
    rows = codes.shape[0]
    if bits == 8:
        packed = codes
    elif bits == 4:
        packed = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))
    else:
        planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
        packed = np.packbits(planes.reshape(rows, -1), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint32)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as [blocks, 1] float32."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: the low nibbles are values 0-15, the high 16-31."""
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 is value j's fifth bit."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")
    return bits << np.uint8(4)


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:18]), d, -8 * d, 32, 4


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b, 0), _f16(b, 2), 32, 4


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6]), d, -16 * d, 32, 5


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2), 32, 5


def _q8_0(b):
    d = _f16(b, 0)
    codes = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d, 32, 8


def _k_scales(packed: np.ndarray):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins. Sub-blocks
    0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    4-7 take their low 4 bits from bytes 8-11 and their top 2 from the spare
    top bits of bytes 0-3 / 4-7."""
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 four-bit codes: each 32-byte chunk holds two
    sub-blocks, the first in the low nibbles, the second in the high."""
    chunks = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (chunks & np.uint8(15)).reshape(-1, 256)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    return _k_low_nibbles(b[:, 16:144]), d * sc, -(dmin * m), 32, 4


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scales(b[:, 4:16])
    # qh: bit j of byte i is the fifth bit of value i of sub-block j
    high = (b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1))
    codes = _k_low_nibbles(b[:, 48:176]) | ((high & np.uint8(1)) << np.uint8(4)).reshape(-1, 256)
    return codes, d * sc, -(dmin * m), 32, 5


def _q6_k(b):
    # Two halves of 128 values. In each, ql's 64 bytes give the low nibbles of
    # values 0-63 (low) and 64-127 (high); qh's 32 bytes give the top two
    # bits of values 0-31, 32-63, 64-95, 96-127 in bit pairs 0, 2, 4, 6.
    ql = b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6],
                                                           np.uint8).reshape(1, 1, 4, 1)
    codes = (ql & np.uint8(15)).reshape(-1, 256) | ((qh & np.uint8(3)) << np.uint8(4)).reshape(
        -1, 256)
    scale = _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    return codes, scale, -32 * scale, 16, 6


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
_LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def scale_dtype(ggml_type: str):
    """float16 where GGML's own numbers are float16 (legacy types), float32
    where s and b are products that need it (K-quants)."""
    return np.float16 if ggml_type in _LEGACY else np.float32
