"""The engine end to end on a tiny random llama: batching changes nothing."""

import asyncio

import mlx.core as mx
import numpy as np
import pytest

from engine import LLM, RequestError, SamplingParams
from engine.core.sampler import RowNeeds
from engine.loading.loader import load_model

GREEDY = dict(temperature=0, ignore_eos=True)


def random_prompts(n, low, high, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(k)).tolist() for k in rng.integers(low, high, size=n)]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_all_blocks_free(llm):
    blocks = llm.engine.blocks
    blocks.check_invariants()
    assert blocks.num_free == blocks.num_blocks
    assert not llm.engine.has_unfinished()


def test_matches_full_recompute_oracle(tiny_llama_dir, tiny_llm):
    model, _ = load_model(tiny_llama_dir)
    prompts = random_prompts(3, 1, 80)
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(12):
            ids.append(int(mx.argmax(model(mx.array(ids))[-1]).item()))
        assert out.outputs[0].token_ids == ids[len(prompt):]


def test_batch_invariance_24_prompts(tiny_llm):
    prompts = random_prompts(24, 1, 600, seed=1)
    rng = np.random.default_rng(2)
    params = [SamplingParams(max_tokens=int(m), **GREEDY) for m in rng.integers(1, 24, size=24)]
    together = tiny_llm.generate(prompts, params, use_tqdm=False)
    alone = [tiny_llm.generate([p], [s], use_tqdm=False)[0] for p, s in zip(prompts, params)]
    assert token_ids(together) == token_ids(alone)
    assert [len(t) for t in token_ids(together)] == [p.max_tokens for p in params]
    assert_all_blocks_free(tiny_llm)


def test_preemption_gives_the_same_tokens(tiny_llama_dir):
    prompts = random_prompts(16, 20, 60, seed=3)
    params = SamplingParams(max_tokens=40, **GREEDY)
    big = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    # 2 layers x 2 kv heads x 16 dims x 4 bytes x 2 (K,V) x 16 tokens = 8 KiB a block;
    # 19 blocks hold about three 100-token sequences.
    small = LLM(str(tiny_llama_dir), kv_cache_bytes=19 * 8192, max_model_len=128)
    expected = big.generate(prompts, params, use_tqdm=False)
    got = small.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert small.stats().preemptions > 0
    assert_all_blocks_free(small)


def test_chunked_prefill_matches_unchunked(tiny_llama_dir):
    prompt = random_prompts(1, 500, 501, seed=4)[0]
    params = SamplingParams(max_tokens=16, **GREEDY)
    whole = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=2048)
    chunked = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=32)
    assert token_ids(chunked.generate([prompt], params, use_tqdm=False)) == token_ids(
        whole.generate([prompt], params, use_tqdm=False))
    assert chunked.stats().steps >= 500 // 32 + 15


def test_seeded_sampling_same_alone_or_batched(tiny_llm):
    prompts = random_prompts(6, 5, 50, seed=5)
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=i,
                             ignore_eos=True) for i in range(6)]
    together = tiny_llm.generate(prompts, params, use_tqdm=False)
    alone = [tiny_llm.generate([p], [s], use_tqdm=False)[0] for p, s in zip(prompts, params)]
    assert token_ids(together) == token_ids(alone)
    unseeded = SamplingParams(max_tokens=20, temperature=0.9, ignore_eos=True)
    a, b = tiny_llm.generate([prompts[0]] * 2, unseeded, use_tqdm=False)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids   # no seed: different draws


def test_sampling_filters_restrict_the_draw(tiny_llm):
    prompt = random_prompts(1, 10, 11, seed=6)[0]
    greedy = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, **GREEDY),
                               use_tqdm=False)[0].outputs[0].token_ids
    top1 = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.5, top_k=1,
                                                      seed=1, ignore_eos=True), use_tqdm=False)
    tiny_p = tiny_llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.5,
                                                        top_p=1e-6, seed=2, ignore_eos=True),
                               use_tqdm=False)
    strict_min_p = tiny_llm.generate([prompt], SamplingParams(
        max_tokens=8, temperature=1.5, min_p=1.0, seed=3, ignore_eos=True), use_tqdm=False)
    assert top1[0].outputs[0].token_ids == greedy
    assert tiny_p[0].outputs[0].token_ids == greedy
    assert strict_min_p[0].outputs[0].token_ids == greedy


def test_repetition_penalty_changes_repeats(tiny_llm):
    prompt = [65] * 30
    plain = tiny_llm.generate([prompt], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)
    penal = tiny_llm.generate([prompt], SamplingParams(max_tokens=20, repetition_penalty=5.0,
                                                       presence_penalty=2.0, **GREEDY),
                              use_tqdm=False)
    p_ids, q_ids = plain[0].outputs[0].token_ids, penal[0].outputs[0].token_ids
    assert p_ids != q_ids
    assert len(set(q_ids)) >= len(set(p_ids))


def test_stop_string_spanning_tokens_is_cut(tiny_llm):
    prompt = random_prompts(1, 30, 31, seed=7)[0]
    # Each tiny-model token is one byte, so a 3-character stop spans >= 2 tokens;
    # take the first seed whose text has a clean 3-character run to stop on.
    for seed in range(7, 40):
        sampled = dict(temperature=1.0, seed=seed, ignore_eos=True)
        full = tiny_llm.generate([prompt], SamplingParams(max_tokens=30, **sampled),
                                 use_tqdm=False)[0].outputs[0]
        text = full.text
        assert len(full.token_ids) == 30 and full.finish_reason == "length"
        start = next((i for i in range(5, len(text) - 3) if "\ufffd" not in text[i:i + 3]
                      and text.find(text[i:i + 3]) == i), None)
        if start is not None:
            break
    stop = text[start:start + 3]
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=30, stop=[stop], **sampled),
                            use_tqdm=False)[0].outputs[0]
    assert out.text == text[:start]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < 30
    streamed = list(tiny_llm.stream(prompt, SamplingParams(max_tokens=30, stop=[stop],
                                                           **sampled)))
    assert "".join(d.outputs[0].text for d in streamed) == text[:start]
    assert_all_blocks_free(tiny_llm)


def test_stop_token_and_logprobs(tiny_llm):
    prompt = random_prompts(1, 20, 21, seed=8)[0]
    base = tiny_llm.generate([prompt], SamplingParams(max_tokens=10, logprobs=3, **GREEDY),
                             use_tqdm=False)[0].outputs[0]
    lp = base.logprobs
    assert len(lp) == 10 and all(x.logprob <= 0 for x in lp)
    assert all(x.top[0][0] == x.token_id and len(x.top) == 3 for x in lp)  # greedy = best
    stop_tok = base.token_ids[4]
    out = tiny_llm.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=[stop_tok],
                                                     **GREEDY), use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_sampler_skips_only_the_options_no_live_request_uses(tiny_llm):
    """The engine tells the sampler which options (penalties, random draws,
    logprobs) no live request uses, so it does not check each row for them;
    a request using all three, added beside greedy ones, still gets them."""
    engine = tiny_llm.engine
    prompts = random_prompts(3, 10, 20, seed=12)
    special = SamplingParams(max_tokens=6, temperature=1.0, seed=4, logprobs=1,
                             repetition_penalty=1.3, ignore_eos=True)
    alone = tiny_llm.generate([prompts[2]], special, use_tqdm=False)[0].outputs[0]
    assert engine._row_needs.needs == RowNeeds(False, False, False)
    for p in prompts[:2]:
        engine.add_request(p, SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(3):
        engine.step()
    late = engine.add_request(prompts[2], special)
    assert engine._row_needs.needs == RowNeeds(True, True, True)
    while engine.has_unfinished():
        engine.step()
    out = late.output(delta=False).outputs[0]
    assert out.token_ids == alone.token_ids
    assert np.allclose([x.logprob for x in out.logprobs], [x.logprob for x in alone.logprobs],
                       atol=1e-4)
    assert engine._row_needs.needs == RowNeeds(False, False, False)
    assert_all_blocks_free(tiny_llm)


def test_too_long_request_is_rejected_and_others_run(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_model_len=128)
    with pytest.raises(RequestError, match="context of 128"):
        llm.generate([[1] * 200], SamplingParams(max_tokens=4))
    small = LLM(str(tiny_llama_dir), kv_cache_bytes=4 * 8192, max_model_len=64)  # 64 tokens
    with pytest.raises(RequestError, match="context of 64"):
        small.generate([[1] * 60], SamplingParams(max_tokens=10))
    ok = small.generate([[1] * 20], SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 10
    assert_all_blocks_free(small)


def test_abort_mid_generation_frees_blocks(tiny_llm):
    engine = tiny_llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=50, **GREEDY))
            for p in random_prompts(4, 10, 40, seed=9)]
    for _ in range(5):
        engine.step()
    assert engine.blocks.num_used > 0
    for r in reqs[:2]:
        engine.abort_request(r.request_id)
    assert reqs[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert reqs[2].output(delta=False).outputs[0].finish_reason == "length"
    assert_all_blocks_free(tiny_llm)


def test_exception_in_a_step_frees_every_block(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    reqs = [engine.add_request(p, SamplingParams(max_tokens=30, **GREEDY))
            for p in random_prompts(5, 10, 40, seed=10)]
    engine.step()
    engine.step()

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine.runner, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert all(r.finish_reason == "abort" and "injected" in r.error for r in reqs)
    assert_all_blocks_free(tiny_llm)
    monkeypatch.undo()
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3       # the engine still works


def test_stream_deltas_add_up_to_generate(tiny_llm):
    prompt = random_prompts(1, 10, 11, seed=11)[0]
    params = SamplingParams(max_tokens=25, **GREEDY)
    whole = tiny_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    deltas = list(tiny_llm.stream(prompt, params))
    assert "".join(d.outputs[0].text for d in deltas) == whole.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == whole.token_ids
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"


def test_outputs_in_input_order_with_metrics(tiny_llm):
    prompts = ["hello", "a much longer prompt than the first one", "x"]
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.prompt_token_ids) for o in outs] == [len(p.encode()) for p in prompts]
    for o in outs:
        assert 0 <= o.metrics.time_to_first_token <= o.metrics.e2e_latency


def test_async_llm_many_concurrent(tiny_llama_dir, tiny_llm):
    from engine.entrypoints.async_llm import AsyncLLM

    prompts = random_prompts(12, 5, 60, seed=12)
    params = SamplingParams(max_tokens=15, **GREEDY)
    expected = token_ids(tiny_llm.generate(prompts, params, use_tqdm=False))
    allm = AsyncLLM(engine=tiny_llm.engine)

    async def one(p):
        ids = []
        async for delta in allm.generate(p, params):
            ids += delta.outputs[0].token_ids
        return ids

    async def early_exit(p):
        async for _ in allm.generate(p, SamplingParams(max_tokens=200, **GREEDY)):
            break   # the client goes away: the request is aborted

    async def main():
        await early_exit(prompts[0])
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        assert asyncio.run(main()) == expected
    finally:
        allm.close()
    assert_all_blocks_free(tiny_llm)


def test_invalid_sampling_params():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(min_p=2)]:
        with pytest.raises(RequestError):
            SamplingParams(**bad)
