"""Scheduler policy without a model: admission, chunking, preemption, finishing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.block_manager import BlockManager
from scheduler import FinishReason, Scheduler, SchedulerConfig, Sequence
from scheduler.scheduler import RequestTooLong


def make(num_blocks=64, block_size=4, prefix_caching=True, **cfg):
    return Scheduler(SchedulerConfig(**cfg),
                     BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching))


def seq(i, n_prompt, max_tokens=4, **kw):
    return Sequence(f"r{i}", list(range(1, n_prompt + 1)), max_tokens, **kw)


def run_step(s, token=7):
    out = s.schedule()
    return out, s.update(out, [token] * len(out.chunks))


def test_admits_fcfs_within_token_budget_and_chunks_long_prompts():
    s = make(max_num_batched_tokens=10, max_num_seqs=8)
    for i, n in enumerate([6, 8, 3]):
        s.add(seq(i, n))
    out = s.schedule()
    assert [(c.seq_id, c.num_tokens, c.samples) for c in out.chunks] == [
        ("r0", 6, True), ("r1", 4, False)]
    s.update(out, [7, 7])
    out = s.schedule()   # r0 decodes, r1 finishes its prompt, r2 admitted
    assert [(c.seq_id, c.num_tokens, c.start) for c in out.chunks] == [
        ("r0", 1, 6), ("r1", 4, 4), ("r2", 3, 0)]


def test_max_num_seqs_limits_running():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add(seq(i, 2))
    out = s.schedule()
    assert len(out.chunks) == 2 and len(s.waiting) == 2


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempts_most_recent_and_recomputes_it_later(prefix_caching):
    s = make(num_blocks=5, block_size=2, max_num_batched_tokens=64,
             prefix_caching=prefix_caching)
    a, b = seq(0, 3, max_tokens=4), seq(1, 3, max_tokens=4)
    s.add(a)
    s.add(b)
    run_step(s)                        # both prefilled: 2 blocks each, 1 free
    run_step(s)                        # both decode position 3 in their blocks
    out, _ = run_step(s)               # a takes the last block; b must give way
    assert out.preempted == ("r1",) and [c.seq_id for c in out.chunks] == ["r0"]
    assert b.num_computed_tokens == 0 and s.waiting[0] is b
    assert s.stats.preemptions == 1
    if prefix_caching:
        # b comes back at once: a's two full blocks hold its first 4 tokens,
        # shared, so only its last token is computed again.
        out, _ = run_step(s)
        assert [(c.seq_id, c.token_ids, c.start) for c in out.chunks] == [
            ("r0", (7,), 5), ("r1", (7,), 4)]
        assert out.chunks[1].block_table[:2] == out.chunks[0].block_table[:2]
        assert b.num_cached_tokens == 4
    else:
        while not a.is_finished:
            run_step(s)
        out, _ = run_step(s)           # b comes back and recomputes prompt + output
        assert out.chunks[0].seq_id == "r1" and out.chunks[0].token_ids == (1, 2, 3, 7, 7)
    while not b.is_finished:
        run_step(s)
    assert b.output_token_ids == [7, 7, 7, 7] and s.blocks.num_free == 5


def test_finish_reasons_and_blocks_freed_in_the_same_step():
    s = make()
    s.add(seq(0, 3, max_tokens=2))
    s.add(seq(1, 3, max_tokens=5, eos_token_ids=frozenset({9})))
    s.add(seq(2, 3, max_tokens=5, stop_token_ids=frozenset({8})))
    out = s.schedule()
    s.update(out, [7, 9, 8])
    assert s.sequences.keys() == {"r0"}
    out = s.schedule()
    s.update(out, [7])
    assert not s.has_unfinished() and s.blocks.num_free == s.blocks.num_blocks
    assert s.stats.finished == {"stop": 2, "length": 1}


def test_ignore_eos_keeps_going():
    s = make()
    a = seq(0, 2, max_tokens=3, eos_token_ids=frozenset({9}), ignore_eos=True)
    s.add(a)
    for _ in range(3):
        run_step(s, token=9)
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [9, 9, 9]


def test_rejects_requests_that_cannot_fit_alone():
    s = make(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(RequestTooLong, match="context"):
        s.add(seq(0, 99, max_tokens=4))
    with pytest.raises(RequestTooLong, match="KV cache"):
        s.add(seq(1, 10, max_tokens=10))
    s.add(seq(2, 10, max_tokens=6))     # exactly 16 tokens fits
    assert len(s.waiting) == 1


def test_abort_frees_blocks():
    s = make()
    s.add(seq(0, 5))
    run_step(s)
    s.abort("r0")
    assert s.blocks.num_free == s.blocks.num_blocks and not s.has_unfinished()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=12),
       st.integers(8, 40), st.integers(4, 64), st.integers(1, 5))
def test_random_workloads_finish_with_every_block_free(reqs, num_blocks, budget, max_seqs):
    s = make(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget,
             max_num_seqs=max_seqs)
    seqs = []
    for i, (n, m) in enumerate(reqs):
        q = seq(i, n, max_tokens=m)
        try:
            s.add(q)
            seqs.append(q)
        except RequestTooLong:
            pass
    for _ in range(5000):
        if not s.has_unfinished():
            break
        out, _ = run_step(s)
        assert out.num_batched_tokens <= budget
        s.blocks.check_invariants()
        # Registration (only when a chunk completes a block) keeps up: every
        # computed full block of a running sequence is registered.
        assert all(len(s.blocks._seq_keys[q.seq_id]) == q.num_computed_tokens // 4
                   for q in s.running)
    assert all(q.is_finished and q.num_output_tokens == q.max_tokens for q in seqs)
    assert s.blocks.num_free == num_blocks
