"""Correctness on the GPU before timing anything.

    PYTHONPATH=$PWD python3 bench/gpu_check.py

Checks the CUDA attention kernel against the portable path, greedy tokens against
mlx-lm on the same weights, compiled against uncompiled decode steps, and a run
under a KV budget tight enough to preempt against an unconstrained one, and
seeded sampling alone against batched.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step

import engine  # noqa: F401  (preloads the BLAS on the CPU)
from bench.cli import _mlx_lm_twin
from bench.synthetic import NullTokenizer, synthetic_model
from engine import SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from kvcache.attention import cuda as cuda_attention

GREEDY = dict(temperature=0)


def run(model, config, prompts, sampling=GREEDY, **engine_args):
    eng = LLMEngine(model, NullTokenizer(), config, EngineArgs(**engine_args))
    reqs = [eng.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True, detokenize=False,
                                              **sampling)) for p in prompts]
    while eng.has_unfinished():
        eng.step()
    return eng, [r.sequence.output_token_ids for r in reqs]


def main() -> None:
    print("kernel verified:", cuda_attention.available(), flush=True)
    model, config = synthetic_model("smollm2", mx.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 40000, size=int(n)).tolist()
               for n in rng.integers(5, 300, size=8)]
    eng, tokens = run(model, config, prompts, kv_cache_bytes=1 << 30)
    print("decode kernel in use:", eng.cache.backend.name == "cuda")
    twin = _mlx_lm_twin(model, config)
    same = sum([int(t) for t, _ in generate_step(mx.array(p), twin, max_tokens=24)] == ours
               for p, ours in zip(prompts, tokens))
    print(f"greedy equal to mlx-lm: {same}/{len(prompts)}", flush=True)
    _, uncompiled = run(model, config, prompts, kv_cache_bytes=1 << 30, compile=False)
    print("compiled == uncompiled:", tokens == uncompiled, flush=True)
    _, portable = run(model, config, prompts, kv_cache_bytes=1 << 30, paged_kernel=False)
    print("kernel == portable path:", tokens == portable, flush=True)
    # 40 blocks of 16 tokens: less than the 8 prompts need at once (and more
    # than one sequence of max_model_len, as the memory plan requires).
    per_block = 16 * 30 * 3 * 64 * 4 * 2
    tight, preempted = run(model, config, prompts, kv_cache_bytes=40 * per_block,
                           max_model_len=512)
    print("preempted run equal:", tokens == preempted, "preemptions:",
          tight.stats().preemptions, flush=True)
    # Seeded sampling (the sampler's MLX path on a GPU): alone == batched.
    for params in (dict(temperature=0.8, seed=5), dict(temperature=0.8, top_p=0.9, seed=5)):
        _, batched = run(model, config, prompts, params, kv_cache_bytes=1 << 30)
        alone = [run(model, config, [p], params, kv_cache_bytes=1 << 30)[1][0] for p in prompts]
        print(f"seeded sampling {params}: alone == batched:", alone == batched, flush=True)


if __name__ == "__main__":
    main()
