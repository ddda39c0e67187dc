"""Fresh prompt chunks through MLX's fused causal attention on the CUDA backend.

A prompt chunk that starts a sequence (no cached context) attends only to its
own tokens, so its attention is plain causal attention over this step's q/k/v.
The paged kernel (cuda.py) serves one query token a thread block and scores
keys on CUDA cores, so its cost grows with the square of a chunk: one
Llama-8B layer over a 8192-token chunk took 33 ms in it on an H200 against
1.9 ms here (a 16 x 4096-token prefill ran 4.7x faster end to end,
bench/results/h200_s7_long_prompts.log). Here such chunks are gathered into
dense [chunks, heads, length, dim] batches (one per power-of-two length,
padded at the end: a padded key sits after every real query, so the causal
mask hides it), attended there, and their rows taken back; the kernel still
stores their K/V in place and skips their attention. Chunks that continue a
context (chunked prefill, prefix-cache hits) and decode rows stay in the
kernel: their keys live in the pools. So do chunks longer than a model's
shortest sliding window, and every row of a model that caps its scores
(MLX's fused attention has neither a window nor a cap).

Only the step's own q/k/v are re-laid out; no context is gathered from the pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvcache.attention.sdpa import causal_attention

# A chunk shorter than this stays in the kernel. One 8B layer on an H200, the
# kernel alone against kernel (storing) + dense (h200_s7_dense_attention.log):
# 64 x 128 tokens 925 vs 1,372 us, 16 x 512 2,368 vs 1,108, 4 x 2048 8,518 vs
# 1,280, 1 x 8192 33,072 vs 1,880. The kernel grows with the square of a chunk
# (~0.9 ns x length^2), the dense path with its tokens (~0.16 us each: the
# gathers and the merge), so they cross near 180 tokens; above that, ~10 more
# launches a layer (~150 us of host time) argue for a margin.
# The choice is made per chunk, on its own length only: a request's numerics
# then do not depend on what else is in its step (seeded sampling alone ==
# batched), as the kernel's per-row arithmetic does not either.
MIN_CHUNK = 256


@dataclass
class DenseGroup:
    """Chunks of one padded length, attended as one dense batch."""

    rows: mx.array       # [chunks * length] packed row of each dense slot
    positions: mx.array  # [chunks * length] its position (0 .. length - 1 per chunk)
    chunks: int
    length: int


@dataclass
class DensePrefill:
    """Which packed rows dense attention answers, and where their results are."""

    groups: list[DenseGroup]
    dense: mx.array  # [N] bool: the row's attention comes from a group
    at: mx.array     # [N] the row's index in the groups' concatenated outputs
    rows: np.ndarray  # packed rows the kernel must only store (host copy)
    longest: int     # tokens of the longest chunk answered here


def plan(query_start: np.ndarray, context_lens: np.ndarray, num_decode: int, n: int,
         max_chunk: int | None = None) -> DensePrefill | None:
    """The step's dense batches, or None where the kernel should attend all.
    Chunks longer than `max_chunk` stay in the kernel (a model's shortest
    sliding window: within it, causal attention is the windowed one)."""
    lens = np.diff(query_start)
    fresh = [c for c in range(num_decode, len(lens))
             if MIN_CHUNK <= lens[c] <= (max_chunk or lens[c]) and context_lens[c] == lens[c]]
    if not fresh:
        return None
    by_length: dict[int, list[int]] = {}
    for c in fresh:
        by_length.setdefault(1 << (int(lens[c]) - 1).bit_length(), []).append(c)
    groups, dense_rows = [], []
    at = np.zeros(n, np.int32)
    base = 0
    for length, chunks in sorted(by_length.items()):
        offsets = np.arange(length)
        rows = np.empty((len(chunks), length), np.int32)
        for j, c in enumerate(chunks):
            start, size = int(query_start[c]), int(lens[c])
            # Padding slots repeat the chunk's first row: after every real query,
            # so never seen by one, and their own outputs are dropped.
            rows[j] = start + np.where(offsets < size, offsets, 0)
            at[start:start + size] = base + j * length + offsets[:size]
            dense_rows.append(np.arange(start, start + size))
        groups.append(DenseGroup(mx.array(rows.reshape(-1)),
                                 mx.array(np.tile(offsets, len(chunks)).astype(np.int32)),
                                 len(chunks), length))
        base += len(chunks) * length
    answered = np.concatenate(dense_rows)
    dense = np.zeros(n, bool)
    dense[answered] = True
    return DensePrefill(groups, mx.array(dense), mx.array(at), answered,
                        max(int(lens[c]) for c in fresh))


def attend(plan: DensePrefill, kernel_out: mx.array, q: mx.array, k: mx.array, v: mx.array,
           scale: float, rope=None) -> mx.array:
    """kernel_out [N, heads, D] with the dense rows' attention put in; q, k, v
    are the step's packed rows ([N, heads or kv_heads, D]), rotated here by
    `rope` at each dense slot's position when given."""
    parts = []
    for group in plan.groups:
        qg, kg, vg = q[group.rows], k[group.rows], v[group.rows]
        if rope is not None:
            qg, kg = rope(qg, group.positions), rope(kg, group.positions)
        out = causal_attention(*(x.reshape(group.chunks, group.length, *x.shape[1:])
                                 for x in (qg, kg, vg)), scale)
        parts.append(out.reshape(-1, *out.shape[2:]))
    dense = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return mx.where(plan.dense[:, None, None], dense[plan.at].astype(kernel_out.dtype),
                    kernel_out)
