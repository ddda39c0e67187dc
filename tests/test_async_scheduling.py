"""Asynchronous scheduling (step N+1 planned and launched before step N's
tokens reach the host) gives exactly the tokens of one step at a time."""

import numpy as np
import pytest

from engine import LLM, SamplingParams
from scheduler.sequence import PENDING


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(k)).tolist() for k in rng.integers(3, 90, size=n)]


def engines(tiny_llama_dir, **kwargs):
    # The portable MLX path: the CPU's host forward always runs one step at a time.
    common = dict(host_forward=False, **{"kv_cache_bytes": 16 << 20, **kwargs})
    return (LLM(str(tiny_llama_dir), async_scheduling=False, **common),
            LLM(str(tiny_llama_dir), async_scheduling=True, **common))


def outputs(llm, ps, params):
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
             o.outputs[0].stop_reason)
            for o in llm.generate(ps, params, use_tqdm=False)]


def test_engine_runs_async(tiny_llama_dir):
    _, fast = engines(tiny_llama_dir)
    assert fast.engine.async_scheduling
    assert not LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20).engine.async_scheduling


@pytest.mark.parametrize("case", ["greedy", "seeded", "stops", "logprobs"])
def test_same_tokens_as_one_step_at_a_time(tiny_llama_dir, case):
    sync, fast = engines(tiny_llama_dir, kv_cache_bytes=16 << 20)
    ps = prompts(12)
    rng = np.random.default_rng(1)
    lengths = [int(m) for m in rng.integers(1, 30, size=len(ps))]
    extra = {"greedy": dict(temperature=0, ignore_eos=True),
             "seeded": dict(temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
             # EOS (258) and stop tokens end sequences at steps the host learns late.
             "stops": dict(temperature=1.5, seed=3, stop_token_ids=[65, 66, 67, 68]),
             "logprobs": dict(temperature=0.7, seed=2, logprobs=3, ignore_eos=True)}[case]
    params = [SamplingParams(max_tokens=m, **extra) for m in lengths]
    expected = outputs(sync, ps, params)
    assert outputs(fast, ps, params) == expected
    if case == "stops":
        assert any(r == "stop" for _, _, r, _ in expected)
    assert not fast.engine.has_unfinished()
    assert fast.engine.blocks.num_free == fast.engine.blocks.num_blocks


def test_preemption_and_prefix_cache(tiny_llama_dir):
    # 19 blocks of 8 KiB: preempts (see test_engine); a shared prefix hits the cache.
    sync, fast = engines(tiny_llama_dir, kv_cache_bytes=19 * 8192, max_model_len=128)
    shared = list(range(40, 80))
    ps = [shared + p[:10] for p in prompts(10, seed=4)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    assert outputs(fast, ps, params) == outputs(sync, ps, params)
    assert fast.engine.stats().preemptions > 0
    assert fast.engine.stats().prefix_cache_hits > 0
    fast.engine.blocks.check_invariants()


def test_abort_and_stream_while_a_step_is_in_flight(tiny_llama_dir):
    _, fast = engines(tiny_llama_dir)
    eng = fast.engine
    reqs = [eng.add_request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
            for p in prompts(4, seed=5)]
    eng.step()
    eng.step()
    assert eng._in_flight is not None
    eng.abort_request(reqs[0].request_id)
    for r in reqs:  # what callers see never holds a token still on its way
        assert PENDING not in r.output(delta=False).outputs[0].token_ids
    while eng.has_unfinished():
        eng.step()
    assert reqs[0].finish_reason == "abort"
    assert all(len(r.sequence.output_token_ids) == 20 for r in reqs[1:])
    assert all(PENDING not in r.sequence.token_ids for r in reqs)
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_penalties_run_one_step_at_a_time(tiny_llama_dir):
    sync, fast = engines(tiny_llama_dir)
    ps = prompts(6, seed=6)
    params = SamplingParams(max_tokens=15, temperature=0, repetition_penalty=1.3,
                            presence_penalty=0.5, ignore_eos=True)
    assert outputs(fast, ps, params) == outputs(sync, ps, params)


def test_a_sequence_whose_last_token_is_in_flight_is_not_scheduled_again(tiny_llama_dir):
    _, fast = engines(tiny_llama_dir)
    eng = fast.engine
    chunks = []
    schedule = eng.scheduler.schedule

    def counted():
        out = schedule()
        chunks.extend(out.chunks)
        return out
    eng.scheduler.schedule = counted
    req = eng.add_request(list(range(5, 25)), SamplingParams(max_tokens=3, temperature=0,
                                                             ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert len(req.sequence.output_token_ids) == 3
    # The prompt, then two decode steps: the third token is the last one.
    assert len(chunks) == 3
