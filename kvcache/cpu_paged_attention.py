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

The engine compiles it once per (head_dim, block_size, CPU) with the system C
compiler (engine/native.py) and loads it here with ctypes; where it can't be
built, the portable MLX path runs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
_I32 = ctypes.POINTER(ctypes.c_int32)
_F32 = ctypes.POINTER(ctypes.c_float)


def compile_args(head_dim: int, block_size: int) -> list[str]:
    """Compiler flags for a build of SOURCE (link it with an OpenMP runtime)."""
    return ["-O3", "-march=native", "-ffast-math", "-fopenmp",
            f"-DHEAD_DIM={head_dim}", f"-DBLOCK_SIZE={block_size}"]


class CpuPagedAttention:
    """Callable over numpy arrays; see cpu_paged_attention.c for layouts."""

    def __init__(self, library: Path, head_dim: int, block_size: int, threads: int):
        self.head_dim, self.block_size, self.threads = head_dim, block_size, threads
        self._fn = ctypes.CDLL(str(library)).paged_attention
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_F32, _F32, _F32, _I32, _I32, _I32, _F32] + \
            [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]

    def pool_views(self, k_pool: np.ndarray, v_pool: np.ndarray, kv_heads: int):
        """The kernel's [blocks, kv_heads, ...] views of two flat pools."""
        for pool in (k_pool, v_pool):
            if pool.dtype != np.float32 or not pool.flags.c_contiguous:
                raise ValueError("K/V pools must be contiguous float32")
        d, bs = self.head_dim, self.block_size
        blocks = k_pool.size // (kv_heads * d * bs)
        return (k_pool.reshape(blocks, kv_heads, d, bs),
                v_pool.reshape(blocks, kv_heads, bs, d))

    def write(self, k_view: np.ndarray, v_view: np.ndarray, slots: np.ndarray,
              k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [N, kv_heads, head_dim] at token `slots` [N]."""
        block, offset = np.divmod(slots, self.block_size)
        heads = np.arange(k_view.shape[1])
        k_view[block[:, None], heads, :, offset[:, None]] = k
        v_view[block[:, None], heads, offset[:, None], :] = v

    def __call__(self, q: np.ndarray, k_view: np.ndarray, v_view: np.ndarray,
                 tables: np.ndarray, qrow: np.ndarray, ctx: np.ndarray,
                 scale: float) -> np.ndarray:
        """q [N, heads, head_dim] float32; tables [T, width] int32; qrow and
        ctx [N] int32: query i attends to the first ctx[i] slots of table
        qrow[i]. Returns [N, heads, head_dim] float32."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n, heads, d = q.shape
        if d != self.head_dim:
            raise ValueError(f"kernel built for head_dim {self.head_dim}, got {d}")
        tables = np.ascontiguousarray(tables, dtype=np.int32)
        qrow = np.ascontiguousarray(qrow, dtype=np.int32)
        ctx = np.ascontiguousarray(ctx, dtype=np.int32)
        out = np.empty_like(q)
        rc = self._fn(_ptr(q, _F32), _ptr(k_view, _F32), _ptr(v_view, _F32),
                      _ptr(tables, _I32), _ptr(qrow, _I32), _ptr(ctx, _I32), _ptr(out, _F32),
                      n, tables.shape[1], heads, k_view.shape[1], scale, self.threads)
        if rc != 0:
            raise RuntimeError("cpu paged attention: bad arguments or out of memory")
        return out


def _ptr(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)
