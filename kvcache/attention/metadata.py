"""What every attention backend is given: the layer's shape, and one step's
common metadata, built once by the model runner.

The pools hold one row per (token slot, KV head): row = slot * n_kv_heads +
head (see `head_rows`). Packed tokens come in a fixed order: decode rows
(one query token each) first, then prompt chunks, then padding. A backend
turns this common metadata into the arrays its own kernel needs
(`AttentionBackend.build`), once a step, before any layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class AttentionSpec:
    """The attention shape a backend must serve, and how K/V are stored."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: mx.Dtype
    # Options some of the model's layers use (models/layers/attention.py): a
    # backend whose kernel is checked at start-up checks these too.
    sliding_window: bool = False
    softcap: bool = False
    # The smallest window a layer uses (None: none uses one): attention that
    # knows no window is exact for chunks no longer than this.
    shortest_window: int | None = None

    @property
    def group(self) -> int:
        """Query heads that share one KV head."""
        return self.num_heads // self.num_kv_heads


def bucket(n: int, step: int) -> int:
    """Round n up to a multiple of `step`."""
    return -(-n // step) * step


def head_rows(slots: np.ndarray, n_kv_heads: int) -> np.ndarray:
    """Pool rows of token slots: [N] -> [N * Hkv] for writes, [B, L] -> [B,
    Hkv, L] for reads."""
    heads = np.arange(n_kv_heads)
    if slots.ndim == 1:
        return (slots[:, None] * n_kv_heads + heads).reshape(-1)
    return slots[:, None, :] * n_kv_heads + heads[None, :, None]


@dataclass
class CommonAttentionMetadata:
    """One step's tokens as every backend sees them (host arrays).

    Chunk i owns packed tokens query_start[i] .. query_start[i+1]-1 at
    positions context_lens[i] - its length .. context_lens[i] - 1; the
    first `num_decode` chunks are single-token decode rows. Padding tokens
    (the last `num_padding`) write to the scratch block and attend nothing.
    """

    slots: np.ndarray         # [N] token slot each packed token's K/V is stored at
    positions: np.ndarray     # [N] position of each packed token (0 for padding)
    query_start: np.ndarray   # [chunks + 1] packed index of each chunk's first token
    context_lens: np.ndarray  # [chunks] tokens each chunk's sequence has after this step
    block_tables: np.ndarray  # [chunks, W] block ids, padded with the scratch block
    num_decode: int
    num_padding: int
    block_size: int
    scratch_block: int        # the pools' extra block, past the last real one
    width_bucket: int = 4     # block-table widths are multiples of this
    chunk_bucket: int = 16    # padded prompt-chunk lengths are multiples of this

    @property
    def num_chunks(self) -> int:
        return len(self.context_lens)

    @property
    def num_prefill_tokens(self) -> int:
        return len(self.slots) - self.num_padding - self.num_decode

    @property
    def chunk_lens(self) -> np.ndarray:
        return np.diff(self.query_start)

    def tables(self, first: int, stop: int) -> np.ndarray:
        """Block tables of chunks first..stop-1, cut to the (bucketed) width
        their own contexts need; all chunks keep the step's width."""
        if first == 0 and stop == self.num_chunks:
            return self.block_tables
        blocks = -(-int(self.context_lens[first:stop].max()) // self.block_size)
        return self.block_tables[first:stop, :bucket(blocks, self.width_bucket)]

    def context_slots(self, first: int, stop: int) -> np.ndarray:
        """[rows, width * block_size] token slots of chunks first..stop-1,
        in position order (past a sequence's end: the scratch block's)."""
        tables = self.tables(first, stop).astype(np.int64)
        slots = tables[:, :, None] * self.block_size + np.arange(self.block_size)
        return slots.reshape(len(tables), -1)
