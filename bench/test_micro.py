"""Micro-benchmarks of the per-step host work at 256 running sequences.

    python -m pytest bench/test_micro.py --benchmark-only
Compare each with `test_forward_decode_256`: a SmolLM2 decode step's forward.
"""

import mlx.core as mx
import numpy as np
import pytest

import engine  # noqa: F401  (preloads the BLAS)
from engine.core.sampler import SamplingRow, sample
from engine.core.sampling_params import SamplingParams
from kvcache.block_manager import BlockManager
from scheduler import Scheduler, SchedulerConfig, Sequence

ROWS = 256


def running_scheduler() -> Scheduler:
    s = Scheduler(SchedulerConfig(max_num_seqs=ROWS, max_num_batched_tokens=ROWS * 128,
                                  max_model_len=8192),
                  BlockManager(ROWS * 20, 16))
    for i in range(ROWS):
        s.add(Sequence(f"r{i}", list(range(128)), max_tokens=4000))
    out = s.schedule()
    s.update(out, [1] * len(out.chunks))
    return s


def test_scheduler_step_256(benchmark):
    s = running_scheduler()

    def step():
        out = s.schedule()
        s.update(out, [1] * len(out.chunks))

    benchmark(step)


def test_block_manager_append_free_256(benchmark):
    bm = BlockManager(ROWS * 20, 16)

    def cycle():
        for i in range(ROWS):
            bm.allocate(f"s{i}", 200)
        for i in range(ROWS):
            bm.free(f"s{i}")

    benchmark(cycle)


@pytest.mark.parametrize("kind", ["greedy", "top_p"])
def test_sampler_256(benchmark, kind):
    logits = mx.random.normal((ROWS, 49152))
    mx.eval(logits)
    params = (SamplingParams(temperature=0) if kind == "greedy"
              else SamplingParams(temperature=0.8, top_p=0.9, top_k=50))
    rows = [SamplingRow(params, i, [], [1, 2, 3]) for i in range(ROWS)]
    benchmark(lambda: sample(logits, rows).token_ids.tolist())


def test_detokenizer_256_tokens(benchmark, smollm_dir):
    from engine.loading.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer.from_dir(smollm_dir)
    ids = np.random.default_rng(0).integers(100, 40000, size=ROWS).tolist()

    def one_step_for_256_requests():
        for t in ids:  # one token for each of 256 running requests
            detoks[t % len(detoks)].add(t)

    detoks = [IncrementalDetokenizer(tok) for _ in range(ROWS)]
    benchmark(one_step_for_256_requests)


def test_forward_decode_256(benchmark, smollm_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine
    from engine.loading.loader import load_model
    from engine.loading.tokenizer import Tokenizer

    model, config = load_model(smollm_dir)
    eng = LLMEngine(model, Tokenizer.from_dir(smollm_dir), config,
                    EngineArgs(kv_cache_bytes=1 << 30, max_num_batched_tokens=ROWS * 16))
    for i in range(ROWS):
        eng.add_request(list(range(100, 116)), SamplingParams(max_tokens=2000, temperature=0,
                                                               ignore_eos=True))
    eng.step()

    benchmark.pedantic(eng.step, rounds=3, iterations=1)
