"""Paged K/V storage in MLX and attention over each sequence's blocks.

Each layer keeps one K and one V pool with a row per (token slot, KV head):
[num_slots * n_kv_heads, head_dim], `num_slots = (num_blocks + 1) *
block_size`; the extra block at the end is scratch space that padding tokens
write into. A step writes its new keys/values by slot mapping, then each
sequence attends over the slots its block table names. Rows are gathered
straight into [rows, n_kv_heads, context, head_dim], the layout attention
wants: measured on the CPU, gathering 256-byte rows was ~8x faster than
gathering whole blocks, and attention on a transposed gather ~10x slower.

Tokens of a step are packed: first the decode rows (one query token each),
then the prefill chunks, then padding. Decode rows attend with one batched
call over [rows, 1, context]; prefill chunks are padded into [rows, T] and
masked causally by absolute position, so a prompt split into chunks attends
exactly as it would in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class AttentionMetadata:
    """Per-step arrays shared by every layer (built by the model runner)."""

    write_rows: mx.array | None = None  # [N * Hkv] pool rows of each packed token's K/V
    num_decode: int = 0               # decode rows = first num_decode tokens
    num_prefill_tokens: int = 0
    num_padding: int = 0
    # Decode rows, portable path:
    decode_rows: mx.array | None = None   # [Bd, Hkv, Ld] pool rows of each row's keys
    decode_mask: mx.array | None = None   # [Bd, 1, 1, Ld] key is inside the context
    # Decode rows, in-place CUDA kernel:
    decode_block_tables: mx.array | None = None  # [Bd, W]
    decode_context_lens: mx.array | None = None  # [Bd]
    # Prefill chunks:
    prefill_gather: mx.array | None = None  # [Bp, Tp] packed index of each chunk token
    prefill_rows: mx.array | None = None    # [Bp, Hkv, Lp]
    prefill_mask: mx.array | None = None    # [Bp, 1, Tp, Lp] key position <= query position
    prefill_unpad: mx.array | None = None   # [Np] index into the flattened [Bp*Tp] output
    # Every packed token, CPU kernel (host arrays): token i attends to the first
    # host_context[i] slots of block table host_tables[host_table_of[i]].
    host_write_slots: np.ndarray | None = None  # [N] token slot of each packed token
    host_tables: np.ndarray | None = None      # [chunks, W]
    host_table_of: np.ndarray | None = None    # [N]
    host_context: np.ndarray | None = None     # [N]; 0 for padding


def _cuda_kernel_available() -> bool:
    from kvcache import cuda_paged_attention

    return cuda_paged_attention.available()


def paged_decode_attention(*args, **kwargs):
    from kvcache.cuda_paged_attention import paged_decode_attention as kernel

    return kernel(*args, **kwargs)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: mx.Dtype = mx.float32, cpu_attention=None,
                 cuda_kernel: bool = True):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = ((num_blocks + 1) * block_size * n_kv_heads, head_dim)
        self.k = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.v = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        mx.eval(self.k, self.v)
        # On CUDA, decode attention reads the pools in place (once verified).
        self.decode_kernel = cuda_kernel and _cuda_kernel_available()
        # On the CPU, a C kernel (cpu_paged_attention) reads and writes the
        # pools in place, in its own layout, through numpy views of the same
        # memory; the MLX arrays are then never written by MLX.
        self.cpu_attention = None
        if (cpu_attention is not None and mx.default_device() == mx.cpu
                and host_dtype(dtype) == cpu_attention.kv_dtype):
            views = [cpu_attention.pool_views(_host_view(k), _host_view(v), n_kv_heads)
                     for k, v in zip(self.k, self.v)]
            self.k_host = [k for k, _ in views]
            self.v_host = [v for _, v in views]
            self.cpu_attention = cpu_attention

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    def head_rows(self, slots: np.ndarray) -> np.ndarray:
        """Pool rows of token slots [..., L]: [N] -> [N * Hkv] for writes,
        [B, L] -> [B, Hkv, L] for reads."""
        heads = np.arange(self.n_kv_heads)
        if slots.ndim == 1:
            return (slots[:, None] * self.n_kv_heads + heads).reshape(-1)
        return slots[:, None, :] * self.n_kv_heads + heads[None, :, None]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype: mx.Dtype) -> int:
        return 2 * num_layers * block_size * n_kv_heads * head_dim * dtype.size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def views(self, meta: AttentionMetadata) -> list[PagedLayerView]:
        return [PagedLayerView(self, i, meta) for i in range(self.num_layers)]

    def write(self, layer: int, rows: mx.array, k: mx.array, v: mx.array) -> None:
        # On the CPU these scatters update the pool in place (the old array has
        # no other owner); see DESIGN.md for what CUDA does instead.
        d = self.head_dim
        self.k[layer][rows] = k.reshape(-1, d).astype(self.dtype)
        self.v[layer][rows] = v.reshape(-1, d).astype(self.dtype)


def host_dtype(dtype: mx.Dtype) -> np.dtype | None:
    """The numpy dtype the CPU kernel's pools have for K/V stored as `dtype`,
    or None where it has none (numpy has no bfloat16)."""
    return {mx.float32: np.dtype(np.float32), mx.float16: np.dtype(np.float16)}.get(dtype)


def _host_view(pool: mx.array) -> np.ndarray:
    view = np.asarray(pool)
    if not (view.flags.writeable and view.flags.c_contiguous):
        raise RuntimeError("paged cache: pool memory is not a writable contiguous buffer")
    return view


class PagedLayerView:
    """What one attention layer sees: the same small interface as a
    contiguous cache, `attend(q, k, v, scale)` on packed [N, heads, dim]."""

    def __init__(self, cache: PagedKVCache, layer: int, meta: AttentionMetadata):
        self.cache, self.layer, self.meta = cache, layer, meta

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        meta, cache = self.meta, self.cache
        if meta.host_tables is not None:
            return self._attend_host(q, k, v, scale)
        nd = meta.num_decode
        in_kernel = nd and meta.decode_block_tables is not None
        if not in_kernel:
            cache.write(self.layer, meta.write_rows, k, v)
        elif nd < k.shape[0]:
            # Decode rows store their K/V inside the kernel; the rest (prompt
            # chunks, padding) through MLX first, so the kernel gets the live pools.
            cache.write(self.layer, meta.write_rows[nd * cache.n_kv_heads:], k[nd:], v[nd:])
        k_pool, v_pool = cache.k[self.layer], cache.v[self.layer]
        outs = []
        if in_kernel:
            od = paged_decode_attention(
                q[:nd].astype(cache.dtype), k_pool, v_pool, k[:nd], v[:nd],
                meta.decode_block_tables, meta.decode_context_lens, scale, cache.block_size,
                cache.n_kv_heads)
            outs.append(od.astype(q.dtype))
        elif meta.num_decode:
            qd = q[:meta.num_decode][:, :, None, :]                    # [Bd, H, 1, D]
            kd = k_pool[meta.decode_rows]                               # [Bd, Hkv, Ld, D]
            vd = v_pool[meta.decode_rows]
            od = mx.fast.scaled_dot_product_attention(
                qd, kd.astype(q.dtype), vd.astype(q.dtype), scale=scale, mask=meta.decode_mask)
            outs.append(od[:, :, 0, :])
        if meta.num_prefill_tokens:
            qp = q[meta.prefill_gather].transpose(0, 2, 1, 3)           # [Bp, H, Tp, D]
            kp = k_pool[meta.prefill_rows]
            vp = v_pool[meta.prefill_rows]
            op = mx.fast.scaled_dot_product_attention(
                qp, kp.astype(q.dtype), vp.astype(q.dtype), scale=scale, mask=meta.prefill_mask)
            op = op.transpose(0, 2, 1, 3).reshape(-1, q.shape[1], q.shape[2])
            outs.append(op[meta.prefill_unpad])
        if meta.num_padding:
            outs.append(mx.zeros((meta.num_padding, q.shape[1], q.shape[2]), q.dtype))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)

    def _attend_host(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        # The kernel runs outside MLX's graph: evaluate this layer's q/k/v, write
        # K/V into the pools and attend in place, hand the result back to MLX.
        # The kernel computes in float32 (numpy has no bfloat16).
        dtype = q.dtype
        q, k, v = (a.astype(mx.float32) for a in (q, k, v))
        mx.eval(q, k, v)
        out = self.attend_host(np.asarray(q), np.asarray(k), np.asarray(v), scale)
        return mx.array(out).astype(dtype)

    def attend_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    scale: float) -> np.ndarray:
        """`attend` on host float32 arrays through the CPU kernel (for a
        forward that runs outside MLX): q [N, heads, D], k/v [N, kv_heads, D]."""
        meta, cache, layer = self.meta, self.cache, self.layer
        return cache.cpu_attention(
            q, cache.k_host[layer], cache.v_host[layer], meta.host_tables,
            meta.host_table_of, meta.host_context, scale, k_new=k, v_new=v,
            slots=meta.host_write_slots)
