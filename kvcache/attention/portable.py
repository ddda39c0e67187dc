"""The reference attention backend, pure MLX: K/V written by scatter, each
sequence's context gathered from the pools, then MLX's SDPA.

Rows are gathered straight into [rows, n_kv_heads, context, head_dim], the
layout attention wants: measured on the CPU, gathering 256-byte rows was ~8x
faster than gathering whole blocks, and attention on a transposed gather
~10x slower. Decode rows attend with one batched call over [rows, 1,
context]; prefill chunks are padded into [rows, T] and masked causally by
absolute position, so a prompt split into chunks attends exactly as it would
in one piece. A layer with a sliding window gets masks that also drop the
keys before its window (built once a step per window, on first use), and a
soft-capped layer runs the explicit form of SDPA (sdpa.py). Runs on every
device; the fast backends are compared to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import CommonAttentionMetadata, bucket, head_rows
from kvcache.attention.sdpa import attention, key_mask


@dataclass
class PortableMetadata:
    """Per-step arrays for the gather + SDPA path."""

    write_rows: mx.array | None  # [N * Hkv] pool rows of each packed token's K/V
    num_decode: int = 0          # decode rows = first num_decode tokens
    num_prefill_tokens: int = 0
    num_padding: int = 0
    decode_rows: mx.array | None = None     # [Bd, Hkv, Ld] pool rows of each row's keys
    decode_mask: mx.array | None = None     # [Bd, 1, 1, Ld] key is inside the context
    prefill_gather: mx.array | None = None  # [Bp, Tp] packed index of each chunk token
    prefill_rows: mx.array | None = None    # [Bp, Hkv, Lp]
    prefill_mask: mx.array | None = None    # [Bp, 1, Tp, Lp] key position <= query position
    prefill_unpad: mx.array | None = None   # [Np] index into the flattened [Bp*Tp] output
    # Query positions ([Bd, 1, 1] and [Bp, Tp, 1]) for the masks of sliding
    # windows, made on a layer's first use: (part, window) -> mask.
    query_positions: dict = field(default_factory=dict)
    windowed: dict = field(default_factory=dict)

    def mask(self, part: str, window: int | None) -> mx.array:
        """Which gathered keys each query of `part` ("decode" or "prefill")
        attends: its context up to its own position, and with a window only
        its `window` latest keys."""
        full = self.decode_mask if part == "decode" else self.prefill_mask
        if window is None:
            return full
        if (part, window) not in self.windowed:
            keys, queries = np.arange(full.shape[-1]), self.query_positions[part]
            self.windowed[part, window] = mx.array(key_mask(keys, queries, window)[:, None])
        return self.windowed[part, window]


class PortableAttention(AttentionBackend):
    name = "portable"
    metadata_class = PortableMetadata

    def build(self, common: CommonAttentionMetadata) -> PortableMetadata:
        meta = self._common_part(common)
        nd = common.num_decode
        if nd:
            slots = common.context_slots(0, nd)
            meta.decode_rows = mx.array(head_rows(slots, self.spec.num_kv_heads).astype(np.int32))
            last = common.context_lens[:nd, None, None] - 1
            meta.decode_mask = mx.array(key_mask(np.arange(slots.shape[1]), last, None)[:, None])
            meta.query_positions["decode"] = last
        return meta

    def _common_part(self, common: CommonAttentionMetadata) -> PortableMetadata:
        """Write rows, counts and the prompt chunks' arrays: the part of the
        metadata every MLX backend shares."""
        rows = head_rows(common.slots, self.spec.num_kv_heads).astype(np.int32)
        meta = self.metadata_class(mx.array(rows), common.num_decode,
                                   common.num_prefill_tokens, common.num_padding)
        if common.num_prefill_tokens:
            _build_prefill(meta, common, self.spec.num_kv_heads)
        return meta

    def attend(self, view, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        meta, cache = view.meta, view.cache
        cache.write(view.layer, meta.write_rows, k, v)
        outs = []
        if meta.num_decode:
            qd = q[:meta.num_decode][:, :, None, :]                     # [Bd, H, 1, D]
            kd = cache.k[view.layer][meta.decode_rows]                  # [Bd, Hkv, Ld, D]
            vd = cache.v[view.layer][meta.decode_rows]
            od = attention(qd, kd.astype(q.dtype), vd.astype(q.dtype), scale,
                           meta.mask("decode", window), softcap)
            outs.append(od[:, :, 0, :])
        return attend_prompts(view, q, scale, outs, window, softcap)


def _build_prefill(meta: PortableMetadata, common: CommonAttentionMetadata,
                   n_kv_heads: int) -> None:
    nd, chunks = common.num_decode, common.num_chunks
    lengths = common.chunk_lens[nd:]
    starts = common.context_lens[nd:] - lengths
    t_max = bucket(int(lengths.max()), common.chunk_bucket)
    t = np.arange(t_max)
    # Padding query rows repeat the chunk's last token: valid, and dropped.
    t_clamped = np.minimum(t[None, :], lengths[:, None] - 1)
    gather = common.query_start[nd:chunks, None] + t_clamped
    qpos = starts[:, None] + t_clamped
    slots = common.context_slots(nd, chunks)
    unpad = np.concatenate([r * t_max + np.arange(n) for r, n in enumerate(lengths)])
    meta.prefill_gather = mx.array(gather.astype(np.int32))
    meta.prefill_rows = mx.array(head_rows(slots, n_kv_heads).astype(np.int32))
    meta.prefill_mask = mx.array(key_mask(np.arange(slots.shape[1]), qpos[:, :, None],
                                          None)[:, None])
    meta.query_positions["prefill"] = qpos[:, :, None]
    meta.prefill_unpad = mx.array(unpad.astype(np.int32))


def attend_prompts(view, q: mx.array, scale: float, outs: list[mx.array],
                   window: int | None = None, softcap: float | None = None) -> mx.array:
    """Append the prompt chunks' attention (gather + SDPA) and the padding
    rows' zeros to the decode rows' output `outs`: [N, heads, D]."""
    meta, cache = view.meta, view.cache
    if meta.num_prefill_tokens:
        qp = q[meta.prefill_gather].transpose(0, 2, 1, 3)               # [Bp, H, Tp, D]
        kp = cache.k[view.layer][meta.prefill_rows]
        vp = cache.v[view.layer][meta.prefill_rows]
        op = attention(qp, kp.astype(q.dtype), vp.astype(q.dtype), scale,
                       meta.mask("prefill", window), softcap)
        op = op.transpose(0, 2, 1, 3).reshape(-1, q.shape[1], q.shape[2])
        outs.append(op[meta.prefill_unpad])
    if meta.num_padding:
        outs.append(mx.zeros((meta.num_padding, q.shape[1], q.shape[2]), q.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
