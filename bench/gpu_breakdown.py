"""Where a GPU decode step goes: the whole compiled forward, the attention
kernel alone, and the forward with attention taken out.

Run on the GPU machine (see shared/gpu/README.md):
    PYTHONPATH=$PWD python3 -m bench.gpu_breakdown [--model llama-8b] [--n 256]
Sequences are prefilled with 128-token prompts and decoded to a context of
about 192 tokens (the middle of the decode-heavy workload) before timing.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx

import engine  # noqa: F401
from bench import workloads
from bench.gpu_suite import kv_budget
from bench.synthetic import NullTokenizer, synthetic_model
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.sampling_params import SamplingParams
from kvcache import paged_cache
from kvcache.attention import cuda as cuda_attention


def timed(fn, repeat: int = 10) -> float:
    fn()
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    mx.synchronize()
    return (time.perf_counter() - t) / repeat * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-8b")
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    model, config = synthetic_model(args.model, mx.bfloat16)
    work = workloads.decode_heavy(args.n, 128, 128)
    eng = LLMEngine(model, NullTokenizer(), config,
                    EngineArgs(kv_cache_bytes=kv_budget(model, work)))
    for p in work.prompts:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True,
                                          detokenize=False))
    while eng.stats().steps < 4 + 64:  # prefill, then decode to context ~192
        eng.step()
    out = eng.scheduler.schedule()
    batch = eng.runner.prepare(out)
    cache, meta = eng.cache, batch.meta
    result = {"model": args.model, "n": args.n, "compiled": batch.compiled}
    result["forward_ms"] = timed(lambda: mx.eval(eng.runner.forward(batch)))
    # The attention kernel alone, for every layer of one step.
    a = model.args
    q = mx.random.normal((batch.num_padded, a.num_attention_heads, a.head_dim)).astype(
        mx.bfloat16)
    kv = mx.random.normal((batch.num_padded, a.num_key_value_heads, a.head_dim)).astype(
        mx.bfloat16)
    if cache.backend.name == "cuda":
        def attention():
            outs = [cuda_attention.paged_attention(
                q, cache.k[i], cache.v[i], kv, kv, meta, a.head_dim**-0.5, cache.block_size,
                cache.n_kv_heads) for i in range(cache.num_layers)]
            mx.eval(outs)
        result["attention_kernel_ms"] = timed(attention)
    # The same step's forward with attention replaced by its input (uncompiled,
    # and uncompiled with attention, so the two compare).
    result["forward_uncompiled_ms"] = timed(lambda: mx.eval(eng.model(
        batch.input_ids, batch.positions, cache.views(meta))))
    view = paged_cache.PagedLayerView
    original = view.attend, view.packs_qkv
    view.attend = lambda self, q, k, v, scale, *rest: q
    view.packs_qkv = lambda self, rope: False
    try:
        result["forward_without_attention_ms"] = timed(lambda: mx.eval(eng.model(
            batch.input_ids, batch.positions, cache.views(meta))))
    finally:
        view.attend, view.packs_qkv = original
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
