"""Fixed-size KV blocks handed to sequences from one pool, with automatic
prefix caching. Pure Python.

Each sequence owns a block table: the list of physical blocks holding its
tokens in order, so token t of a sequence lives in slot
`table[t // block_size] * block_size + t % block_size`. Reference counts let
a block be shared and returned only when its last owner is done.

Prefix caching (vLLM's scheme): once a block is full and its K/V computed, it
is registered under its chained key (kvcache/prefix_hash.py). A new sequence
takes the longest run of registered blocks matching its prompt instead of
computing them. A block whose last owner lets go stays registered, with its
contents, in an LRU queue of free blocks; it is evicted (unregistered) only
when the allocator hands it out again, oldest first.

Sliding windows: when every attention layer of the model sees only its
`sliding_window` latest tokens, a block whose every slot is behind the window
of the sequence's next token is read by no one again; `release_behind_window`
gives it back (to the LRU queue, registered as ever) and leaves FREED in its
table entry, so positions still index the table. Released entries are always
a leading run of the table.
"""

from __future__ import annotations

from collections import OrderedDict

from kvcache.prefix_hash import ROOT, chain_keys


def most_blocks_held(num_tokens: int, chunk: int, block_size: int,
                     sliding_window: int | None) -> int:
    """The most blocks a sequence of `num_tokens` tokens holds at once when
    computed `chunk` tokens at most a step: all of them, or with a sliding
    window on every layer those of the window and two steps' chunks (with
    asynchronous scheduling a step's blocks are released only once the next
    one is planned), in a span that may straddle one block more."""
    every = -(-num_tokens // block_size)
    if sliding_window is None:
        return every
    span = sliding_window - 1 + 2 * min(chunk, num_tokens)
    return min(every, -(-span // block_size) + 1)


FREED = -1  # a table entry whose block went back to the pool behind a sliding window


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation is attempted without enough free blocks."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None):
        """`sliding_window`: the largest window when every attention layer
        has one (blocks behind it may then be released), else None."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError("a sliding window must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        # Free blocks in eviction order (least recently freed first).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Each table as a tuple, kept until the table changes: the scheduler
        # hands every running sequence's table to the runner every step.
        self._snapshots: dict[str, tuple[int, ...]] = {}
        self.peak_used = 0
        # Prefix cache: key -> block, block -> key, and each sequence's keys
        # of its registered full blocks (in table order).
        self._cached: dict[bytes, int] = {}
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._seq_keys: dict[str, list[bytes]] = {}
        self._lookup_keys: dict[str, list[bytes]] = {}  # of sequences still waiting
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0     # of which found cached

    # -- counters ---------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding registered K/V (in use or free and evictable)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- per-sequence tables ---------------------------------------------
    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def table_snapshot(self, seq_id: str) -> tuple[int, ...]:
        """The sequence's block table as an immutable value; the same object
        until the table changes (a new block, a release behind the window)."""
        snapshot = self._snapshots.get(seq_id)
        if snapshot is None:
            snapshot = self._snapshots[seq_id] = tuple(self._tables.get(seq_id, ()))
        return snapshot

    def capacity(self, seq_id: str) -> int:
        """Tokens the sequence's current blocks can hold."""
        return len(self.block_table(seq_id)) * self.block_size

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so the sequence holds `num_tokens` tokens in all."""
        return max(0, self.blocks_for(num_tokens) - len(self.block_table(seq_id)))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._key_of[block]
        if key is not None:  # evicted: its contents are about to be overwritten
            self._key_of[block] = None
            del self._cached[key]
        self._ref_counts[block] = 1
        return block

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens (a new sequence, a
        prefill chunk, or a decode step's slot); return the new blocks."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise NoFreeBlocks(f"{seq_id} needs {need} blocks, {len(self._free)} free")
        new = [self._take_free() for _ in range(need)]
        self._tables.setdefault(seq_id, []).extend(new)
        if new:
            self._snapshots.pop(seq_id, None)
        self.peak_used = max(self.peak_used, self.num_used)
        return new

    append_slots = allocate  # a decode step is an allocation of one more token

    def fork(self, parent_id: str, child_id: str) -> None:
        """Share every block of `parent_id` with a new sequence `child_id`."""
        if child_id in self._tables:
            raise ValueError(f"{child_id} already has blocks")
        table = list(self.block_table(parent_id))
        for block in table:
            if block != FREED:
                self._ref_counts[block] += 1
        self._tables[child_id] = table
        self._snapshots.pop(child_id, None)
        self._seq_keys[child_id] = list(self._seq_keys.get(parent_id, []))

    def free(self, seq_id: str) -> None:
        """Release the sequence's blocks; each returns to the pool when its
        last owner lets go, last block first (so a prompt's tail is evicted
        before the prefix it shares). Freeing an unknown sequence does nothing."""
        self._seq_keys.pop(seq_id, None)
        self._lookup_keys.pop(seq_id, None)
        self._snapshots.pop(seq_id, None)
        for block in reversed(self._tables.pop(seq_id, [])):
            if block != FREED:
                self._release(block)

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free[block] = None

    def _behind_window(self, next_position: int) -> int:
        """Leading blocks no layer reads once the next token to compute is at
        `next_position`: each of their slots is behind that token's window."""
        if self.sliding_window is None:
            return 0
        return max(next_position - self.sliding_window + 1, 0) // self.block_size

    def most_blocks_held(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a sequence of `num_tokens` tokens holds at once
        when computed `chunk` tokens at most a step (see `most_blocks_held`)."""
        return most_blocks_held(num_tokens, chunk, self.block_size, self.sliding_window)

    def release_behind_window(self, seq_id: str, next_position: int) -> int:
        """Give back the blocks of `seq_id` that no layer reads again once its
        next token to compute is at `next_position`; returns how many."""
        table = self._tables.get(seq_id)
        if self.sliding_window is None or not table:  # the common case, every step
            return 0
        behind = min(self._behind_window(next_position), len(table))
        released = 0
        for i in range(behind - 1, -1, -1):  # back to the run released before
            if table[i] == FREED:
                break
            self._release(table[i])
            table[i] = FREED
            released += 1
        if released:
            self._snapshots.pop(seq_id, None)
        return released

    def slot(self, seq_id: str, position: int) -> int:
        table = self._tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    # -- prefix caching ----------------------------------------------------
    def cached_prefix(self, token_ids, seq_id: str | None = None) -> list[int]:
        """Registered blocks holding the longest cached prefix of `token_ids`,
        leaving at least the last token to compute (its logits are needed).
        Looks only; `take_prefix` claims them. With `seq_id`, the sequence's
        block keys are kept between calls (a sequence waiting for room is
        looked up every step; its tokens only ever grow)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        full = (len(token_ids) - 1) // self.block_size
        keys = self._lookup_keys.get(seq_id, []) if seq_id is not None else []
        if len(keys) < full:
            keys = keys + chain_keys(token_ids, self.block_size, full, len(keys),
                                     keys[-1] if keys else ROOT)
            if seq_id is not None:
                self._lookup_keys[seq_id] = keys
        for key in keys[:full]:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_take_prefix(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a new sequence can claim `hits` and grow to `num_tokens`."""
        claimed = hits[self._behind_window(len(hits) * self.block_size):]
        reclaimed = sum(1 for b in claimed if self._ref_counts[b] == 0)
        return self.blocks_for(num_tokens) - len(hits) <= len(self._free) - reclaimed

    def take_prefix(self, seq_id: str, hits: list[int], num_prompt_tokens: int) -> int:
        """Start `seq_id`'s table with the cached blocks `hits`; returns the
        tokens they hold. Hits already behind the window of the first token
        to compute are not claimed (FREED entries). Counts the lookup in the
        hit-rate statistics."""
        if seq_id in self._tables:
            raise ValueError(f"{seq_id} already has blocks")
        self._lookup_keys.pop(seq_id, None)
        cached = len(hits) * self.block_size
        behind = self._behind_window(cached)
        for block in hits[behind:]:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        self._tables[seq_id] = [FREED] * behind + hits[behind:]
        self._snapshots.pop(seq_id, None)
        self._seq_keys[seq_id] = [self._key_of[b] for b in hits]
        self.peak_used = max(self.peak_used, self.num_used)
        if self.enable_prefix_caching:
            self.prefix_queries += num_prompt_tokens
            self.prefix_hits += cached
        return cached

    def register_computed(self, seq_id: str, token_ids, num_computed: int) -> None:
        """Register the sequence's blocks that are now full and computed (its
        first `num_computed` tokens have K/V), so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        keys = self._seq_keys.get(seq_id)
        if keys is None:
            keys = self._seq_keys[seq_id] = []
        elif num_computed // self.block_size <= len(keys):
            return  # no block filled since the last call: most steps of every sequence
        table = self._tables.get(seq_id, [])
        full = min(num_computed // self.block_size, len(table))
        if full <= len(keys):
            return
        parent = keys[-1] if keys else ROOT
        for i, key in enumerate(chain_keys(token_ids, self.block_size, full, len(keys), parent),
                                start=len(keys)):
            keys.append(key)
            block = table[i]
            if block == FREED:  # released before registration: nothing to share
                continue
            # An equal block computed twice (two sequences with the same new
            # prefix at once) stays registered once; the copy is a plain block.
            if key not in self._cached and self._key_of[block] is None:
                self._cached[key] = block
                self._key_of[block] = key

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (contents are left as they are):
        later sequences compute their prompts from the start (a running
        sequence's blocks are registered again once it completes its next
        one). Benchmarks use it so a warm-up run does not serve the timed one."""
        self._cached.clear()
        self._key_of = [None] * self.num_blocks
        self._seq_keys.clear()
        self._lookup_keys.clear()

    # -- checks ------------------------------------------------------------
    def check_invariants(self) -> None:
        """Every block is either free with no owner or owned as often as its
        reference count says, and the prefix index agrees with itself; used in
        tests and after failures."""
        owners = [0] * self.num_blocks
        for seq_id, snapshot in self._snapshots.items():
            assert snapshot == tuple(self._tables.get(seq_id, ())), f"stale table of {seq_id}"
        for table in self._tables.values():
            released = table.count(FREED)
            assert all(b == FREED for b in table[:released]), "a released entry past a live one"
            for block in table[released:]:
                owners[block] += 1
        for block in range(self.num_blocks):
            assert self._ref_counts[block] >= 0, f"block {block} has a negative count"
            assert owners[block] == self._ref_counts[block], f"block {block} miscounted"
            assert (block in self._free) == (owners[block] == 0), \
                f"block {block} leaked or double-booked"
            key = self._key_of[block]
            assert key is None or self._cached.get(key) == block, f"block {block} mis-indexed"
        assert all(self._key_of[b] == k for k, b in self._cached.items()), "stale prefix key"
