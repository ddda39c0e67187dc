"""A step's padded block tables, built from rows kept between steps."""

from engine.core.block_tables import PaddedBlockTables
from kvcache.block_manager import FREED
from scheduler.scheduler import ScheduledChunk

S = 99  # the scratch block


def chunk(seq_id, table):
    return ScheduledChunk(seq_id, (1,), 0, table, True)


def test_rows_padded_with_scratch_and_kept_only_while_their_table_is():
    tables = PaddedBlockTables(fill=S)
    a, b = (FREED, 3, 4), (7,)
    got = tables.build([chunk("a", a), chunk("b", b)], 4, rows=4)
    assert got.tolist() == [[S, 3, 4, S], [7, S, S, S], [S] * 4, [S] * 4]
    assert got.flags.writeable
    # Next step: b got a block (a new tuple), a did not (the same one); the
    # width grew, so a's kept row is made again too.
    got = tables.build([chunk("b", (7, 8)), chunk("a", a)], 5)
    assert got.tolist() == [[7, 8, S, S, S], [S, 3, 4, S, S]]
    got = tables.build([chunk("a", a)], 5)
    assert got.tolist() == [[S, 3, 4, S, S]]
    # A sequence back after a step away with the same id and a new table
    # (its kept row is of the old one), and a table wider than the width.
    got = tables.build([chunk("b", (1, 2, 3)), chunk("c", (5, 6, 7, 8))], 2)
    assert got.tolist() == [[1, 2], [5, 6]]


def test_rows_of_sequences_gone_are_dropped_in_time():
    tables = PaddedBlockTables(fill=S)
    for step in range(200):  # a new sequence every step beside a lasting one
        got = tables.build([chunk("kept", (1,)), chunk(f"s{step}", (step,))], 2)
        assert got.tolist() == [[1, S], [step, S]]
    assert len(tables._rows) <= 2 * 2 + 64
