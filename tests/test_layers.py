"""Shared layers (models/layers) and the CPU fast path built from them: each
layer's host kernel against its MLX forward, a layer combination no C file
names (Qwen3's q/k norm) on the fast path against mlx-lm, and the fall-back
for a layer the fast path lacks."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from emulated_kernels import rotate_with_tables
from mlx_lm_oracle import check_fast_path, mlx_lm_greedy, short_longrope
from tiny_models import TINY_QWEN2, TINY_QWEN3, write_tiny_llama

from engine import LLM, SamplingParams
from engine.loading.loader import load_model
from engine.platform import cpu_ops
from engine.platform.host_forward import HostForward, bind
from models.layers import (
    Activation,
    Attention,
    Embedding,
    GatedActivation,
    LayerNorm,
    Linear,
    RMSNorm,
    RoPE,
)

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
RNG = np.random.default_rng(0)


def ops():
    loaded = cpu_ops.load()
    assert loaded is not None, "the CPU kernels must load (CI runs the fast path)"
    return loaded


def host_equals_mlx(layer, *inputs, atol=1e-5):
    """Bind `layer` alone and compare its host call with its MLX forward."""
    assert bind(layer, ops()) is None
    want = np.array(layer(*[mx.array(x) if x.dtype.kind == "f" else mx.array(x)
                            for x in inputs]))
    got = layer(*inputs)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)


def x_of(*shape):
    return RNG.normal(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(offset):
    layer = RMSNorm(48, 1e-6, offset=offset)
    layer.weight = mx.array(x_of(48))
    host_equals_mlx(layer, x_of(5, 48))


def test_layer_norm():
    layer = LayerNorm(40, 1e-12)
    layer.weight, layer.bias = mx.array(x_of(40)), mx.array(x_of(40))
    host_equals_mlx(layer, x_of(7, 40))


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_activations(name):
    host_equals_mlx(Activation(name), x_of(300, 33) * 4)
    host_equals_mlx(GatedActivation(name), x_of(300, 33) * 4, x_of(300, 33))


def test_linear_and_scaled_embedding():
    layer = Linear(24, 40, bias=True)
    host_equals_mlx(layer, x_of(9, 24))
    emb = Embedding(50, 16, scale=math.sqrt(16))
    host_equals_mlx(emb, np.array([3, 0, 49, 3], np.int32))
    np.testing.assert_allclose(emb.as_linear(x_of(3, 16)).shape, (3, 50))


ROPES = {
    "default": None,
    "linear": {"type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 256,
                 "long_factor": [1.0 + i / 8 for i in range(16)],
                 "short_factor": [1.0] * 16},
}


# mlx-lm's LongRoPE always rotates halves (Phi-3 does), so it has no traditional twin.
@pytest.mark.parametrize("kind,traditional",
                         [(k, t) for k in ROPES for t in (False, True)
                          if not (k == "longrope" and t)])
def test_rope_variants_match_mlx_lm(kind, traditional):
    """Our RoPE (MLX and host) against mlx-lm's for one position at a time."""
    from mlx_lm.models.rope_utils import initialize_rope

    dims, positions = 32, np.array([0, 1, 17, 300, 2047], np.int32)
    ours = RoPE(dims, 10000.0, ROPES[kind], traditional, max_position_embeddings=2048)
    theirs = initialize_rope(dims, 10000.0, traditional, ROPES[kind], 2048)
    short = theirs
    if kind == "longrope":  # short factors within the original context, long past it
        short = short_longrope(initialize_rope(dims, 10000.0, traditional, ROPES[kind], 2048),
                               ROPES[kind])
        assert positions.min() < ROPES[kind]["original_max_position_embeddings"] < \
            positions.max()
    switch = ROPES[kind].get("original_max_position_embeddings", 0) if kind == "longrope" else 0
    x = x_of(len(positions), 3, dims)
    want = np.stack([np.array((short if p < switch else theirs)(
        mx.array(x[i][None, :, None, :]), offset=int(p)))[0, :, 0]
        for i, p in enumerate(positions)])
    np.testing.assert_allclose(np.array(ours(mx.array(x), mx.array(positions))), want,
                               rtol=1e-4, atol=1e-4)
    host_equals_mlx(ours, x, positions, atol=1e-4)


@pytest.mark.parametrize("kind,traditional",
                         [(k, t) for k in ROPES for t in (False, True)
                          if not (k == "longrope" and t)])
def test_rope_tables_rotate_as_rope(kind, traditional):
    """RoPE.cos_sin (the rows the CUDA kernel rotates with, magnitude folded
    in, LongRoPE's short factors below the switch) gives RoPE's rotation."""
    dims, positions = 32, np.array([0, 1, 17, 300, 1500, 2047], np.int32)
    rope = RoPE(dims, 10000.0, ROPES[kind], traditional, max_position_embeddings=2048)
    x = x_of(len(positions), 3, dims)
    cos, sin = (np.array(t) for t in rope.cos_sin(mx.array(positions)))
    assert cos.shape == (len(positions), dims // 2)
    # float32 angles at position 2047 may round apart from mx.fast.rope's by ~1e-4.
    np.testing.assert_allclose(rotate_with_tables(x, cos, sin, traditional),
                               np.array(rope(mx.array(x), mx.array(positions))),
                               rtol=1e-3, atol=5e-4)


def test_partial_rotary_dims():
    rope = RoPE(16, 10000.0)  # rotates the first 16 of 32 dims
    host_equals_mlx(rope, x_of(6, 2, 32), np.arange(6, dtype=np.int32) * 5)


def test_attention_with_qk_norm_without_cache():
    attn = Attention(32, 4, 2, 16, rope=RoPE(16), qk_norm_eps=1e-6)
    mx.eval(attn.parameters())
    x, pos = x_of(5, 32), np.arange(5, dtype=np.int32)
    want = np.array(attn(mx.array(x), mx.array(pos)))
    assert bind(attn, ops()) is None
    assert attn.project_host is None  # float weights: three sgemm calls, no fused copy
    q, k, v = attn.project(x)
    assert [a.shape for a in (q, k, v)] == [(5, 4, 16), (5, 2, 16), (5, 2, 16)]
    np.testing.assert_allclose(np.array(attn.project(mx.array(x))[0]), q, atol=1e-5)
    # Without a cache the host path has no attention kernel to call: MLX does it.
    np.testing.assert_allclose(np.array(attn(mx.array(x), mx.array(pos))), want)


# -- a layer combination no C file names: Qwen3's q/k norm ---------------------

@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("qwen3"), **TINY_QWEN3)


def mlx_lm_model(path):
    from mlx_lm.utils import load_model as mlx_lm_load

    return mlx_lm_load(path)[0]


def test_qwen3_on_the_fast_path_matches_mlx_lm(tiny_qwen3):
    check_fast_path(tiny_qwen3, mlx_lm_model(tiny_qwen3),
                    [list(range(5, 5 + n)) for n in (3, 40, 130)])


def test_qwen3_logits_match_mlx_lm(tiny_qwen3):
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(tiny_qwen3)
    ours, _ = load_model(tiny_qwen3)
    ids = RNG.integers(0, 320, size=50).astype(np.int32)
    want = np.array(theirs(mx.array(ids)[None]))[0]
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), want, rtol=1e-4, atol=1e-4)


class ScaledResidual(nn.Module):
    """An architecture-specific module with weights of its own and MLX math:
    no host kernel exists for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.gain = mx.ones((1,))

    def __call__(self, x):
        return self.inner(x) * self.gain


def test_a_layer_without_kernel_falls_back_once_with_same_tokens(tiny_llama_dir, capfd):
    prompts = [list(range(3, 3 + n)) for n in (4, 33)]
    reference = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, host_forward=False)
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]
    from engine.core.llm_engine import EngineArgs, LLMEngine

    model, config = load_model(tiny_llama_dir)
    model.layers[1].mlp = ScaledResidual(model.layers[1].mlp)
    capfd.readouterr()
    engine = LLMEngine(model, reference.engine.tokenizer, config,
                       EngineArgs(kv_cache_bytes=16 << 20))
    assert engine.runner.host_forward is None
    err = capfd.readouterr().err
    assert err.count("CPU fast path off") == 1 and "ScaledResidual" in err
    reference.engine = engine  # the same LLM front end over the patched model
    got = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    # Nothing stays half-bound: the model's layers run their MLX forward.
    assert model.layers[0].self_attn.q_proj.host is None
    assert HostForward.build(model, None)[0] is None


def test_qwen2_biases_on_qkv_only_match_mlx_lm(tmp_path):
    """Another combination with no C of its own: biased q/k/v, unbiased o_proj."""
    path = write_tiny_llama(tmp_path / "qwen2", **TINY_QWEN2)
    prompts = [list(range(7, 7 + n)) for n in (5, 60)]
    llm = LLM(str(path), kv_cache_bytes=16 << 20)
    assert llm.engine.runner.host_forward is not None
    assert "bias" not in llm.engine.model.layers[0].self_attn.o_proj
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    theirs = mlx_lm_model(path)
    assert got == [mlx_lm_greedy(theirs, p, 20) for p in prompts]


def _fused_output(parts, x):
    from models.layers.fusion import concatenate

    fused = concatenate(parts)
    return None if fused is None else fused(x)


def test_concatenated_projections_equal_their_parts():
    """models/layers/fusion.py: one matmul gives each part's rows, for float
    (with and without bias) and quantized layers; parts of different kinds
    are left alone."""
    mx.random.seed(0)
    x = mx.random.normal((5, 64))
    for bias in (False, True):
        parts = [Linear(64, n, bias=bias) for n in (64, 32, 32)]
        want = mx.concatenate([p(x) for p in parts], axis=-1)
        assert mx.allclose(_fused_output(parts, x), want, atol=1e-5)
    quantized = [nn.QuantizedLinear.from_linear(Linear(64, n, bias=False), 32, 4)
                 for n in (96, 96)]
    want = mx.concatenate([p(x) for p in quantized], axis=-1)
    assert mx.allclose(_fused_output(quantized, x), want, atol=1e-5)
    eight_bit = nn.QuantizedLinear.from_linear(Linear(64, 96, bias=False), 32, 8)
    assert _fused_output([quantized[0], eight_bit], x) is None
    assert _fused_output([Linear(64, 8, bias=True), Linear(64, 8, bias=False)], x) is None
    assert _fused_output([quantized[0], Linear(64, 96, bias=False)], x) is None


def test_fused_projections_keep_the_model_s_logits(tmp_path):
    """fuse_projections (CUDA's load-time step) on a model with biased q/k/v
    (Qwen2): the same logits, one q/k/v and one gate/up matmul per layer."""
    from models.layers.fusion import fuse_projections

    path = write_tiny_llama(tmp_path / "qwen2", **TINY_QWEN2)
    model, _ = load_model(path)
    ids = mx.array([3, 17, 40, 41, 9], dtype=mx.int32)
    want = model(ids)
    assert fuse_projections(model) == 2 * len(model.layers)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert "qkv_proj" in attn and "q_proj" not in attn
    assert "gate_up_proj" in mlp and "gate_proj" not in mlp
    assert mx.allclose(model(ids), want, atol=1e-4)
    assert fuse_projections(model) == 0  # nothing left to fuse


def test_a_platform_that_fuses_projections_gets_the_same_tokens(tiny_llama_dir, monkeypatch):
    """The engine fuses where its platform asks (CUDA does) before it plans
    memory; tokens are unchanged."""
    from engine.platform.cpu import CpuPlatform

    prompts = [list(range(7, 7 + n)) for n in (5, 40)]
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
            .generate(prompts, GREEDY, use_tqdm=False)]
    monkeypatch.setattr(CpuPlatform, "fuse_projections", True)
    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    assert "qkv_proj" in llm.engine.model.layers[0].self_attn
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want


def test_unfused_parameters_load_into_mlx_lm(tmp_path):
    """bench's mlx-lm twin loads a fused model's weights under the unfused
    names and computes the same logits (the parts are row slices)."""
    from mlx_lm.models import llama as mlx_lm_llama
    from tiny_models import TINY_LLAMA

    from models.layers.fusion import fuse_projections, unfused_parameters

    path = write_tiny_llama(tmp_path / "llama")
    model, config = load_model(path)
    fuse_projections(model)
    twin = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict({**TINY_LLAMA, **config}))
    twin.load_weights(unfused_parameters(model), strict=True)
    ids = mx.array([[3, 17, 40, 41, 9]])
    assert mx.allclose(twin(ids)[0], model(ids[0]), atol=1e-4)
