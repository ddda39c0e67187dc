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
    logits_index: mx.array | None  # [len(chunks)] packed index of each chunk's last token
    num_tokens: int           # real tokens
    num_padded: int           # N
    compiled: bool = False    # a pure-decode step for the compiled CUDA forward


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, token_bucket: int = 8, width_bucket: int = 4,
                 chunk_bucket: int = 16, compile_decode: bool = False, host_forward=None):
        self.model = model
        # The CPU forward in host memory (engine/platform/cpu_llama.py); it needs the
        # CPU attention kernel's host views.
        self.host_forward = host_forward if cache.cpu_attention is not None else None
        self.cache = cache
        self.bs = cache.block_size
        self.token_bucket, self.width_bucket, self.chunk_bucket = (
            token_bucket, width_bucket, chunk_bucket)
        self.real_tokens = 0
        self.padded_tokens = 0
        # Pure-decode steps on CUDA run one compiled graph per (rows, width)
        # bucket: fewer launches and no per-op Python. Needs the in-place
        # attention kernel, whose rows may be padding (they read the scratch block).
        self._compiled = None
        if compile_decode and cache.decode_kernel:
            state = [cache.k, cache.v]
            self._compiled = mx.compile(self._decode_graph, inputs=state, outputs=state)

    @property
    def padding_waste(self) -> float:
        """Share of computed token rows that were padding, over all steps."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def _tables(self, chunks: list[ScheduledChunk], width: int, fill: int) -> np.ndarray:
        """[rows, width] block tables, padded with `fill`; one numpy call."""
        return np.array([list(c.block_table[:width]) + [fill] * (width - len(c.block_table))
                         for c in chunks], dtype=np.int64)

    def _context_slots(self, chunks: list[ScheduledChunk], context: int) -> np.ndarray:
        """[rows, width*bs] slots of each row's tokens 0..width*bs-1, padded
        with the scratch block past the end of its table."""
        width = bucket(-(-context // self.bs), self.width_bucket)
        tables = self._tables(chunks, width, self.cache.num_blocks)
        slots = tables[:, :, None] * self.bs + np.arange(self.bs)
        return slots.reshape(len(chunks), width * self.bs)

    def _token_lists(self, ordered: list[ScheduledChunk]):
        # Plain Python: at 256 decode rows this beats hundreds of tiny numpy calls.
        bs = self.bs
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        last: dict[str, int] = {}
        for c in ordered:
            ids.extend(c.token_ids)
            table = c.block_table
            if c.num_tokens == 1:
                p = c.start
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            else:
                span = range(c.start, c.start + c.num_tokens)
                pos.extend(span)
                slots.extend(table[p // bs] * bs + p % bs for p in span)
            last[c.seq_id] = len(ids) - 1
        return ids, pos, slots, last

    def prepare(self, out: SchedulerOutput) -> Batch:
        chunks = list(out.chunks)
        if self._compiled is not None and all(c.num_tokens == 1 for c in chunks):
            return self._prepare_compiled_decode(chunks)
        decode = [c for c in chunks if c.num_tokens == 1]
        prefill = [c for c in chunks if c.num_tokens > 1]
        ids, pos, slots, last = self._token_lists(decode + prefill)
        n = len(ids)
        padded = n if n <= self.token_bucket else bucket(n, self.token_bucket)
        pad = padded - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.cache.scratch_slot] * pad
        self.real_tokens += n
        self.padded_tokens += padded
        logits_index = [last[c.seq_id] for c in chunks]

        meta = AttentionMetadata(
            num_decode=len(decode), num_prefill_tokens=n - len(decode), num_padding=pad)
        if self.cache.cpu_attention is not None:
            # The CPU kernel writes K/V by token slot and attends every token itself.
            self._prepare_host(meta, decode + prefill, slots, pos, pad)
        else:
            meta.write_rows = mx.array(self.cache.head_rows(np.array(slots)).astype(np.int32))
            self._prepare_mlx(meta, decode, prefill)
        return Batch(mx.array(ids, dtype=mx.int32), mx.array(pos, dtype=mx.int32), meta,
                     mx.array(logits_index, dtype=mx.int32), n, padded)

    def _prepare_mlx(self, meta: AttentionMetadata, decode: list[ScheduledChunk],
                     prefill: list[ScheduledChunk]) -> None:
        """Attention arrays for the MLX paths: decode rows through the CUDA
        kernel or the portable gather, prompt chunks through the gather."""
        if decode and self.cache.decode_kernel:
            ctx = [c.start + 1 for c in decode]
            width = bucket(-(-max(ctx) // self.bs), self.width_bucket)
            meta.decode_block_tables = mx.array(self._tables(decode, width, 0).astype(np.int32))
            meta.decode_context_lens = mx.array(ctx, dtype=mx.int32)
        elif decode:
            ctx = np.array([c.start + 1 for c in decode])
            dslots = self._context_slots(decode, int(ctx.max()))
            meta.decode_rows = mx.array(self.cache.head_rows(dslots).astype(np.int32))
            mask = np.arange(dslots.shape[1])[None, :] < ctx[:, None]
            meta.decode_mask = mx.array(mask[:, None, None, :])
        if prefill:
            self._prepare_prefill(meta, prefill, len(decode))

    def _prepare_host(self, meta: AttentionMetadata, ordered: list[ScheduledChunk],
                      slots: list[int], positions: list[int], pad: int) -> None:
        # One query per packed token, causal by construction: a token at
        # position p sees slots 0..p of its own chunk's table.
        width = max(len(c.block_table) for c in ordered)
        meta.host_write_slots = np.array(slots, dtype=np.int64)
        meta.host_tables = self._tables(ordered, width, 0).astype(np.int32)
        table_of = np.repeat(np.arange(len(ordered), dtype=np.int32),
                             [c.num_tokens for c in ordered])
        meta.host_table_of = np.concatenate([table_of, np.zeros(pad, np.int32)])
        context = np.array(positions, dtype=np.int32) + 1
        context[len(context) - pad:] = 0
        meta.host_context = context

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
        if batch.compiled:
            meta = batch.meta
            logits = self._compiled(batch.input_ids, batch.positions, meta.write_rows,
                                    meta.decode_block_tables, meta.decode_context_lens)
            return logits[:batch.num_tokens]
        if self.host_forward is not None:
            return self.host_forward(np.asarray(batch.input_ids), np.asarray(batch.positions),
                                     self.cache.views(batch.meta), np.asarray(batch.logits_index))
        return self.model(batch.input_ids, batch.positions, self.cache.views(batch.meta),
                          logits_index=batch.logits_index)

    def _prepare_compiled_decode(self, chunks: list[ScheduledChunk]) -> Batch:
        # Rows are padded to a power of two with decode rows of context 1 that
        # write to and read from the scratch slot, so every shape in the
        # graph comes from the bucket and nothing else.
        n = len(chunks)
        rows = max(8, 1 << (n - 1).bit_length())
        ids, pos, slots, _ = self._token_lists(chunks)
        pad = rows - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.cache.scratch_slot] * pad
        ctx = [c.start + 1 for c in chunks] + [1] * pad
        # Table widths in powers of two (>= 16 blocks): few graphs to compile.
        width = max(16, 1 << (-(-max(ctx) // self.bs) - 1).bit_length())
        tables = self._tables(chunks, width, 0)
        if pad:
            tables = np.concatenate([tables, np.full((pad, width), self.cache.num_blocks)])
        self.real_tokens += n
        self.padded_tokens += rows
        meta = AttentionMetadata(
            write_rows=mx.array(self.cache.head_rows(np.array(slots)).astype(np.int32)),
            num_decode=rows, decode_block_tables=mx.array(tables.astype(np.int32)),
            decode_context_lens=mx.array(ctx, dtype=mx.int32))
        return Batch(mx.array(ids, dtype=mx.int32), mx.array(pos, dtype=mx.int32), meta, None,
                     n, rows, compiled=True)

    def _decode_graph(self, ids, positions, write_rows, tables, context_lens):
        meta = AttentionMetadata(
            write_rows=write_rows, num_decode=ids.shape[0], decode_block_tables=tables,
            decode_context_lens=context_lens)
        return self.model(ids, positions, self.cache.views(meta))
