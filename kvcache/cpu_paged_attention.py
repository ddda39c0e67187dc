"""Paged attention on the CPU through a small C kernel (cpu_paged_attention.c).

MLX's CPU backend has no way to add a kernel, and its portable path gathers
every sequence's K/V rows into a new array, then runs attention whose exp is
evaluated one scalar at a time: at 64 decode rows of the default model that
was ~9 ms of a layer against ~5 ms for all its matmuls. The kernel reads K/V
rows in place from the pools through numpy views of the MLX arrays and
vectorises the dot products and the exp.

The kernel keeps its own layout in the pools' memory: keys transposed per
block, [blocks, kv_heads, head_dim, block_size], so one query's scores over a
block are head_dim vector FMAs; values [blocks, kv_heads, block_size, head_dim].

It is part of the native library built at install (engine/platform/native.py),
with head_dim, block size and K/V dtype as arguments (the common shapes run
copies of the loops specialised for them); where there is no library, the
portable MLX path runs.
"""

from __future__ import annotations

import ctypes

import numpy as np

_I32 = ctypes.POINTER(ctypes.c_int32)
_I64 = ctypes.POINTER(ctypes.c_int64)
_F32 = ctypes.POINTER(ctypes.c_float)
KV_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class CpuPagedAttention:
    """Callable over numpy arrays; see cpu_paged_attention.c for layouts."""

    def __init__(self, library: ctypes.CDLL, head_dim: int, block_size: int, threads: int,
                 kv_dtype=np.float32):
        """`library`: the native kernels (engine.platform.native.library()).
        ValueError if the kernel doesn't take this shape or K/V dtype."""
        self.head_dim, self.block_size, self.threads = head_dim, block_size, threads
        self.kv_dtype = np.dtype(kv_dtype)
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"K/V must be float32 or float16, not {self.kv_dtype}")
        if not library.paged_attention_supports(head_dim, block_size):
            raise ValueError(f"no CPU attention kernel for head_dim {head_dim}, "
                             f"block size {block_size}")
        self.specialised = bool(library.paged_attention_specialised(
            head_dim, block_size, int(self.kv_dtype == np.float16)))
        self._fn = library.paged_attention
        self._fn.restype = ctypes.c_int
        pool = ctypes.c_void_p
        self._fn.argtypes = [pool, pool, _F32, _F32, _I64, ctypes.c_int, _F32, _I32, _I32, _I32,
                             _F32] + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int]

    def pool_views(self, k_pool: np.ndarray, v_pool: np.ndarray, kv_heads: int):
        """The kernel's [blocks, kv_heads, ...] views of two flat pools."""
        for pool in (k_pool, v_pool):
            if pool.dtype != self.kv_dtype or not pool.flags.c_contiguous:
                raise ValueError(f"K/V pools must be contiguous {self.kv_dtype}")
        d, bs = self.head_dim, self.block_size
        blocks = k_pool.size // (kv_heads * d * bs)
        return (k_pool.reshape(blocks, kv_heads, d, bs),
                v_pool.reshape(blocks, kv_heads, bs, d))

    def write(self, k_view: np.ndarray, v_view: np.ndarray, slots: np.ndarray,
              k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [N, kv_heads, head_dim] at token `slots` [N]."""
        self(None, k_view, v_view, np.zeros((1, 1), np.int32), np.zeros(0, np.int32),
             np.zeros(0, np.int32), 1.0, k_new=k, v_new=v, slots=slots)

    def __call__(self, q: np.ndarray | None, k_view: np.ndarray, v_view: np.ndarray,
                 tables: np.ndarray, qrow: np.ndarray, ctx: np.ndarray, scale: float,
                 k_new: np.ndarray | None = None, v_new: np.ndarray | None = None,
                 slots: np.ndarray | None = None) -> np.ndarray:
        """Write k_new, v_new [M, kv_heads, head_dim] at token `slots` [M] (if
        given), then attend q [N, heads, head_dim]: query i sees the first
        ctx[i] slots of block table tables[qrow[i]] (tables [T, width], int32).
        Returns [N, heads, head_dim] float32."""
        kv_heads, d = k_view.shape[1], self.head_dim
        if q is None:
            q = np.zeros((0, kv_heads, d), np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        n, heads, qd = q.shape
        if qd != d:
            raise ValueError(f"kernel set up for head_dim {d}, got {qd}")
        if k_new is None:
            k_new = v_new = np.zeros((0, kv_heads, d), np.float32)
            slots = np.zeros(0, np.int64)
        k_new = np.ascontiguousarray(k_new, dtype=np.float32)
        v_new = np.ascontiguousarray(v_new, dtype=np.float32)
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        m = len(slots)
        if k_new.shape != (m, kv_heads, d) or v_new.shape != k_new.shape:
            raise ValueError(f"new K/V of shape {k_new.shape} do not fit the pools")
        if m and (slots.min() < 0 or slots.max() >= k_view.shape[0] * self.block_size):
            raise ValueError("slots out of the pools' range")
        tables = np.ascontiguousarray(tables, dtype=np.int32)
        qrow = np.ascontiguousarray(qrow, dtype=np.int32)
        ctx = np.ascontiguousarray(ctx, dtype=np.int32)
        out = np.empty_like(q)
        if k_view.dtype != self.kv_dtype or v_view.dtype != self.kv_dtype:
            raise ValueError(f"K/V pools must be {self.kv_dtype}")
        rc = self._fn(k_view.ctypes.data, v_view.ctypes.data, _ptr(k_new, _F32),
                      _ptr(v_new, _F32), _ptr(slots, _I64), m, _ptr(q, _F32),
                      _ptr(tables, _I32), _ptr(qrow, _I32), _ptr(ctx, _I32), _ptr(out, _F32),
                      n, tables.shape[1], heads, kv_heads, d, self.block_size,
                      int(self.kv_dtype == np.float16), scale, self.threads)
        if rc != 0:
            raise RuntimeError("cpu paged attention: bad arguments or out of memory")
        return out


def _ptr(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)
