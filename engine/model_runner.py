"""Turns a SchedulerOutput into one packed, padded batch and runs the model.

Host-side work is numpy on small int arrays; the model sees MLX arrays only.
Shapes are bucketed (token count, context width, chunk length) so a compiled
graph could be reused and so padding waste is bounded and measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from kvcache.paged_cache import AttentionMetadata, PagedKVCache
from scheduler.scheduler import ScheduledChunk, SchedulerOutput


def bucket(n: int, step: int) -> int:
    """Round n up to a multiple of `step`."""
    return -(-n // step) * step


@dataclass
class Batch:
    input_ids: mx.array       # [N] packed, padded
    positions: mx.array       # [N]
    meta: AttentionMetadata
    logits_index: mx.array    # [len(chunks)] packed index of each chunk's last token
    num_tokens: int           # real tokens
    num_padded: int           # N


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, token_bucket: int = 8, width_bucket: int = 4,
                 chunk_bucket: int = 16):
        self.model = model
        self.cache = cache
        self.bs = cache.block_size
        self.token_bucket, self.width_bucket, self.chunk_bucket = (
            token_bucket, width_bucket, chunk_bucket)
        self.real_tokens = 0
        self.padded_tokens = 0

    @property
    def padding_waste(self) -> float:
        """Share of computed token rows that were padding, over all steps."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def _slots(self, chunk: ScheduledChunk) -> np.ndarray:
        table = np.asarray(chunk.block_table, dtype=np.int64)
        pos = np.arange(chunk.start, chunk.start + chunk.num_tokens)
        return table[pos // self.bs] * self.bs + pos % self.bs

    def _context_slots(self, chunks: list[ScheduledChunk], context: int) -> np.ndarray:
        """[rows, width*bs] slots of each row's tokens 0..width*bs-1, padded
        with the scratch block past the end of its table."""
        width = bucket(-(-context // self.bs), self.width_bucket)
        tables = np.full((len(chunks), width), self.cache.num_blocks, dtype=np.int64)
        for r, c in enumerate(chunks):
            tables[r, :len(c.block_table)] = c.block_table[:width]
        slots = tables[:, :, None] * self.bs + np.arange(self.bs)
        return slots.reshape(len(chunks), width * self.bs)

    def prepare(self, out: SchedulerOutput) -> Batch:
        chunks = list(out.chunks)
        decode = [c for c in chunks if c.num_tokens == 1]
        prefill = [c for c in chunks if c.num_tokens > 1]
        ordered = decode + prefill
        ids = np.concatenate([np.asarray(c.token_ids, dtype=np.int32) for c in ordered])
        pos = np.concatenate([np.arange(c.start, c.start + c.num_tokens, dtype=np.int32)
                              for c in ordered])
        slots = np.concatenate([self._slots(c) for c in ordered])
        n = len(ids)
        padded = n if n <= self.token_bucket else bucket(n, self.token_bucket)
        pad = padded - n
        if pad:
            ids = np.concatenate([ids, np.zeros(pad, np.int32)])
            pos = np.concatenate([pos, np.zeros(pad, np.int32)])
            slots = np.concatenate([slots, np.full(pad, self.cache.scratch_slot)])
        self.real_tokens += n
        self.padded_tokens += padded

        last_index, offset = {}, 0
        for c in ordered:
            offset += c.num_tokens
            last_index[c.seq_id] = offset - 1
        logits_index = np.array([last_index[c.seq_id] for c in chunks], dtype=np.int32)

        meta = AttentionMetadata(
            write_rows=mx.array(self.cache.head_rows(slots).astype(np.int32)),
            num_decode=len(decode), decode_rows=None, decode_mask=None, num_prefill_tokens=n - len(decode),
            prefill_gather=None, prefill_rows=None, prefill_mask=None, prefill_unpad=None,
            num_padding=pad)
        if decode and self.cache.decode_kernel:
            ctx = np.array([c.start + 1 for c in decode], dtype=np.int32)
            width = bucket(-(-int(ctx.max()) // self.bs), self.width_bucket)
            tables = np.zeros((len(decode), width), dtype=np.int32)
            for r, c in enumerate(decode):
                tables[r, :len(c.block_table)] = c.block_table[:width]
            meta.decode_block_tables = mx.array(tables)
            meta.decode_context_lens = mx.array(ctx)
        elif decode:
            ctx = np.array([c.start + 1 for c in decode])
            dslots = self._context_slots(decode, int(ctx.max()))
            meta.decode_rows = mx.array(self.cache.head_rows(dslots).astype(np.int32))
            mask = np.arange(dslots.shape[1])[None, :] < ctx[:, None]
            meta.decode_mask = mx.array(mask[:, None, None, :])
        if prefill:
            self._prepare_prefill(meta, prefill, len(decode))
        return Batch(mx.array(ids), mx.array(pos), meta, mx.array(logits_index), n, padded)

    def _prepare_prefill(self, meta: AttentionMetadata, prefill: list[ScheduledChunk],
                         first: int) -> None:
        lengths = np.array([c.num_tokens for c in prefill])
        starts = np.array([c.start for c in prefill])
        t_max = bucket(int(lengths.max()), self.chunk_bucket)
        t = np.arange(t_max)
        # Padding query rows repeat the chunk's last token: valid, and dropped.
        t_clamped = np.minimum(t[None, :], lengths[:, None] - 1)
        offsets = first + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        gather = offsets[:, None] + t_clamped
        qpos = starts[:, None] + t_clamped
        pslots = self._context_slots(prefill, int((starts + lengths).max()))
        mask = np.arange(pslots.shape[1])[None, None, :] <= qpos[:, :, None]
        unpad = np.concatenate([r * t_max + np.arange(n) for r, n in enumerate(lengths)])
        meta.prefill_gather = mx.array(gather.astype(np.int32))
        meta.prefill_rows = mx.array(self.cache.head_rows(pslots).astype(np.int32))
        meta.prefill_mask = mx.array(mask[:, None, :, :])
        meta.prefill_unpad = mx.array(unpad.astype(np.int32))

    def forward(self, batch: Batch) -> mx.array:
        """Logits [len(chunks), vocab] for each chunk's last token (lazy)."""
        return self.model(batch.input_ids, batch.positions, self.cache.views(batch.meta),
                          logits_index=batch.logits_index)
