"""The CPU fast path (engine/platform/host_forward.py: a model's own forward on
host arrays, each shared layer on its C kernel) against the portable MLX
forward, and the integer matmul kernel (engine/platform/int8_matmul.py)
against numpy."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import write_quantized, write_tiny_llama

from engine import LLM, SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.errors import ConveyorError, ModelLoadError
from engine.loading.loader import load_model
from engine.platform import cpu_ops, kernel_variants, native
from engine.platform import int8_matmul as q8
from engine.platform.host_forward import HostForward
from engine.platform.int8_linear import Int8Embedding, Int8Linear

GREEDY = dict(temperature=0, ignore_eos=True)


class CausalView:
    """A cache view for one sequence: plain causal attention in numpy."""

    def attend_host(self, q, k, v, scale, window=None, softcap=None):
        assert window is None and softcap is None
        n, heads, _ = q.shape
        rep = heads // k.shape[1]
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * scale
        s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).astype(np.float32)


def host_forward(model):
    host, why = HostForward.build(model, cpu_ops.load())
    assert host is not None, why  # the fast path must run in CI, never be skipped
    return host


def host_logits(model, ids):
    if sys.platform != "linux":
        pytest.skip("the native kernels are built on Linux only")
    host = host_forward(model)
    n = len(ids)
    return np.array(host(ids, np.arange(n, dtype=np.int32), [CausalView()] * len(model.layers),
                         np.arange(n, dtype=np.int32)))


def integer_kernel():
    """The kernel; it must be there wherever the CPU has AVX-512 VNNI."""
    if sys.platform != "linux" or "avx512_vnni" not in kernel_variants.cpu_flags():
        pytest.skip("the integer kernel needs Linux and a CPU with AVX-512 VNNI")
    kernel = q8.load()
    assert kernel is not None, native.load().reason
    return kernel


CONFIGS = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},
    "traditional-rope": {"rope_traditional": True},
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                     "original_max_position_embeddings": 64}},
    "linear-rope": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [7, 600])  # 600 rows: BLAS's plain layout, not the transposed one
def test_host_forward_matches_mlx(tmp_path, name, n):
    path = write_tiny_llama(tmp_path / "m", **CONFIGS[name])
    model, _ = load_model(path)
    ids = np.random.default_rng(0).integers(0, 320, size=n).astype(np.int32)
    ref = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(host_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_engine_uses_host_forward_with_same_tokens(tiny_llama_dir):
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 300, 77)]
    params = SamplingParams(max_tokens=24, **GREEDY)
    runs = {}
    for host in (None, False):
        llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=64,
                  host_forward=host)
        assert (llm.engine.runner.host_forward is not None) == (host is None)
        runs[host] = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                   use_tqdm=False)]
    assert runs[None] == runs[False]


def test_host_forward_declines_what_it_cannot_run(tmp_path):
    path = write_tiny_llama(tmp_path / "m", torch_dtype="bfloat16")
    model, _ = load_model(path, dtype="bfloat16")
    host, why = HostForward.build(model, cpu_ops.load())
    assert host is None and "bfloat16" in why
    with pytest.raises(ConveyorError, match="host_forward: "):
        LLMEngine.from_args(EngineArgs(model=str(path), dtype="bfloat16", host_forward=True,
                                       kv_cache_bytes=16 << 20))


# -- the integer kernel --------------------------------------------------------

def quantized(n, k, bits, group_size=32, seed=0):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.normal(0, 0.05, (n, k)).astype(np.float32))
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return np.array(wq), np.array(scales), np.array(biases)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_unpacked_codes_dequantize_like_mlx(bits):
    wq, scales, biases = quantized(48, 64, bits)
    codes = q8.unpack_codes(wq, bits).astype(np.float32).reshape(48, 2, 32)
    ours = (codes * scales[:, :, None] + biases[:, :, None]).reshape(48, 64)
    ref = mx.dequantize(mx.array(wq), mx.array(scales), mx.array(biases), 32, bits)
    np.testing.assert_allclose(ours, np.array(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("n,k,m", [(96, 64, 5), (100, 128, 64), (16, 32, 1), (48, 64, 0)])
def test_integer_kernel_matches_numpy(wide, bits, n, k, m):
    kernel = integer_kernel()
    wq, scales, biases = quantized(n, k, bits)
    packed = q8.pack(wq, scales, biases, bits, 32, wide)
    x = np.random.default_rng(2).normal(0, 1, (m, k)).astype(np.float32)
    x[:, 5] *= 40  # an outlier channel, as real activations have
    ours = kernel(x, packed)
    ref = q8.reference(x, packed, q8.unpack_codes(wq, bits), scales, biases)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_wide_activations_stay_close_to_float32():
    kernel = integer_kernel()
    wq, scales, biases = quantized(256, 512, 4)
    dense = np.array(mx.dequantize(mx.array(wq), mx.array(scales), mx.array(biases), 32, 4))
    x = np.random.default_rng(3).normal(0, 1, (8, 512)).astype(np.float32)
    exact = x @ dense.T
    errors = {wide: np.abs(kernel(x, q8.pack(wq, scales, biases, 4, 32, wide)) - exact).max()
              for wide in (False, True)}
    assert errors[True] < 1e-3 * np.abs(exact).max()
    assert errors[True] * 50 < errors[False]  # int8 activations: the approximate scheme


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    src = write_tiny_llama(root / "src", tie_word_embeddings=True)
    return write_quantized(src, root / "q", embedding=True)


@pytest.mark.parametrize("choice", ["int16", "int8"])
def test_integer_layers_in_host_and_mlx_forwards(quantized_tiny, choice):
    integer_kernel()
    model, _ = load_model(quantized_tiny, cpu_matmul=choice)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    host_forward(model)
    attn = model.layers[0].self_attn
    assert attn.project_host is not None  # q/k/v in one kernel call ...
    codes = [attn.q_proj.packed.codes, attn.k_proj.packed.codes, attn.v_proj.packed.codes]
    # ... reading one copy of the codes: the three are back to back in one buffer.
    assert all(a.ctypes.data + a.nbytes == b.ctypes.data for a, b in zip(codes, codes[1:]))
    dense, _ = load_model(quantized_tiny, cpu_matmul="float32")
    ids = np.random.default_rng(0).integers(0, 320, size=40).astype(np.int32)
    exact = np.array(dense(mx.array(ids)))
    mlx_path = np.array(model(mx.array(ids)))
    tol = (1e-3 if choice == "int16" else 0.1) * np.abs(exact).max()
    assert np.abs(mlx_path - exact).max() < tol
    assert np.abs(host_logits(model, ids) - exact).max() < tol


@pytest.mark.parametrize("choice", ["int16", "int8"])
def test_integer_matmul_is_batch_invariant(quantized_tiny, choice):
    """Each activation row is quantized on its own: a request's tokens do not
    depend on what else is in the batch."""
    integer_kernel()
    llm = LLM(str(quantized_tiny), kv_cache_bytes=16 << 20, cpu_matmul=choice)
    prompts = [list(range(5, 5 + n)) for n in (3, 50, 120, 9, 31)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_cpu_matmul_choice_errors(quantized_tiny):
    with pytest.raises(ModelLoadError, match="unknown cpu_matmul"):
        load_model(quantized_tiny, cpu_matmul="int4")
    with pytest.raises(ModelLoadError, match="float32 compute"):
        load_model(quantized_tiny, cpu_matmul="int8", dtype="bfloat16")


def test_no_integer_kernel_means_float32(quantized_tiny, monkeypatch):
    monkeypatch.setattr(q8, "load", lambda threads=None: None)
    model, _ = load_model(quantized_tiny)
    assert not isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    with pytest.raises(ModelLoadError, match="AVX-512 VNNI"):
        load_model(quantized_tiny, cpu_matmul="int16")


def test_host_forward_in_two_threads_at_once(tiny_llama_dir):
    """The C forward keeps per-thread scratch: two engines stepping in two
    threads give the tokens each gives alone."""
    import threading

    prompts = [list(range(3, 3 + n)) for n in (60, 9, 130)]
    params = SamplingParams(max_tokens=40, **GREEDY)
    llms = [LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20) for _ in range(2)]
    alone = [o.outputs[0].token_ids for o in llms[0].generate(prompts, params, use_tqdm=False)]
    results = [None, None]

    def run(i):
        outs = llms[i].generate(prompts, params, use_tqdm=False)
        results[i] = [o.outputs[0].token_ids for o in outs]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [alone, alone]


def test_concatenated_weights_multiply_like_their_parts():
    kernel = integer_kernel()
    parts = [q8.pack(*quantized(n, 64, 4, seed=n), 4, 32, True) for n in (64, 32, 48)]
    fused = q8.concat(parts)
    x = np.random.default_rng(4).normal(0, 1, (6, 64)).astype(np.float32)
    np.testing.assert_array_equal(kernel(x, fused),
                                  np.concatenate([kernel(x, p) for p in parts], axis=1))
    assert q8.concat(parts[::-1]) is None  # 48 outputs first: tiles would not line up
