"""Attention math in MLX, with the two per-layer options some architectures
add: a sliding window (a query sees only its `window` latest keys, itself
included) and soft-capping of the scores (`cap * tanh(scores / cap)`, Gemma 2).

The portable backend and attention without a cache both go through here, so
there is one reference for every kernel to match. MLX's fused SDPA has no
soft-capping: capped layers run the scores out explicitly, as mlx-lm's Gemma 2
does (scaled queries, scores, cap, mask, precise softmax).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
              softcap: float | None = None) -> mx.array:
    """q [B, H, L, D], k/v [B, Hkv, S, D] (H a multiple of Hkv), mask bool
    (True: attend) broadcastable to [B, H, L, S]; returns [B, H, L, D]."""
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    b, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    # Query heads grouped under their KV head: [B, Hkv, G, L, D].
    qg = (q * mx.array(scale, q.dtype)).reshape(b, kv_heads, heads // kv_heads, length, dim)
    scores = qg @ k[:, :, None].swapaxes(-1, -2)
    scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.ndim == 4:  # [B, 1 or H, L, S] -> [B, 1 or Hkv, 1 or G, L, S]
            per_head = mask.shape[1] != 1
            mask = mask.reshape(mask.shape[0], kv_heads if per_head else 1, -1, *mask.shape[2:])
        scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    weights = mx.softmax(scores, axis=-1, precise=True)
    return (weights @ v[:, :, None]).reshape(b, heads, length, dim)


def key_mask(key_positions: np.ndarray, query_positions: np.ndarray,
             window: int | None) -> np.ndarray:
    """Which keys each query attends (numpy, broadcasting): keys at or before
    the query, and with a window only its `window` latest."""
    keep = key_positions <= query_positions
    if window is not None:
        keep &= key_positions > query_positions - window
    return keep


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                     window: int | None = None, softcap: float | None = None) -> mx.array:
    """Attention of a sequence's tokens over themselves: [N, heads, head_dim]
    for one sequence (no cache given: a whole prompt, tests, oracles), or
    [B, N, heads, head_dim] for B sequences of N tokens each (fresh prompt
    chunks on CUDA, kvcache/attention/dense_prefill.py)."""
    one = q.ndim == 3
    q, k, v = (a[None] if one else a for a in (q, k, v))
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    if window is None and softcap is None:
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    else:
        positions = np.arange(q.shape[2])
        mask = mx.array(key_mask(positions[None, :], positions[:, None], window))
        out = attention(q, k, v, scale, mask, softcap)
    out = out.transpose(0, 2, 1, 3)
    return out[0] if one else out
