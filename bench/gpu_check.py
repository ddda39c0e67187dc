"""Correctness on the GPU before timing anything.

    PYTHONPATH=$PWD python3 bench/gpu_check.py

Checks the CUDA attention kernel against the portable path, greedy tokens against
mlx-lm on the same weights, compiled against uncompiled decode steps, and a run
under a KV budget tight enough to preempt against an unconstrained one, and
seeded sampling alone against batched. Then the same for the sliding-window
families (Gemma 2 with soft-capping, Gemma 3, Mistral) on tiny random
checkpoints with head_dim 64, which the kernel serves: the kernel with its
window and cap checked at start-up, greedy tokens against mlx-lm given
transformers' window masks, and Mistral's blocks given back behind its window.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

# Full float32 matmuls: MLX runs float32 GEMMs as TF32 on CUDA by default
# (MLX_ENABLE_TF32=1, ~1e-3 relative), and cuBLAS picks its algorithm by
# batch shape, so a request alone and in a batch then sees logits ~1e-3
# apart and a seeded draw near a boundary may differ (seen once in four
# runs, bench/results/h200_s7_gpu_check_final.log). These checks are about
# the engine's own arithmetic, which TF32's rounding would hide.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np
from mlx_lm.generate import generate_step

import engine  # noqa: F401  (preloads the BLAS on the CPU)
from bench.cli import _mlx_lm_twin
from bench.synthetic import NullTokenizer, synthetic_model
from engine import SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.loading.loader import load_model
from kvcache.attention import cuda as cuda_attention
from kvcache.attention import dense_prefill
from kvcache.attention.metadata import AttentionSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mlx_lm_oracle import oracle, oracle_greedy, short_longrope  # noqa: E402
from tiny_models import (  # noqa: E402
    TINY_QWEN2,
    TINY_QWEN3,
    TINY_SLIDING,
    longrope,
    write_tiny_llama,
    write_tiny_phi3,
)


def _families() -> dict:
    """Every architecture as a tiny checkpoint writer (head_dim 64, which the
    kernel serves, where the family allows) and each layer's window."""
    out = {name: (lambda path, c=config: write_tiny_llama(path, **{**c, "head_dim": 64}),
                  windows) for name, (config, windows) in TINY_SLIDING.items()}
    for name, config in (("qwen2", TINY_QWEN2), ("qwen3", TINY_QWEN3)):
        out[name] = (lambda path, c=config: write_tiny_llama(
            path, **{**c, "hidden_size": 256, "head_dim": 64}), [None, None])
    out["phi3"] = (lambda path: write_tiny_phi3(path, hidden_size=256,
                                                rope_scaling=longrope(64)), [None, None])
    return out

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
    # Every fresh prompt chunk through dense attention (the prompts are shorter
    # than its default threshold): the same tokens as the kernel's.
    dense_calls, real_dense = [], dense_prefill.attend
    saved, dense_prefill.MIN_CHUNK = dense_prefill.MIN_CHUNK, 2
    dense_prefill.attend = lambda plan, *a, **k: dense_calls.append(1) or real_dense(plan, *a, **k)
    _, dense = run(model, config, prompts, kv_cache_bytes=1 << 30)
    dense_prefill.attend = real_dense
    dense_prefill.MIN_CHUNK = saved
    print(f"dense prefill == kernel prefill: {dense == tokens} ({len(dense_calls)} layer calls)",
          flush=True)
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
    with tempfile.TemporaryDirectory() as tmp:
        for name, (writer, windows) in _families().items():
            check_family(name, writer(Path(tmp) / name), windows)


def check_family(name: str, path: Path, windows: list[int | None]) -> None:
    model, config = load_model(path, dtype="float32")
    capped = config.get("attn_logit_softcapping") is not None
    sliding = any(w is not None for w in windows)
    head_dim = model.args.head_dim
    spec = AttentionSpec(config["num_attention_heads"], config["num_key_value_heads"],
                         head_dim, 16, mx.float32, sliding_window=sliding, softcap=capped)
    print(f"{name}: kernel (head_dim {head_dim}) verified"
          f"{' with window' if sliding else ''}{' and softcap' if capped else ''}:",
          cuda_attention.available(spec), flush=True)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 320, size=int(n)).tolist() for n in (3, 9, 40, 130, 300)]
    eng, tokens = run(model, config, prompts, kv_cache_bytes=64 << 20)
    print(f"{name}: decode kernel in use:", eng.cache.backend.name == "cuda")
    reference = oracle(path, windows)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "longrope":  # mlx-lm rotates with the long factors only
        short_longrope(reference, scaling)
    same = 0
    for prompt, ours in zip(prompts, tokens):
        theirs, logprobs = oracle_greedy(reference, prompt, 24)
        same += theirs == ours
        if theirs != ours:  # a near-tie (float rounding) or a real difference?
            at = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            gap = logprobs[at][theirs[at]] - logprobs[at][ours[at]]
            print(f"{name}: prompt of {len(prompt)} differs at token {at}: oracle's "
                  f"log-prob lead over ours {gap:.2e}", flush=True)
    print(f"{name}: greedy equal to mlx-lm with transformers' windows: {same}/{len(prompts)}",
          flush=True)
    hf = transformers_greedy(path, prompts, 24)
    if isinstance(hf, list):
        hf = f"{sum(a == b for a, b in zip(hf, tokens))}/{len(prompts)}"
    print(f"{name}: greedy equal to transformers: {hf}", flush=True)
    _, uncompiled = run(model, config, prompts, kv_cache_bytes=64 << 20, compile=False)
    _, portable = run(model, config, prompts, kv_cache_bytes=64 << 20, paged_kernel=False)
    print(f"{name}: compiled == uncompiled:", tokens == uncompiled, "kernel == portable path:",
          tokens == portable, flush=True)
    if name == "mistral":  # every layer slides: blocks behind the window go back
        chunked, out = run(model, config, prompts[-1:], kv_cache_bytes=64 << 20,
                           max_num_batched_tokens=64)
        print(f"{name}: chunked prefill equal:", out == tokens[-1:], "peak blocks for 324 "
              f"tokens in 64-token chunks: {chunked.blocks.peak_used} (21 without the window)",
              flush=True)


def transformers_greedy(path: Path, prompts: list[list[int]], n: int):
    """transformers' greedy tokens for the checkpoint (eager attention, the one
    that soft-caps; the whole sequence recomputed a token), or why not."""
    try:
        import torch
        from transformers import AutoModelForCausalLM

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # transformers wants one model.safetensors (or an index) next to config.json.
        hf_dir = path / "transformers"
        hf_dir.mkdir(exist_ok=True)
        shutil.copy(path / "config.json", hf_dir / "config.json")
        weights = {}
        for shard in sorted(path.glob("*.safetensors")):
            weights.update(mx.load(str(shard)))
        mx.save_safetensors(str(hf_dir / "model.safetensors"), weights)
        model = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="eager").to(device).eval()
        outs = []
        for prompt in prompts:
            tokens = list(prompt)
            with torch.no_grad():
                for _ in range(n):
                    logits = model(torch.tensor([tokens], device=device)).logits[0, -1]
                    tokens.append(int(logits.argmax()))
            outs.append(tokens[len(prompt):])
        return outs
    except Exception as exc:  # no torch here, or a loading problem: say which
        return f"not compared ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"


if __name__ == "__main__":
    main()
