"""A step's block tables as one padded numpy array, from rows kept between steps.

Every step hands the attention kernel a [rows, width] table of block ids,
padded with the scratch block. Converting it from Python ints each step cost
the host ~0.12 ms at 256 decode rows (4,096 entries), more than the step's
scheduling of those rows. But a decoding sequence's table changes only once
every block_size steps (a new block), so each sequence's padded row is kept
as bytes and a step joins 256 of them.
"""

from __future__ import annotations

import array
from collections.abc import Sequence

import numpy as np

from kvcache.block_manager import FREED
from scheduler.scheduler import ScheduledChunk


class PaddedBlockTables:
    def __init__(self, fill: int):
        """`fill`: the block that pads rows and stands in for FREED entries
        (blocks released behind a sliding window: no layer reads them)."""
        self.fill = fill
        # seq_id -> (the table the row was made from, the row as int64 bytes),
        # all rows `_width` wide.
        self._rows: dict[str, tuple[tuple[int, ...], bytes]] = {}
        self._width = 0

    def build(self, chunks: Sequence[ScheduledChunk], width: int, rows: int = 0) -> np.ndarray:
        """[max(rows, chunks), width] int64 tables of `chunks` in order, then
        all-scratch rows. A kept row is reused when its chunk carries the very
        table it was made from (BlockManager.table_snapshot gives the same
        tuple until the table changes) at the same width."""
        if width != self._width:  # every row is made again at a new width
            self._rows, self._width = {}, width
        kept, parts = self._rows, []
        for c in chunks:
            row = kept.get(c.seq_id)
            if row is None or row[0] is not c.block_table:
                row = kept[c.seq_id] = (c.block_table, self._padded(c.block_table, width))
            parts.append(row[1])
        # Rows of sequences gone are dropped now and then, not every step.
        if len(kept) > 2 * len(chunks) + 64:
            self._rows = {c.seq_id: kept[c.seq_id] for c in chunks}
        if rows > len(chunks):
            parts.append(self._padded((), width) * (rows - len(chunks)))
        # A bytearray, so the array is writable like any other.
        return np.frombuffer(bytearray().join(parts), np.int64).reshape(-1, width)

    def _padded(self, table: tuple[int, ...], width: int) -> bytes:
        row = [self.fill if block == FREED else block for block in table[:width]]
        row += [self.fill] * (width - len(row))
        return array.array("q", row).tobytes()
