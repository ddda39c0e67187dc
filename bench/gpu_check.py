# Correctness on the GPU: kernel vs portable, engine tokens vs mlx-lm twin greedy.
import engine, time, mlx.core as mx, numpy as np
from kvcache import cuda_paged_attention as c
print("kernel verified:", c.available(), flush=True)
from bench.synthetic import synthetic_model, NullTokenizer
from bench.cli import _mlx_lm_twin
from engine.llm_engine import EngineArgs, LLMEngine
from engine import SamplingParams
m, cfg = synthetic_model("smollm2", mx.float32)
eng = LLMEngine(m, NullTokenizer(), cfg, EngineArgs(kv_cache_bytes=1<<30))
print("decode kernel in use:", eng.cache.decode_kernel)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 40000, size=int(n)).tolist() for n in rng.integers(5, 300, size=8)]
reqs = [eng.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, detokenize=False)) for p in prompts]
while eng.has_unfinished(): eng.step()
from mlx_lm.generate import generate_step
twin = _mlx_lm_twin(m, cfg)
same = 0
for p, r in zip(prompts, reqs):
    ref = [int(t) for t, _ in generate_step(mx.array(p), twin, max_tokens=24)]
    same += ref == r.sequence.output_token_ids
print(f"greedy equal to mlx-lm: {same}/{len(prompts)}", flush=True)

# The same with decode steps uncompiled: tokens must not change.
eng2 = LLMEngine(m, NullTokenizer(), cfg, EngineArgs(kv_cache_bytes=1 << 30, compile=False))
reqs2 = [eng2.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                            detokenize=False)) for p in prompts]
while eng2.has_unfinished():
    eng2.step()
print("compiled == uncompiled:", [r.sequence.output_token_ids for r in reqs]
      == [r.sequence.output_token_ids for r in reqs2], flush=True)
# Preemption under a tight budget gives the same tokens.
eng3 = LLMEngine(m, NullTokenizer(), cfg, EngineArgs(kv_cache_bytes=40 * 16 * 30 * 3 * 64 * 4 * 2))
reqs3 = [eng3.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                            detokenize=False)) for p in prompts]
while eng3.has_unfinished():
    eng3.step()
print("preempted run equal:", [r.sequence.output_token_ids for r in reqs]
      == [r.sequence.output_token_ids for r in reqs3], "preemptions:", eng3.stats().preemptions,
      flush=True)
