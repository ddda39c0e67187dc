"""The CPU attention backend: a small C kernel (cpu_paged_attention.c) that
writes and reads the pools in place, through numpy views of their memory.

MLX's CPU backend has no way to add a kernel, and its portable path gathers
every sequence's K/V rows into a new array, then runs attention whose exp is
evaluated one scalar at a time: at 64 decode rows of the default model that
was ~9 ms of a layer against ~5 ms for all its matmuls. The kernel reads K/V
rows in place and vectorises the dot products and the exp.

The kernel keeps its own layout in the pools' memory: keys transposed per
block, [blocks, kv_heads, head_dim, block_size], so one query's scores over a
block are head_dim vector FMAs; values [blocks, kv_heads, block_size, head_dim].
Once bound, the MLX pool arrays are never written by MLX.

It is part of the native library built at install (engine/platform/native.py),
with head_dim, block size and K/V dtype as arguments (the common shapes run
copies of the loops specialised for them); where there is no library, the
portable MLX path runs.
The platform (engine/platform/cpu.py) picks this backend only for models
within its limits (`unsupported`); otherwise the portable backend runs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.platform.cpu_ops import address
from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec, CommonAttentionMetadata

_I32 = ctypes.POINTER(ctypes.c_int32)
_I64 = ctypes.POINTER(ctypes.c_int64)
_F32 = ctypes.POINTER(ctypes.c_float)
KV_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MAX_GROUP = 16  # query heads per KV head the kernel serves (MAX_GROUP in the C source)


@dataclass
class CpuMetadata:
    """Every packed token i attends to the first context[i] slots of block
    table tables[table_of[i]] (so prompt chunks are causal by construction)."""

    slots: np.ndarray     # [N] int64 token slot each packed token's K/V is stored at
    tables: np.ndarray    # [chunks, W] int32
    table_of: np.ndarray  # [N] int32
    context: np.ndarray   # [N] int32; 0 for padding (attends nothing)


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
        # Every array goes as its address (an int): building ctypes pointer
        # objects cost more than the kernel itself for a one-row decode step.
        ptr = ctypes.c_void_p
        self._fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, ptr,
                             ptr] + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int,
                                                          ctypes.c_float, ctypes.c_int]

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
                 slots: np.ndarray | None = None, window: int | None = None,
                 softcap: float | None = None) -> np.ndarray:
        """Write k_new, v_new [M, kv_heads, head_dim] at token `slots` [M] (if
        given), then attend q [N, heads, head_dim]: query i sees the first
        ctx[i] slots of block table tables[qrow[i]] (tables [T, width], int32),
        only the last `window` of them with a window (earlier blocks are not
        read), with scores soft-capped at `softcap` if given.
        Returns [N, heads, head_dim] float32."""
        kv_heads, d = k_view.shape[1], self.head_dim
        if q is None:
            q = np.zeros((0, kv_heads, d), np.float32)
        if k_new is None:
            k_new = v_new = np.zeros((0, kv_heads, d), np.float32)
            slots = np.zeros(0, np.int64)
        meta = self.prepare(slots, tables, qrow, ctx, k_view.shape[0])
        return self.run(meta, q, k_view, v_view, k_new, v_new, scale, window, softcap)

    def prepare(self, slots: np.ndarray, tables: np.ndarray, qrow: np.ndarray,
                ctx: np.ndarray, pool_blocks: int) -> CpuMetadata:
        """A step's arrays checked and laid out for the kernel, once for all
        layers (per layer, only q/k/v change)."""
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        if len(slots) and (slots.min() < 0 or slots.max() >= pool_blocks * self.block_size):
            raise ValueError("slots out of the pools' range")
        return CpuMetadata(slots, np.ascontiguousarray(tables, dtype=np.int32),
                           np.ascontiguousarray(qrow, dtype=np.int32),
                           np.ascontiguousarray(ctx, dtype=np.int32))

    def run(self, meta: CpuMetadata, q: np.ndarray, k_view: np.ndarray, v_view: np.ndarray,
            k_new: np.ndarray, v_new: np.ndarray, scale: float, window: int | None = None,
            softcap: float | None = None) -> np.ndarray:
        """One layer's write + attention over prepared metadata (a sliding
        window and a score cap as in __call__)."""
        kv_heads, d = k_view.shape[1], self.head_dim
        q = np.ascontiguousarray(q, dtype=np.float32)
        n, heads, qd = q.shape
        if qd != d:
            raise ValueError(f"kernel set up for head_dim {d}, got {qd}")
        k_new = np.ascontiguousarray(k_new, dtype=np.float32)
        v_new = np.ascontiguousarray(v_new, dtype=np.float32)
        m = len(meta.slots)
        if k_new.shape != (m, kv_heads, d) or v_new.shape != k_new.shape:
            raise ValueError(f"new K/V of shape {k_new.shape} do not fit the pools")
        if k_view.dtype != self.kv_dtype or v_view.dtype != self.kv_dtype:
            raise ValueError(f"K/V pools must be {self.kv_dtype}")
        out = np.empty_like(q)
        rc = self._fn(address(k_view), address(v_view), address(k_new),
                      address(v_new), address(meta.slots), m, address(q),
                      address(meta.tables), address(meta.table_of),
                      address(meta.context), address(out), n, meta.tables.shape[1], heads,
                      kv_heads, d, self.block_size, int(self.kv_dtype == np.float16), scale,
                      window or 0, softcap or 0.0,
                      self.threads)
        if rc != 0:
            raise RuntimeError("cpu paged attention: bad arguments or out of memory")
        return out


def host_dtype(dtype: mx.Dtype) -> np.dtype | None:
    """The numpy dtype the kernel's pools have for K/V stored as `dtype`, or
    None where it has none (numpy has no bfloat16)."""
    return {mx.float32: np.dtype(np.float32), mx.float16: np.dtype(np.float16)}.get(dtype)


def unsupported(spec: AttentionSpec) -> str | None:
    """Why the kernel cannot serve this attention shape, or None if it can."""
    if host_dtype(spec.kv_dtype) is None:
        return (f"the CPU attention kernel stores K/V as float32 or float16, not "
                f"{str(spec.kv_dtype).rsplit('.', 1)[-1]} (kv_cache_dtype='float16' uses it)")
    if spec.num_kv_heads <= 0 or spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads do not split evenly over {spec.num_kv_heads} KV heads"
    if spec.group > MAX_GROUP:
        return (f"the CPU attention kernel serves at most {MAX_GROUP} query heads per KV head; "
                f"this model has {spec.group}")
    return None


class CpuAttention(AttentionBackend):
    """The C kernel over host views of the pools."""

    name = "cpu"
    host_attention = True

    def __init__(self, spec: AttentionSpec, kernel: CpuPagedAttention):
        super().__init__(spec)
        self.kernel = kernel
        self.k_host: list[np.ndarray] = []
        self.v_host: list[np.ndarray] = []

    def bind(self, cache) -> None:
        for k, v in zip(cache.k, cache.v):
            k_view, v_view = self.kernel.pool_views(_host_view(k), _host_view(v),
                                                    cache.n_kv_heads)
            self.k_host.append(k_view)
            self.v_host.append(v_view)

    def build(self, common: CommonAttentionMetadata) -> CpuMetadata:
        pad = common.num_padding
        table_of = np.repeat(np.arange(common.num_chunks, dtype=np.int32), common.chunk_lens)
        context = common.positions.astype(np.int32) + 1
        context[len(context) - pad:] = 0
        return self.kernel.prepare(common.slots, common.block_tables,
                                   np.concatenate([table_of, np.zeros(pad, np.int32)]), context,
                                   self.k_host[0].shape[0] if self.k_host else 0)

    def attend(self, view, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        # The kernel runs outside MLX's graph: evaluate this layer's q/k/v, write
        # K/V into the pools and attend in place, hand the result back to MLX.
        # It computes in float32 (numpy has no bfloat16).
        dtype = q.dtype
        q, k, v = (a.astype(mx.float32) for a in (q, k, v))
        mx.eval(q, k, v)
        out = self.attend_host(view, np.asarray(q), np.asarray(k), np.asarray(v), scale,
                               window, softcap)
        return mx.array(out).astype(dtype)

    def attend_host(self, view, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    scale: float, window: int | None = None,
                    softcap: float | None = None) -> np.ndarray:
        """q [N, heads, D], k/v [N, kv_heads, D] float32 -> [N, heads, D]."""
        meta, layer = view.meta, view.layer
        return self.kernel.run(meta, q, self.k_host[layer], self.v_host[layer], k, v, scale,
                               window, softcap)


def _host_view(pool: mx.array) -> np.ndarray:
    view = np.asarray(pool)
    if not (view.flags.writeable and view.flags.c_contiguous):
        raise RuntimeError("paged cache: pool memory is not a writable contiguous buffer")
    return view
