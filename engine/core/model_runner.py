"""Turns a SchedulerOutput into one packed, padded batch and runs the model.

Host-side work is numpy on small int arrays; the model sees MLX arrays only.
The runner builds the step's common attention metadata once (packed token
slots, positions, block tables, context lengths, chunk boundaries) and the
cache's attention backend turns it into the arrays its kernel needs.
Shapes are bucketed (token count, context width, chunk length) so a compiled
graph could be reused and so padding waste is bounded and measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import mlx.core as mx
import numpy as np

from engine.core.block_tables import PaddedBlockTables
from kvcache.attention.metadata import CommonAttentionMetadata, bucket
from kvcache.paged_cache import PagedKVCache
from scheduler.scheduler import ScheduledChunk, SchedulerOutput
from scheduler.sequence import PENDING


@dataclass
class InFlightTokens:
    """The previous step's sampled ids, still on the device (asynchronous
    scheduling): a PENDING token of sequence s is `tokens[row_of[s]]`."""

    tokens: mx.array        # [rows] int32
    seq_ids: list[str]      # the sequence of each row

    @cached_property
    def row_of(self) -> dict[str, int]:
        # Only when rows changed order: steady decode compares seq_ids instead.
        return {seq_id: row for row, seq_id in enumerate(self.seq_ids)}


@dataclass
class Batch:
    input_ids: mx.array       # [N] packed, padded
    positions: mx.array       # [N]
    meta: Any                 # the attention backend's metadata for this step
    logits_index: mx.array | None  # [len(chunks)] packed index of each chunk's last token
    num_tokens: int           # real tokens
    num_padded: int           # N
    compiled: bool = False    # a pure-decode step for the compiled forward


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache, token_bucket: int = 8, width_bucket: int = 4,
                 chunk_bucket: int = 16, compile_decode: bool = False, host_forward=None):
        """`host_forward` (built by the platform) runs the forward in host
        memory with `forward(ids_np, positions_np, views, logits_index_np) ->
        logits`; it needs a backend whose views offer `attend_host`."""
        self.model = model
        self.cache = cache
        self.backend = cache.backend
        self.host_forward = host_forward if self.backend.host_attention else None
        self.bs = cache.block_size
        self.token_bucket, self.width_bucket, self.chunk_bucket = (
            token_bucket, width_bucket, chunk_bucket)
        self.real_tokens = 0
        self.padded_tokens = 0
        # Block tables padded with the scratch block, which also stands in for
        # blocks released behind a sliding window (no layer reads them: kernels
        # skip them, the portable path masks them).
        self.tables = PaddedBlockTables(cache.scratch_block)
        # Pure-decode steps run one compiled graph per (rows, width) bucket where
        # the backend allows it (CUDA): fewer launches and no per-op Python.
        self._compiled = None
        if compile_decode and self.backend.compiled_decode:
            state = [cache.k, cache.v]
            self._compiled = mx.compile(self._decode_graph, inputs=state, outputs=state)

    @property
    def padding_waste(self) -> float:
        """Share of computed token rows that were padding, over all steps."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def _common(self, tables: np.ndarray, lengths, slots, positions, context, num_decode: int,
                num_padding: int) -> CommonAttentionMetadata:
        """The step's attention metadata every backend starts from."""
        starts = np.zeros(len(lengths) + 1, np.int64)
        starts[1:] = np.cumsum(lengths)
        return CommonAttentionMetadata(
            slots=np.asarray(slots, np.int64), positions=np.asarray(positions, np.int64),
            query_start=starts, context_lens=np.asarray(context, np.int64), block_tables=tables,
            num_decode=num_decode, num_padding=num_padding, block_size=self.bs,
            scratch_block=self.cache.scratch_block, width_bucket=self.width_bucket,
            chunk_bucket=self.chunk_bucket)

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

    @staticmethod
    def _ids(ids: list[int], decode: list[str], last, in_flight: InFlightTokens | None,
             ) -> mx.array:
        """The packed ids as an MLX array, PENDING ones (only ever a chunk's
        last token: `last` yields (packed index, seq_id) of each chunk's)
        taken from the step in flight on the device, without waiting for it.
        `decode`: the sequences of the leading one-token chunks, in order."""
        k = ids.count(PENDING)
        if not k:
            return mx.array(ids, dtype=mx.int32)
        if in_flight is None:
            raise RuntimeError("a PENDING token with no step in flight")
        tokens = in_flight.tokens.astype(mx.int32)
        if ids[:k].count(PENDING) == k and decode[:k] == in_flight.seq_ids[:k]:
            # Steady decode: the first k rows wait for the previous step's
            # first k rows' tokens, in order; take them as they are instead
            # of scattering them.
            return tokens[:k] if k == len(ids) else mx.concatenate(
                [tokens[:k], mx.array(ids[k:], dtype=mx.int32)])
        pending = [(at, seq_id) for at, seq_id in last if ids[at] == PENDING]
        at = [a for a, _ in pending]
        rows = [in_flight.row_of[s] for _, s in pending]
        for a in at:
            ids[a] = 0
        packed = mx.array(ids, dtype=mx.int32)
        packed[mx.array(at, dtype=mx.int32)] = tokens[mx.array(rows, dtype=mx.int32)]
        return packed

    def prepare(self, out: SchedulerOutput, in_flight: InFlightTokens | None = None) -> Batch:
        """The step's batch; `in_flight` supplies the ids of PENDING tokens."""
        if self._compiled is not None and out.decode_only:
            return self._prepare_compiled_decode(out, in_flight)
        chunks = out.chunks
        decode = [c for c in chunks if c.num_tokens == 1]
        ordered = decode + [c for c in chunks if c.num_tokens > 1]
        ids, pos, slots, last = self._token_lists(ordered)
        n = len(ids)
        padded = n if n <= self.token_bucket else bucket(n, self.token_bucket)
        pad = padded - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.cache.scratch_slot] * pad
        self.real_tokens += n
        self.padded_tokens += padded
        context = [c.start + c.num_tokens for c in ordered]
        width = bucket(-(-max(context) // self.bs), self.width_bucket)
        common = self._common(self.tables.build(ordered, width), [c.num_tokens for c in ordered],
                              slots, pos, context, len(decode), pad)
        meta = self.backend.build(common)
        logits_index = [last[c.seq_id] for c in chunks]
        return Batch(self._ids(ids, [c.seq_id for c in decode],
                               ((at, s) for s, at in last.items()), in_flight),
                     mx.array(pos, dtype=mx.int32), meta,
                     mx.array(logits_index, dtype=mx.int32), n, padded)

    def forward(self, batch: Batch) -> mx.array:
        """Logits [len(chunks), vocab] for each chunk's last token (lazy)."""
        if batch.compiled:
            logits = self._compiled(batch.input_ids, batch.positions,
                                    *self.backend.decode_graph_inputs(batch.meta))
            return logits[:batch.num_tokens]
        if self.host_forward is not None:
            return self.host_forward(np.asarray(batch.input_ids), np.asarray(batch.positions),
                                     self.cache.views(batch.meta), np.asarray(batch.logits_index))
        return self.model(batch.input_ids, batch.positions, self.cache.views(batch.meta),
                          logits_index=batch.logits_index)

    def _prepare_compiled_decode(self, out: SchedulerOutput,
                                 in_flight: InFlightTokens | None) -> Batch:
        # Rows are padded to a power of two with decode rows of context 1 that
        # write to and read from the scratch slot, so every shape in the
        # graph comes from the bucket and nothing else. One token a row: the
        # positions, slots and contexts are numpy over the padded tables.
        chunks = out.chunks
        n = len(chunks)
        rows = max(8, 1 << (n - 1).bit_length())
        bs = self.bs
        pos = np.zeros(rows, np.int64)
        pos[:n] = [c.start for c in chunks]
        context = pos + 1
        # Table widths in powers of two (>= 16 blocks): few graphs to compile.
        width = max(16, 1 << (-(-int(context.max()) // bs) - 1).bit_length())
        tables = self.tables.build(chunks, width, rows)
        slots = tables[np.arange(rows), pos // bs] * bs + pos % bs  # padding: the scratch slot
        common = self._common(tables, np.ones(rows, np.int64), slots, pos, context, rows, 0)
        self.real_tokens += n
        self.padded_tokens += rows
        ids = [c.token_ids[0] for c in chunks] + [0] * (rows - n)
        seq_ids = out.seq_ids
        return Batch(self._ids(ids, seq_ids, enumerate(seq_ids), in_flight),
                     mx.array(pos.astype(np.int32)), self.backend.build(common), None, n, rows,
                     compiled=True)

    def _decode_graph(self, ids: mx.array, positions: mx.array, *arrays: mx.array) -> mx.array:
        meta = self.backend.decode_metadata(ids.shape[0], *arrays)
        return self.model(ids, positions, self.cache.views(meta))
