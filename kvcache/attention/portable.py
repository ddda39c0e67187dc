"""The reference attention backend, pure MLX: K/V written by scatter, each
sequence's context gathered from the pools, then MLX's SDPA.

Rows are gathered straight into [rows, n_kv_heads, context, head_dim], the
layout attention wants: measured on the CPU, gathering 256-byte rows was ~8x
faster than gathering whole blocks, and attention on a transposed gather
~10x slower. Decode rows attend with one batched call over [rows, 1,
context]; prefill chunks are padded into [rows, T] and masked causally by
absolute position, so a prompt split into chunks attends exactly as it would
in one piece. Runs on every device; the fast backends are compared to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvcache.attention.backend import AttentionBackend
from kvcache.attention.metadata import CommonAttentionMetadata, bucket, head_rows


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


class PortableAttention(AttentionBackend):
    name = "portable"
    metadata_class = PortableMetadata

    def build(self, common: CommonAttentionMetadata) -> PortableMetadata:
        meta = self._common_part(common)
        nd = common.num_decode
        if nd:
            ctx = common.context_lens[:nd]
            slots = common.context_slots(0, nd)
            meta.decode_rows = mx.array(head_rows(slots, self.spec.num_kv_heads).astype(np.int32))
            mask = np.arange(slots.shape[1])[None, :] < ctx[:, None]
            meta.decode_mask = mx.array(mask[:, None, None, :])
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

    def attend(self, view, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        meta, cache = view.meta, view.cache
        cache.write(view.layer, meta.write_rows, k, v)
        outs = []
        if meta.num_decode:
            qd = q[:meta.num_decode][:, :, None, :]                     # [Bd, H, 1, D]
            kd = cache.k[view.layer][meta.decode_rows]                  # [Bd, Hkv, Ld, D]
            vd = cache.v[view.layer][meta.decode_rows]
            od = mx.fast.scaled_dot_product_attention(
                qd, kd.astype(q.dtype), vd.astype(q.dtype), scale=scale, mask=meta.decode_mask)
            outs.append(od[:, :, 0, :])
        return attend_prompts(view, q, scale, outs)


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
    mask = np.arange(slots.shape[1])[None, None, :] <= qpos[:, :, None]
    unpad = np.concatenate([r * t_max + np.arange(n) for r, n in enumerate(lengths)])
    meta.prefill_gather = mx.array(gather.astype(np.int32))
    meta.prefill_rows = mx.array(head_rows(slots, n_kv_heads).astype(np.int32))
    meta.prefill_mask = mx.array(mask[:, None, :, :])
    meta.prefill_unpad = mx.array(unpad.astype(np.int32))


def attend_prompts(view, q: mx.array, scale: float, outs: list[mx.array]) -> mx.array:
    """Append the prompt chunks' attention (gather + SDPA) and the padding
    rows' zeros to the decode rows' output `outs`: [N, heads, D]."""
    meta, cache = view.meta, view.cache
    if meta.num_prefill_tokens:
        qp = q[meta.prefill_gather].transpose(0, 2, 1, 3)               # [Bp, H, Tp, D]
        kp = cache.k[view.layer][meta.prefill_rows]
        vp = cache.v[view.layer][meta.prefill_rows]
        op = mx.fast.scaled_dot_product_attention(
            qp, kp.astype(q.dtype), vp.astype(q.dtype), scale=scale, mask=meta.prefill_mask)
        op = op.transpose(0, 2, 1, 3).reshape(-1, q.shape[1], q.shape[2])
        outs.append(op[meta.prefill_unpad])
    if meta.num_padding:
        outs.append(mx.zeros((meta.num_padding, q.shape[1], q.shape[2]), q.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
