"""Embeddings on the CPU fast path (engine/embedding/embedder.py over
engine/platform/host_forward.py): the encoder attention kernel and the 16-bit
weight codes against their references, the fast path against the portable MLX
path, and the thread settings a generation in another thread sees."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.platform import blas, cpu_ops, weight_codes
from engine.platform.cpu_ops import HostMatmul
from models.layers.encoder_attention import EncoderAttentionView

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"


def _ops():
    ops = cpu_ops.load()
    assert ops is not None, "the CPU kernels must build in CI, never be skipped"
    return ops


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def texts():
    return [str(t) for t in np.load(REFERENCE)["texts"]]


@pytest.fixture(scope="module")
def embedders():
    """all-MiniLM-L6-v2 three ways: the default fast path (integer codes), the
    fast path with float32 matmuls, and the portable MLX path."""
    from engine.embedding.embedder import Embedder

    fast = Embedder.load()
    assert fast.fast_path and fast.cpu_matmul == "int16"
    f32 = Embedder.load(cpu_matmul="float32")
    assert f32.fast_path and f32.cpu_matmul == "float32"
    portable = Embedder.load(fast_path=False)
    assert not portable.fast_path
    return fast, f32, portable


# --- the kernels ----------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 32), (12, 12, 32), (8, 2, 64),
                                                       (3, 3, 24), (2, 1, 8), (2, 2, 128)])
def test_encoder_attention_kernel_matches_mlx(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads * head_dim)
    b, t = 4, 37
    q = rng.normal(size=(b * t, heads, head_dim)).astype(np.float32)
    k = rng.normal(size=(b * t, kv_heads, head_dim)).astype(np.float32)
    v = rng.normal(size=(b * t, kv_heads, head_dim)).astype(np.float32)
    lengths = np.array([t, 1, 20, 16])
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    scale = head_dim ** -0.5
    view = EncoderAttentionView.for_batch(mx.zeros((b, t), mx.int32), mx.array(mask))
    expected = np.array(view.attend(mx.array(q), mx.array(k), mx.array(v), scale))
    out = _ops().encoder_attention(q, k, v, b, t, lengths.astype(np.int32), scale)
    real = mask.reshape(-1).astype(bool)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-6)
    assert not out[~real].any()  # padding queries get zeros
    # No mask: every token of every row is real.
    full = _ops().encoder_attention(q, k, v, b, t, None, scale)
    view = EncoderAttentionView.for_batch(mx.zeros((b, t), mx.int32))
    np.testing.assert_allclose(
        full, np.array(view.attend(mx.array(q), mx.array(k), mx.array(v), scale)), atol=2e-6)


def test_encoder_attention_kernel_rejects_bad_heads():
    x = np.zeros((4, 3, 8), np.float32)
    with pytest.raises(ValueError, match="3 heads over 2 KV heads"):
        _ops().encoder_attention(x, x[:, :2], x[:, :2], 1, 4, None, 1.0)


@pytest.mark.parametrize("m, k, n, group", [(1, 64, 40, 32), (7, 384, 384, 32),
                                            (130, 1536, 33, 32), (9, 128, 96, 64),
                                            (5, 96, 64, 16)])
def test_16_bit_codes_multiply_like_numpy(m, k, n, group):
    ops = _ops()
    if not ops.integer_codes:
        pytest.skip("the integer kernel needs AVX-512 VNNI")
    rng = np.random.default_rng(m + k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[:, 3] *= 40  # one outlier feature, as BERT's hidden states have
    w = (rng.normal(size=(n, k)) * 0.05).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    y = ops.linear(HostMatmul(weight_codes.pack(w, group), bias), x)
    np.testing.assert_allclose(y, weight_codes.reference(x, w, group) + bias,
                               rtol=1e-5, atol=1e-5)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    assert np.abs(y - exact).max() < 1e-3 * np.abs(exact).max()


def test_codes_refuse_groups_that_could_overflow():
    assert weight_codes.supports(64, 384, 384)
    assert not weight_codes.supports(128, 384, 384)  # a group's sum could pass 2^31
    assert not weight_codes.supports(32, 48, 8)      # inputs not whole groups
    with pytest.raises(ValueError, match="groups of 128"):
        weight_codes.pack(np.zeros((8, 256), np.float32), 128)


@pytest.mark.parametrize("codes", [False, True])
def test_fused_weights_with_biases_split_like_their_parts(codes):
    """BERT's q/k/v have biases: fused into one matmul, each part as alone."""
    ops = _ops()
    if codes and not ops.integer_codes:
        pytest.skip("the integer kernel needs AVX-512 VNNI")
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(n, 64)).astype(np.float32) for n in (64, 32, 40)]
    biases = [rng.normal(size=w.shape[0]).astype(np.float32) for w in weights]
    parts = [HostMatmul(weight_codes.pack(w, 32) if codes else w, b)
             for w, b in zip(weights, biases, strict=True)]
    fused = HostMatmul.fused(parts)
    assert fused is not None
    x = rng.normal(size=(6, 64)).astype(np.float32)
    outs = ops.linear_split(fused, x, [p.out_dim for p in parts])
    for out, part in zip(outs, parts, strict=True):
        np.testing.assert_allclose(out, ops.linear(part, x), rtol=1e-5, atol=1e-5)
    # A bias on some parts only can't be fused.
    assert HostMatmul.fused([parts[0], HostMatmul(weights[1])]) is None


# --- the embedder ---------------------------------------------------------------

def test_fast_path_matches_portable_path(embedders, texts):
    """Every text's vector on the fast path (integer codes by default, or
    float32) points where the portable MLX path's does."""
    fast, f32, portable = embedders
    expected = portable.embed(texts).vectors
    assert _cosines(f32.embed(texts).vectors, expected).min() >= 0.99999
    assert _cosines(fast.embed(texts).vectors, expected).min() >= 0.9999


def test_fast_path_batched_equals_one_at_a_time(embedders, texts):
    fast, f32, _ = embedders
    for embedder in (fast, f32):
        batched = embedder.embed(texts[:24]).vectors
        single = np.stack([embedder.embed([t]).vectors[0] for t in texts[:24]])
        np.testing.assert_allclose(batched, single, atol=2e-6)


def test_embedding_leaves_a_generating_thread_its_blas_threads(embedders, texts,
                                                               tiny_llama_dir):
    """`conveyor serve` generates in one thread while embeddings run in
    another: embedding changes no process-wide thread setting (the embedder
    once set MKL to one thread for the whole process while it ran), and the
    generation's tokens are those it gives alone."""
    from engine import LLM, SamplingParams

    if not blas.loaded() or "mkl" not in blas.loaded():
        pytest.skip("no MKL preloaded")
    mkl = ctypes.CDLL(blas.loaded())
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    prompts = [list(range(3, 3 + n)) for n in (40, 7)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def generate():
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    alone = generate()
    before = mkl.MKL_Get_Max_Threads()
    seen, generated, done = [], [], threading.Event()

    def watch():  # what a BLAS call in another thread would be allowed
        while not done.is_set():
            seen.append(mkl.MKL_Get_Max_Threads())
            done.wait(0.001)

    def generation():
        while not done.is_set():
            generated.append(generate())

    others = [threading.Thread(target=watch), threading.Thread(target=generation)]
    for thread in others:
        thread.start()
    try:
        fast = embedders[0]
        fast.embed(texts)
    finally:
        done.set()
        for thread in others:
            thread.join(120)
    assert len(seen) >= 10 and set(seen) == {before}
    assert generated and all(g == alone for g in generated)
