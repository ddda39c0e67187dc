"""Per-layer numbers a custom CUDA kernel takes compiled in, not as arrays.

An array made on the host (mx.array of a list) lives in CUDA managed memory
under MLX: the device's first read of it migrates its page, a fault that
stalls the launch, and one is made at every call of an eager step. A
constant of a layer (a scale, an epsilon, a window) is therefore a template
argument. MLX's template arguments are ints, and the kernel's name carries
their values, so a float travels as its bits and may not be negative.
"""

from __future__ import annotations

import struct


def float_bits(x: float) -> int:
    """x as float32 bits (read back in the kernel with __int_as_float)."""
    if not x >= 0.0:
        raise ValueError(f"a kernel constant must be a non-negative float, not {x}")
    return struct.unpack("<i", struct.pack("<f", x))[0]


def bits_float(bits: int) -> float:
    """The float32 whose bits are `bits` (what the kernel reads)."""
    return struct.unpack("<f", struct.pack("<i", bits))[0]
