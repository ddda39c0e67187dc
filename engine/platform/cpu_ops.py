"""The per-layer CPU operations of kernels/cpu_ops.c, on numpy arrays.

Each call takes C-contiguous float32 arrays and returns new ones (or works in
place where it says so); weights are described once, at bind time, as a
`HostMatmul` holding the pointers the C code reads.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from engine.platform import weight_codes
from engine.platform.int8_matmul import PackedWeight
from engine.platform.weight_codes import Codes16

ACTIVATION_KINDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


class _Matmul(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("out_dim", ctypes.c_int), ("in_dim", ctypes.c_int),
                ("group_size", ctypes.c_int), ("wide", ctypes.c_int)]


class HostMatmul:
    """A weight (float32 [out, in], packed integer codes of a checkpoint, or
    16-bit codes of a float weight) and optional bias as the C code
    multiplies it; keeps the arrays it points into alive."""

    def __init__(self, weight: np.ndarray | PackedWeight | Codes16,
                 bias: np.ndarray | None = None):
        self.keep = [weight, bias]
        b = None if bias is None else _f32(bias).ctypes.data
        if isinstance(weight, Codes16):
            self.packed = weight
            # wide = 2 tells ops_linear these are 16-bit symmetric codes (the
            # kernel adds the layer's bias itself; there are no per-group biases)
            self.struct = _Matmul(None, weight.codes.ctypes.data, weight.scales.ctypes.data,
                                  None, b, weight.out_dim, weight.in_dim, weight.group_size, 2)
        elif isinstance(weight, PackedWeight):
            self.packed = weight
            self.struct = _Matmul(None, weight.codes.ctypes.data, weight.scales.ctypes.data,
                                  weight.biases.ctypes.data, b, weight.out_dim, weight.in_dim,
                                  weight.group_size, int(weight.wide))
        else:
            weight = _f32(weight)
            self.packed = None
            self.keep[0] = weight
            self.struct = _Matmul(weight.ctypes.data, None, None, None, b, weight.shape[0],
                                  weight.shape[1], 0, 0)
        self.keep[1] = None if bias is None else _f32(bias)
        self.out_dim, self.in_dim = self.struct.out_dim, self.struct.in_dim
        self.ref = ctypes.byref(self.struct)

    @classmethod
    def fused(cls, parts: list[HostMatmul]) -> HostMatmul | None:
        """One weight producing the outputs of `parts` in turn (same input),
        or None where they can't be fused (mixed kinds, bias on some parts
        only, code tiles that don't line up). A checkpoint's packed codes are
        fused by host_forward.bind_attention instead, as views that keep one copy."""
        biases = [p.keep[1] for p in parts]
        if all(b is None for b in biases):
            bias = None
        elif all(b is not None for b in biases):
            bias = np.concatenate(biases)
        else:
            return None
        if all(isinstance(p.packed, Codes16) for p in parts):
            codes = weight_codes.concat([p.packed for p in parts])
            return None if codes is None else cls(codes, bias)
        if all(p.packed is None for p in parts):
            return cls(np.concatenate([p.keep[0] for p in parts]), bias)
        return None


def address(a: np.ndarray) -> int:
    """The data address of a C-contiguous array. ctypes.c_char.from_buffer
    costs about a quarter of `a.ctypes.data` (which builds a helper object
    each time), and a one-row decode step takes ~400 addresses; read-only or
    empty arrays take the slow way."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.ctypes.data


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class CpuOps:
    """Callable operations over the C library; `threads` for OpenMP loops."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib, self.threads = lib, threads
        p, i, f, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
        lib.ops_linear.argtypes = [p, p, i, p, i, i]
        lib.ops_linear_split.argtypes = [p, p, i, p, p, i, i]
        lib.ops_rms_norm.argtypes = [p, L, i, p, f, p, i]
        lib.ops_layer_norm.argtypes = [p, L, i, p, p, f, p, i]
        lib.ops_rope.argtypes = [p, i, i, i, i, p, p, i, i]
        lib.ops_act_mul.argtypes = [p, p, L, i, i]
        lib.ops_linear.restype = lib.ops_linear_split.restype = lib.ops_act_mul.restype = i
        lib.ops_rms_norm.restype = lib.ops_layer_norm.restype = lib.ops_rope.restype = None
        lib.ops_encoder_attention.argtypes = [p, p, p, p, i, i, p, i, i, i, f, i, i]
        lib.ops_encoder_attention.restype = i
        # Packed integer weights run only where the integer kernel was built
        # for this CPU (AVX-512 VNNI).
        self.integer_codes = bool(lib.int8_matmul_supported())

    def linear(self, m: HostMatmul, x: np.ndarray) -> np.ndarray:
        """x [..., in] @ W.T (+ bias) -> [..., out]."""
        rows = _f32(x).reshape(-1, m.in_dim)
        y = np.empty((rows.shape[0], m.out_dim), np.float32)
        _check(self.lib.ops_linear(m.ref, address(rows), rows.shape[0], address(y), 0,
                                   self.threads))
        return y.reshape(*x.shape[:-1], m.out_dim)

    def linear_split(self, fused: HostMatmul, x: np.ndarray, widths: list[int]):
        """The outputs of a fused weight, each its own contiguous [rows, width]."""
        rows = _f32(x).reshape(-1, fused.in_dim)
        n = rows.shape[0]
        outs = [np.empty((n, w), np.float32) for w in widths]
        pointers = (ctypes.c_void_p * len(outs))(*[address(o) for o in outs])
        c_widths = (ctypes.c_int * len(widths))(*widths)
        _check(self.lib.ops_linear_split(fused.ref, address(rows), n, pointers, c_widths,
                                         len(widths), self.threads))
        return outs

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        dim = x.shape[-1]
        self.lib.ops_rms_norm(address(x), x.size // dim, dim, address(weight), eps,
                              address(out), self.threads)
        return out

    def layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                   eps: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        dim = x.shape[-1]
        self.lib.ops_layer_norm(address(x), x.size // dim, dim, address(weight),
                                None if bias is None else address(bias), eps,
                                address(out), self.threads)
        return out

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rot_dims: int,
             traditional: bool) -> np.ndarray:
        """Rotate x [N, heads, head_dim] (a copy unless x is already a fresh
        contiguous float32 array, which is rotated in place)."""
        x = _f32(x)
        n, heads, head_dim = x.shape
        self.lib.ops_rope(address(x), n, heads, head_dim, rot_dims, address(cos),
                          address(sin), int(traditional), self.threads)
        return x

    def act_mul(self, kind: str, g: np.ndarray, u: np.ndarray | None = None) -> np.ndarray:
        """act(g) * u (or act(g)), computed into g's buffer when g is
        contiguous float32."""
        g = _f32(g)
        if u is not None:
            u = _f32(u)
            if u.shape != g.shape:
                raise ValueError(f"gate {g.shape} and up {u.shape} differ")
        _check(self.lib.ops_act_mul(address(g), None if u is None else address(u),
                                    g.size, ACTIVATION_KINDS[kind], self.threads))
        return g

    def encoder_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: int,
                          length: int, lengths: np.ndarray | None, scale: float, *,
                          causal: bool = False) -> np.ndarray:
        """Bidirectional attention over a right-padded batch: q [batch*length,
        heads, head_dim], k/v [batch*length, kv_heads, head_dim]; row b's first
        lengths[b] tokens (all `length` if None) see each other (`causal`: each
        sees those up to itself), padding gets zeros."""
        q, k, v = _f32(q), _f32(k), _f32(v)
        n, heads, head_dim = q.shape
        if n != batch * length or k.shape != v.shape or k.shape[0] != n \
                or k.shape[2] != head_dim:
            raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                             f"{batch} rows of {length}")
        if lengths is not None:
            lengths = np.ascontiguousarray(lengths, dtype=np.int32)
            if lengths.shape != (batch,):
                raise ValueError(f"lengths {lengths.shape} for {batch} rows")
        out = np.empty_like(q)
        rc = self.lib.ops_encoder_attention(
            address(q), address(k), address(v), address(out), batch, length,
            None if lengths is None else address(lengths), heads, k.shape[1], head_dim,
            scale, int(causal), self.threads)
        if rc == -2:
            raise ValueError(f"encoder attention: {heads} heads over {k.shape[1]} KV heads "
                             f"of {head_dim} dims")
        _check(rc)
        return out


def _check(rc: int) -> None:
    if rc == -3:
        raise RuntimeError("CPU kernel: no BLAS was handed to the native library")
    if rc != 0:
        raise MemoryError("CPU kernel: no scratch memory")


@functools.lru_cache(maxsize=4)
def load(threads: int | None = None) -> CpuOps | None:
    """The CPU operations of the native library (engine/platform/native.py),
    or None where it is missing or has no BLAS for float32 matmuls; their
    OpenMP loops use `threads` threads (default: every core)."""
    from engine.platform import blas, native

    lib = native.library()
    if lib is None or blas.sgemm_address() is None:
        return None
    return CpuOps(lib, threads or os.cpu_count() or 1)
