"""The CPU paged-attention kernel against a numpy reference and against the
portable MLX path, and the CPU fast SiLU against MLX's."""

import mlx.core as mx
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.platform import current_platform, native
from kvcache.attention import cpu as cpa

GREEDY = dict(temperature=0, ignore_eos=True)


def build_kernel(head_dim, block_size, kv_dtype=np.float32, variant=None):
    """The kernel from this CPU's native library (or `variant`'s). A missing
    library fails: CI must not pass without the fast path."""
    kernels = native.load(variant)
    assert kernels.library is not None, kernels.reason
    return cpa.CpuPagedAttention(kernels.library, head_dim, block_size, threads=2,
                                 kv_dtype=kv_dtype)


def reference(q, keys, values, tables, qrow, ctx, block_size, scale, window=None,
              softcap=None):
    """Plain numpy attention over logical per-slot keys/values [slots, Hkv, D]:
    each query sees its context's last `window` slots (all without one), its
    scores soft-capped at `softcap` if given."""
    n, heads, _ = q.shape
    group = heads // keys.shape[1]
    out = np.zeros_like(q)
    for i in range(n):
        if ctx[i] == 0:
            continue
        table = tables[qrow[i]]
        slots = (table[:, None] * block_size + np.arange(block_size)).reshape(-1)[:ctx[i]]
        slots = slots[-window:] if window else slots
        for h in range(heads):
            k, v = keys[slots, h // group], values[slots, h // group]
            s = k @ q[i, h] * scale
            s = softcap * np.tanh(s / softcap) if softcap else s
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size",
                         [(64, 9, 3, 16), (16, 4, 2, 16), (32, 8, 8, 8), (64, 8, 2, 16),
                          (128, 4, 1, 16), (128, 10, 2, 32), (80, 20, 2, 16)])
def test_kernel_matches_reference(head_dim, heads, kv_heads, block_size):
    """Specialised shapes (head_dim 64 / 128, blocks of 16) and generic ones."""
    kernel = build_kernel(head_dim, block_size)
    assert kernel.specialised == (head_dim in (64, 128) and block_size == 16)
    rng = np.random.default_rng(0)
    num_blocks, width = 128, 160 // block_size + 1
    k_flat = np.zeros(num_blocks * block_size * kv_heads * head_dim, np.float32)
    v_flat = np.zeros_like(k_flat)
    k_pool, v_pool = kernel.pool_views(k_flat, v_flat, kv_heads)
    slots = num_blocks * block_size
    keys = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
    values = rng.standard_normal((slots, kv_heads, head_dim)).astype(np.float32)
    # Written in a shuffled order: the layout, not the order, must matter.
    order = rng.permutation(slots)
    kernel.write(k_pool, v_pool, order, keys[order], values[order])
    tables = rng.permutation(num_blocks)[:4 * width].reshape(4, width).astype(np.int32)
    # Decode-like rows (one query each), a prompt chunk (consecutive positions
    # of one table: causal), a context of exactly one block, and padding (0).
    qrow = np.array([0, 1, 2, 2, 2, 2, 3, 0], np.int32)
    ctx = np.array([1, 150, 37, 38, 39, 40, block_size, 0], np.int32)
    q = rng.standard_normal((len(qrow), heads, head_dim)).astype(np.float32)
    scale = head_dim ** -0.5
    got = kernel(q, k_pool, v_pool, tables, qrow, ctx, scale)
    want = reference(q, keys, values, tables, qrow, ctx, block_size, scale)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert not got[-1].any()


@pytest.mark.parametrize("window,softcap,kv_dtype", [(1, None, np.float32),
                                                     (5, None, np.float32),
                                                     (16, 2.0, np.float32),
                                                     (37, 1.5, np.float16),
                                                     (None, 3.0, np.float32)])
def test_sliding_window_and_softcap_match_reference(window, softcap, kv_dtype):
    """A window inside one block, one block long, crossing blocks; soft-capped
    scores (caps low enough to change them). Blocks wholly before every
    query's window are unreadable (NaN): the kernel must not touch them."""
    block_size, heads, kv_heads, head_dim = 16, 8, 2, 64
    kernel = build_kernel(head_dim, block_size, kv_dtype)
    rng = np.random.default_rng(1)
    num_blocks, width = 24, 8
    k_flat = np.zeros(num_blocks * block_size * kv_heads * head_dim, kv_dtype)
    v_flat = np.zeros_like(k_flat)
    k_pool, v_pool = kernel.pool_views(k_flat, v_flat, kv_heads)
    keys = rng.standard_normal((num_blocks * block_size, kv_heads, head_dim)).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    slots = np.arange(len(keys))
    kernel.write(k_pool, v_pool, slots, keys, values)
    tables = rng.permutation(num_blocks)[:3 * width].reshape(3, width).astype(np.int32)
    qrow = np.array([0, 1, 1, 1, 2, 2], np.int32)
    ctx = np.array([1, 60, 61, 62, 17, 128], np.int32)
    if window:
        for row, c in ((1, 60), (2, 17)):  # blocks before the earliest query's window
            for b in tables[row, :max(c - window, 0) // block_size]:
                k_pool[b], v_pool[b] = np.nan, np.nan
    q = rng.standard_normal((len(qrow), heads, head_dim)).astype(np.float32)
    got = kernel(q, k_pool, v_pool, tables, qrow, ctx, 0.3, window=window, softcap=softcap)
    keys, values = (a.astype(kv_dtype).astype(np.float32) for a in (keys, values))
    want = reference(q, keys, values, tables, qrow, ctx, block_size, 0.3, window, softcap)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    plain = reference(q, keys, values, tables, qrow, ctx, block_size, 0.3)
    assert not np.allclose(want[1:], plain[1:], atol=1e-3)  # the options change the result


def test_kernel_rejects_context_past_the_table():
    kernel = build_kernel(16, 16)
    k_pool, v_pool = kernel.pool_views(np.zeros(4 * 16 * 16, np.float32),
                                       np.zeros(4 * 16 * 16, np.float32), 1)
    q = np.zeros((1, 1, 16), np.float32)
    with pytest.raises(RuntimeError):
        kernel(q, k_pool, v_pool, np.zeros((1, 2), np.int32), np.zeros(1, np.int32),
               np.array([33], np.int32), 1.0)


def test_engine_kernel_and_portable_paths_agree(tiny_llama_dir):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (3, 40, 130, 17, 250, 1)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    # A small token budget mixes decode rows and prompt chunks in one step.
    kernel = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=64)
    portable = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=64,
                   paged_kernel=False)
    assert kernel.engine.cache.backend.name == "cpu", native.load().reason
    assert portable.engine.cache.backend.name == "portable"
    got = kernel.generate(prompts, params, use_tqdm=False)
    want = portable.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_engine_runs_without_native_kernels(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(native, "load", lambda variant=None: native.Kernels(None, None, "gone"))
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    assert llm.engine.cache.backend.name == "portable"
    assert "gone: attention runs on the portable MLX path" in capsys.readouterr().err
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_full_vocabulary_draws_follow_the_softmax():
    """Temperature sampling without filters (inverse CDF over the whole
    vocabulary, fast exp on the CPU) draws tokens at their softmax rates."""
    from engine.core.sampler import SamplingRow, sample

    probs = np.array([0.5, 0.3, 0.15, 0.05] + [0.0] * 60)
    logits = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -40.0)
    rows = [SamplingRow(SamplingParams(temperature=1.0, seed=s), s, [], []) for s in range(4000)]
    drawn = np.array(sample(mx.array(np.tile(logits, (len(rows), 1)), mx.float32),
                            rows, current_platform().sampler_kernels()).token_ids)
    freq = np.bincount(drawn, minlength=len(probs)) / len(rows)
    np.testing.assert_allclose(freq[:4], probs[:4], atol=0.03)
    assert freq[4:].sum() < 0.002


@pytest.mark.parametrize("kernels", ["platform", "fast_exp", "portable"])
def test_fast_logsumexp_matches_mlx(kernels):
    from engine.core.sampler import _logsumexp
    from engine.platform.base import PORTABLE_SAMPLING, SamplerKernels

    kernels = {"platform": current_platform().sampler_kernels(), "portable": PORTABLE_SAMPLING,
               "fast_exp": SamplerKernels(fast_exp=True)}[kernels]
    x = mx.array(np.random.default_rng(0).normal(0, 8, size=(3, 5000)).astype(np.float32))
    np.testing.assert_allclose(np.array(_logsumexp(x, kernels)),
                               np.array(mx.logsumexp(x, axis=-1, keepdims=True)), rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128, 48])
def test_half_precision_kernel_matches_reference(head_dim):
    kernel = build_kernel(head_dim, 16, np.float16)
    assert kernel.specialised == (head_dim != 48)
    rng = np.random.default_rng(1)
    blocks, kv_heads, heads, d = 32, 2, 8, head_dim
    k_pool, v_pool = kernel.pool_views(np.zeros(blocks * 16 * kv_heads * d, np.float16),
                                       np.zeros(blocks * 16 * kv_heads * d, np.float16),
                                       kv_heads)
    keys = rng.standard_normal((blocks * 16, kv_heads, d)).astype(np.float32)
    values = rng.standard_normal((blocks * 16, kv_heads, d)).astype(np.float32)
    kernel.write(k_pool, v_pool, np.arange(blocks * 16), keys, values)
    tables = rng.permutation(blocks)[:12].reshape(2, 6).astype(np.int32)
    qrow, ctx = np.array([0, 1, 1], np.int32), np.array([96, 50, 1], np.int32)
    q = rng.standard_normal((3, heads, d)).astype(np.float32)
    got = kernel(q, k_pool, v_pool, tables, qrow, ctx, 0.125)
    # The reference sees the same float16-rounded keys and values.
    want = reference(q, keys.astype(np.float16).astype(np.float32),
                     values.astype(np.float16).astype(np.float32), tables, qrow, ctx, 16, 0.125)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_engine_float16_kv_kernel_and_portable_paths_agree(tiny_llama_dir):
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (5, 70, 33)]
    params = SamplingParams(max_tokens=16, **GREEDY)
    args = dict(kv_cache_bytes=16 << 20, max_num_batched_tokens=64, kv_cache_dtype="float16")
    kernel = LLM(str(tiny_llama_dir), **args)
    portable = LLM(str(tiny_llama_dir), paged_kernel=False, **args)
    assert kernel.engine.cache.backend.name == "cpu", native.load().reason
    assert kernel.engine.cache.dtype == mx.float16
    got = kernel.generate(prompts, params, use_tqdm=False)
    want = portable.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_kernel_serves_a_half_precision_model(tiny_llama_dir):
    # numpy has no bfloat16: the kernel path computes in float32 and hands
    # the model back its own dtype.
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, dtype="bfloat16",
              kv_cache_dtype="float16")
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
