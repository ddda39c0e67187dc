"""Paged K/V storage in MLX, and the per-layer view attention layers see.

Each layer keeps one K and one V pool with a row per (token slot, KV head):
[num_slots * n_kv_heads, head_dim], `num_slots = (num_blocks + 1) *
block_size`; the extra block at the end is scratch space that padding tokens
write into. How a step's keys/values get into the pools and how each
sequence attends over its blocks is the attention backend's business
(kvcache/attention/, one file per backend, chosen by the platform).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import AttentionSpec
from kvcache.attention.portable import PortableAttention


class PagedKVCache:
    """The pools of every layer, served by one attention backend."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: mx.Dtype = mx.float32,
                 backend: AttentionBackend | None = None):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        shape = ((num_blocks + 1) * block_size * n_kv_heads, head_dim)
        self.k = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.v = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        mx.eval(self.k, self.v)
        if backend is None:  # the reference path, which needs no query-head count
            backend = PortableAttention(AttentionSpec(n_kv_heads, n_kv_heads, head_dim,
                                                      block_size, dtype))
        self.backend = backend
        backend.bind(self)

    @property
    def scratch_block(self) -> int:
        return self.num_blocks

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                        dtype: mx.Dtype) -> int:
        return 2 * num_layers * block_size * n_kv_heads * head_dim * dtype.size

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def views(self, meta: Any) -> list[PagedLayerView]:
        """One view per layer over the backend's metadata for this step."""
        return [PagedLayerView(self, i, meta) for i in range(self.num_layers)]

    def write(self, layer: int, rows: mx.array, k: mx.array, v: mx.array) -> None:
        """Store k, v [N, kv_heads, head_dim] at pool `rows` [N * kv_heads] with
        an MLX scatter. On the CPU it updates the pool in place (the old array
        has no other owner); on CUDA it copies the whole pool (measured on an
        H100: ~0.7 ms a write into a 1 GiB pool, the cost of a full copy)."""
        d = self.head_dim
        self.k[layer][rows] = k.reshape(-1, d).astype(self.dtype)
        self.v[layer][rows] = v.reshape(-1, d).astype(self.dtype)


class PagedLayerView:
    """What one attention layer sees: the same small interface as a
    contiguous cache, `attend(q, k, v, scale, window, softcap)` on packed
    [N, heads, dim] (models/layers/attention.py says what the options mean)."""

    def __init__(self, cache: PagedKVCache, layer: int, meta: Any):
        self.cache, self.layer, self.meta = cache, layer, meta

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        """Store this step's k, v and attend q over each sequence's context."""
        return self.cache.backend.attend(self, q, k, v, scale, window, softcap)

    def packs_qkv(self, rope) -> bool:
        """Whether `attend_packed` serves a layer with this RoPE (or None)."""
        return self.cache.backend.packs_qkv(rope)

    def attend_packed(self, qkv: mx.array, heads: int, rope, positions: mx.array,
                      scale: float, window: int | None = None,
                      softcap: float | None = None) -> mx.array:
        """`attend` from a fused q/k/v projection [N, (heads + 2 kv_heads) D]
        as the matmul left it, RoPE applied by the backend: [N, heads, D]."""
        return self.cache.backend.attend_packed(self, qkv, heads, rope, positions, scale,
                                                window, softcap)

    def attend_host(self, q, k, v, scale: float, window: int | None = None,
                    softcap: float | None = None):
        """`attend` on host float32 numpy arrays, for a forward that runs
        outside MLX (backends with `host_attention` only): q [N, heads, D],
        k/v [N, kv_heads, D]."""
        return self.cache.backend.attend_host(self, q, k, v, scale, window, softcap)
