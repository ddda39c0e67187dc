"""BlockManager: allocation bookkeeping never double-books or leaks a block."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.block_manager import FREED, BlockManager, NoFreeBlocks


def test_allocate_append_free_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]          # 5 tokens -> 2 blocks
    assert bm.allocate("a", 8) == []              # still fits
    assert bm.append_slots("a", 9) == [2]         # the 9th token needs a block
    assert (bm.num_used, bm.num_free, bm.peak_used) == (3, 5, 3)
    assert bm.slot("a", 8) == 2 * 4 + 0
    bm.free("a")
    assert (bm.num_used, bm.num_free, bm.peak_used) == (0, 8, 3)
    bm.check_invariants()


def test_out_of_blocks_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.allocate("a", 8)
    assert not bm.can_allocate(1)
    with pytest.raises(NoFreeBlocks):
        bm.allocate("b", 1)
    assert bm.block_table("b") == [] and bm.num_free == 0
    bm.check_invariants()


def test_fork_shares_blocks_until_last_owner_frees():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
    bm.fork("a", "b")
    bm.free("a")
    assert bm.num_free == 2                       # b still holds them
    bm.free("b")
    assert bm.num_free == 4
    bm.check_invariants()


ops = st.lists(st.tuples(st.sampled_from(["alloc", "grow", "free", "fork"]),
                         st.integers(0, 5), st.integers(1, 40)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_keep_invariants(operations):
    bm = BlockManager(num_blocks=12, block_size=4)
    lengths: dict[str, int] = {}
    for op, sid, n in operations:
        seq = f"s{sid}"
        if op in ("alloc", "grow"):
            target = lengths.get(seq, 0) + n if op == "grow" else max(lengths.get(seq, 0), n)
            if bm.can_allocate(bm.blocks_needed(seq, target)):
                bm.allocate(seq, target)
                lengths[seq] = target
            else:
                with pytest.raises(NoFreeBlocks):
                    bm.allocate(seq, target)
        elif op == "free":
            bm.free(seq)
            lengths.pop(seq, None)
        elif op == "fork" and seq in lengths:
            child = f"{seq}-{n}"
            if child not in lengths:
                bm.fork(seq, child)
                lengths[child] = lengths[seq]
        bm.check_invariants()  # (which checks that no table's snapshot is stale)
        bm.table_snapshot(seq)
        for s, length in lengths.items():
            assert bm.capacity(s) >= length
        assert bm.num_used <= bm.peak_used <= bm.num_blocks
    for s in list(lengths):
        bm.free(s)
    assert bm.num_free == bm.num_blocks
    bm.check_invariants()


def test_a_table_snapshot_is_one_value_until_the_table_changes():
    """The scheduler hands each sequence's snapshot to the runner every step,
    which keeps its padded row while it gets the very same tuple back."""
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=4)
    bm.allocate("a", 5)
    snapshot = bm.table_snapshot("a")
    assert snapshot == (0, 1) and bm.table_snapshot("a") is snapshot
    bm.allocate("a", 8)                     # no new block: the same value
    assert bm.table_snapshot("a") is snapshot
    bm.allocate("a", 9)
    assert bm.table_snapshot("a") == (0, 1, 2)
    assert bm.release_behind_window("a", 9) == 1   # slots 0-3 behind the window
    assert bm.table_snapshot("a") == (FREED, 1, 2)
    bm.fork("a", "b")
    assert bm.table_snapshot("b") == (FREED, 1, 2)
    bm.check_invariants()
    bm.free("a")
    assert bm.table_snapshot("a") == ()
    bm.check_invariants()
