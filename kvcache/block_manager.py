"""Fixed-size KV blocks handed to sequences from one pool. Pure Python.

Each sequence owns a block table: the list of physical blocks holding its
tokens in order, so token t of a sequence lives in slot
`table[t // block_size] * block_size + t % block_size`. Reference counts let
a block be shared (prefix reuse) and returned only when its last owner is done.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation is attempted without enough free blocks."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self.peak_used = 0

    # -- counters ---------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- per-sequence tables ---------------------------------------------
    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def capacity(self, seq_id: str) -> int:
        """Tokens the sequence's current blocks can hold."""
        return len(self.block_table(seq_id)) * self.block_size

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so the sequence holds `num_tokens` tokens in all."""
        return max(0, self.blocks_for(num_tokens) - len(self.block_table(seq_id)))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens (a new sequence, a
        prefill chunk, or a decode step's slot); return the new blocks."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise NoFreeBlocks(f"{seq_id} needs {need} blocks, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(need)]
        for block in new:
            self._ref_counts[block] = 1
        self._tables.setdefault(seq_id, []).extend(new)
        self.peak_used = max(self.peak_used, self.num_used)
        return new

    append_slots = allocate  # a decode step is an allocation of one more token

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share every block of `parent_id` with a new sequence `child_id`."""
        if child_id in self._tables:
            raise ValueError(f"{child_id} already has blocks")
        table = list(self.block_table(parent_id))
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child_id] = table

    def free(self, seq_id: str) -> None:
        """Release the sequence's blocks; each returns to the pool when its
        last owner lets go. Freeing an unknown sequence does nothing."""
        for block in reversed(self._tables.pop(seq_id, [])):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def slot(self, seq_id: str, position: int) -> int:
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self) -> None:
        """Every block is either free with no owner or owned as often as its
        reference count says; used in tests and after failures."""
        owners = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                owners[block] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is free twice"
        for block in range(self.num_blocks):
            assert owners[block] == self._ref_counts[block], f"block {block} miscounted"
            assert (block in free) == (owners[block] == 0), f"block {block} leaked or double-booked"
