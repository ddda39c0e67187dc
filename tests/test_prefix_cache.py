"""Automatic prefix caching: chained block keys, LRU eviction, reference
counts under random admit/abort/preempt, and identical outputs with the
cache on and off."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from kvcache.block_manager import FREED, BlockManager
from kvcache.prefix_hash import ROOT, block_key, chain_keys
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.sequence import FinishReason, Sequence

BS = 4


def test_keys_chain_on_every_earlier_token():
    a = list(range(12))
    b = [99] + a[1:]  # differs in the first block only
    ka, kb = chain_keys(a, BS, 3), chain_keys(b, BS, 3)
    assert ka[0] == block_key(ROOT, a[:4]) and ka[1] == block_key(ka[0], a[4:8])
    assert all(x != y for x, y in zip(ka, kb))  # one token changes every later key
    assert chain_keys(a + [5, 6], BS, 3) == ka  # a longer sequence shares the same keys
    assert chain_keys(a, BS, 3, start=1, parent=ka[0]) == ka[1:]


def run_to_end(bm, seq_id, tokens):
    """Allocate a sequence, mark all of it computed, free it."""
    bm.take_prefix(seq_id, [], len(tokens))
    bm.allocate(seq_id, len(tokens))
    bm.register_computed(seq_id, tokens, len(tokens))
    bm.free(seq_id)


def test_a_freed_prefix_is_found_and_the_last_token_always_computed():
    bm = BlockManager(8, BS)
    run_to_end(bm, "a", list(range(10)))
    assert bm.num_free == 8 and bm.num_cached == 2  # two full blocks stay registered
    hits = bm.cached_prefix(list(range(10)))
    assert len(hits) == 2
    assert len(bm.cached_prefix(list(range(8)))) == 1  # 8 tokens: the last block recomputed
    assert bm.take_prefix("b", hits, 10) == 8
    assert (bm.num_used, bm.prefix_queries, bm.prefix_hits) == (2, 20, 8)  # a: 10, 0
    bm.check_invariants()


def test_eviction_takes_the_least_recently_freed_block_first():
    bm = BlockManager(4, BS)
    run_to_end(bm, "old", [1] * 4 + [9])      # block of [1]*4 freed first
    run_to_end(bm, "new", [2] * 4 + [9])
    free_order = list(bm._free)
    bm.allocate("x", 2 * BS)  # takes the two oldest free blocks
    assert bm.block_table("x") == free_order[:2]
    # The older prefix went first; the newer one is still cached.
    assert bm.cached_prefix([1] * 4 + [9]) == []
    assert len(bm.cached_prefix([2] * 4 + [9])) == 1
    bm.check_invariants()


def test_a_shared_block_is_counted_per_owner_and_kept_while_used():
    bm = BlockManager(6, BS)
    tokens = list(range(9))
    bm.take_prefix("a", [], 9)
    bm.allocate("a", 9)
    bm.register_computed("a", tokens, 9)
    hits = bm.cached_prefix(tokens)
    bm.take_prefix("b", hits, 9)
    assert bm._ref_counts[hits[0]] == 2
    bm.free("a")
    assert bm.cached_prefix(tokens) == hits and hits[0] not in bm._free
    bm.free("b")
    assert bm.num_free == 6
    bm.check_invariants()


def test_off_means_no_lookup_and_no_registration():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    run_to_end(bm, "a", list(range(9)))
    assert bm.num_cached == 0 and bm.cached_prefix(list(range(9))) == []


steps = st.lists(st.tuples(st.sampled_from(["add", "step", "abort", "step", "step"]),
                           st.integers(0, 3), st.integers(1, 30)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps, st.sampled_from([None, 5]))
def test_random_admit_abort_preempt_keeps_counts_and_frees_everything(ops, window):
    """Through the scheduler, with prompts sharing prefixes and a pool small
    enough to preempt, with and without a sliding window on every layer:
    every invariant holds after every step, counts never go negative, no
    block a sequence's window still needs is released, and everything is
    free at the end."""
    bm = BlockManager(10, BS, sliding_window=window)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16,
                                      max_model_len=40), bm)
    prefixes = [[7] * 8, [7] * 4 + [8] * 4, [3] * 12, [5]]
    n = 0
    for op, k, length in ops:
        if op == "add":
            prompt = (prefixes[k] + list(range(length)))[:30]
            sched.add(Sequence(f"s{n}", prompt, max_tokens=min(6, 40 - len(prompt))))
            n += 1
        elif op == "abort" and sched.sequences:
            sched.abort(sorted(sched.sequences)[k % len(sched.sequences)])
        elif op == "step":
            out = sched.schedule()
            sched.update(out, [k + 1] * len(out.chunks))
        bm.check_invariants()
        assert min(bm._ref_counts) >= 0
        for seq in sched.running:
            assert bm.capacity(seq.seq_id) >= seq.num_computed_tokens
            assert seq.num_computed_tokens < seq.num_tokens or seq.num_output_tokens
            table, position = bm.block_table(seq.seq_id), seq.num_computed_tokens
            needed = 0 if window is None else max(position - window + 1, 0) // BS
            assert FREED not in table[needed:]
            assert len(table) - table.count(FREED) <= bm.most_blocks_held(seq.num_tokens, 16)
    sched.reset(FinishReason.ABORT)
    assert bm.num_free == bm.num_blocks
    bm.check_invariants()


# -- through the engine ---------------------------------------------------------

PROMPTS = [list(range(3, 3 + 50)) + [i] for i in range(4)]  # share a 50-token prefix


def outputs(llm, params, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_outputs_are_the_same_with_the_cache_on_and_off(tiny_llama_dir, params):
    kw = dict(kv_cache_bytes=16 << 20, max_num_batched_tokens=32)  # chunked prefill
    on = LLM(str(tiny_llama_dir), **kw)
    off = LLM(str(tiny_llama_dir), enable_prefix_caching=False, **kw)
    want = outputs(off, params)
    assert outputs(on, params) == want                # batched, cache cold then warm
    assert [outputs(on, params, [p])[0] for p in PROMPTS] == want  # alone, cache warm
    stats = on.stats()
    assert stats.prefix_cache_hits > 0 and off.stats().prefix_cache_queries == 0


def test_a_second_identical_request_computes_only_its_last_block(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    prompt = list(range(5, 5 + 51))  # 51 tokens: 3 full blocks of 16 + 3
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = outputs(llm, params, [prompt])
    engine = llm.engine
    engine.add_request(prompt, params, request_id="again")
    out = engine.scheduler.schedule()
    assert [c.num_tokens for c in out.chunks] == [3] and out.chunks[0].start == 48
    engine.scheduler.update(out, [0])  # (the step is not run: only the plan is checked)
    engine.abort_request("again")
    assert outputs(llm, params, [prompt]) == first
    assert llm.stats().prefix_cache_hits == 2 * 48


def test_preemption_reuses_its_own_cached_blocks(tiny_llama_dir):
    """A pool too small for all rows: preempted sequences come back through
    the cache and finish with the tokens of a run that never preempted."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(3, 3 + 30 + i)) for i in range(6)]
    roomy = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, enable_prefix_caching=False)
    from engine.core.llm_engine import EngineArgs
    from kvcache.paged_cache import PagedKVCache

    per_block = PagedKVCache.bytes_per_block(2, EngineArgs().block_size, 2, 16,
                                             roomy.engine.cache.dtype)
    tight = LLM(str(tiny_llama_dir), kv_cache_bytes=14 * per_block, max_model_len=128)
    assert outputs(tight, params, prompts) == outputs(roomy, params, prompts)
    stats = tight.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    tight.engine.blocks.check_invariants()
    assert tight.engine.blocks.num_used == 0


def test_blocks_behind_the_window_go_back_and_stay_findable():
    """Window 6, blocks of 4: once the next token is at 20, slots 0-14 are
    behind every layer's window, so blocks 0-2 go back to the pool; they stay
    registered, and a sequence with the same prefix claims only the blocks
    its own window needs."""
    bm = BlockManager(16, BS, sliding_window=6)
    tokens = list(range(100, 121))
    bm.allocate("a", 20)
    bm.register_computed("a", tokens, 20)
    assert bm.release_behind_window("a", 20) == 3
    assert bm.block_table("a") == [FREED] * 3 + [3, 4] and bm.num_free == 14
    assert bm.release_behind_window("a", 20) == 0  # already given back
    hits = bm.cached_prefix(tokens)
    assert hits == [0, 1, 2, 3, 4] and bm.can_take_prefix(hits, 21)
    assert bm.take_prefix("b", hits, 21) == 20
    assert bm.block_table("b") == [FREED] * 3 + [3, 4] and bm.num_free == 14
    bm.check_invariants()
    # A long sequence holds at most the window and two chunks of 16 (one step
    # may be in flight), plus the block the span may straddle.
    assert bm.most_blocks_held(1000, 16) == bm.blocks_for(6 - 1 + 32) + 1
    assert BlockManager(16, BS).most_blocks_held(1000, 16) == 250
    bm.free("a")
    bm.free("b")
    assert bm.num_free == 16
    bm.check_invariants()


def test_a_waiting_sequences_keys_are_kept_and_stay_right_as_it_grows():
    bm = BlockManager(8, BS)
    run_to_end(bm, "a", list(range(13)))          # 3 full blocks registered
    tokens = list(range(6))
    assert bm.cached_prefix(tokens, "w") == bm.cached_prefix(tokens)       # 1 block
    kept = bm._lookup_keys["w"]
    tokens += list(range(6, 13))
    assert bm.cached_prefix(tokens, "w") == bm.cached_prefix(tokens)       # grown: 3 blocks
    assert bm._lookup_keys["w"][:1] == kept and len(bm._lookup_keys["w"]) == 3
    bm.take_prefix("w", bm.cached_prefix(tokens, "w"), len(tokens))
    assert "w" not in bm._lookup_keys                                      # admitted: dropped
    bm.free("w")
    bm.check_invariants()


def test_engine_arguments_of_the_wrong_type_are_a_clear_error(tiny_llama_dir):
    from engine.errors import ConveyorError

    for bad in ({"enable_prefix_caching": "no"}, {"kv_cache_bytes": "lots"}, {"bogus": 1}):
        with pytest.raises(ConveyorError, match="invalid engine argument"):
            LLM(str(tiny_llama_dir), **bad)
