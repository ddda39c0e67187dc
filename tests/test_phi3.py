"""Phi-3 (models/phi3.py) against mlx-lm's phi3 on tiny random-weight
checkpoints written here: fused q/k/v and gate/up projections, LongRoPE with
its magnitude, partial rotary dims. Greedy tokens must be identical to
mlx-lm's, alone and batched, on the CPU fast path and the portable path;
logits agree within 1e-4 (float32 throughout)."""


import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm_oracle import check_fast_path, short_longrope
from tiny_models import HEADS, HIDDEN, longrope, write_quantized, write_tiny_phi3

from engine import LLM, SamplingParams
from engine.loading.loader import load_model
from engine.platform.int8_linear import Int8Linear

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    return write_tiny_phi3(tmp_path_factory.mktemp("phi3") / "m",
                           rope_scaling=longrope(HIDDEN // HEADS))


@pytest.fixture(scope="module")
def tiny_phi4_mini(tmp_path_factory):
    """Phi-4-mini's shape: 3/4 of each head rotated, tied embeddings."""
    rotated = int(HIDDEN // HEADS * 0.75)
    return write_tiny_phi3(tmp_path_factory.mktemp("phi4") / "m", seed=1,
                           partial_rotary_factor=0.75, tie_word_embeddings=True,
                           rope_scaling=longrope(rotated))


def check_against_mlx_lm(path):
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(path)
    short_longrope(theirs, json.loads((path / "config.json").read_text())["rope_scaling"])
    ours, _ = load_model(path)
    ids = np.random.default_rng(0).integers(0, 320, size=50).astype(np.int32)
    want = np.array(theirs(mx.array(ids)[None]))[0]
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), want, rtol=1e-4, atol=1e-4)

    fast = check_fast_path(path, theirs, [list(range(5, 5 + n)) for n in (3, 40, 130)])
    attn = fast.engine.model.layers[0].self_attn
    assert attn.project_host is not None and fast.engine.model.layers[0].mlp.host is not None


def test_phi3_longrope_matches_mlx_lm(tiny_phi3):
    model, _ = load_model(tiny_phi3)
    rope = model.layers[0].self_attn.rope
    assert rope.kind == "longrope" and rope.mscale > 1.0  # 8192 positions over 1024
    check_against_mlx_lm(tiny_phi3)


def test_phi4_mini_partial_rotary_matches_mlx_lm(tiny_phi4_mini):
    model, _ = load_model(tiny_phi4_mini)
    assert model.layers[0].self_attn.rope.dims == 12
    check_against_mlx_lm(tiny_phi4_mini)


def test_fused_projections_keep_one_copy_on_the_fast_path(tiny_phi3, tmp_path):
    """The checkpoint's fused weights are multiplied as they are: the bound
    kernels read the layer's own memory (float) or its own codes (integer)."""
    from engine.platform import cpu_ops, int8_matmul
    from engine.platform.host_forward import bind

    model, _ = load_model(tiny_phi3)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert "q_proj" not in attn and "gate_proj" not in mlp
    assert bind(model, cpu_ops.load()) is None
    closure = {c.cell_contents for c in attn.project_host.__closure__
               if hasattr(c.cell_contents, "keep")}
    (fused,) = closure
    assert np.shares_memory(fused.keep[0], np.array(attn.qkv_proj.weight, copy=False))

    if int8_matmul.load() is None:
        pytest.skip("no AVX-512 VNNI: quantized weights run as float32 here")
    quantized = write_quantized(tiny_phi3, tmp_path / "q")
    llm = LLM(str(quantized), kv_cache_bytes=16 << 20)
    layer = llm.engine.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear)
    assert isinstance(layer.mlp.gate_up_proj, Int8Linear)
    (fused,) = {c.cell_contents for c in layer.self_attn.project_host.__closure__
                if hasattr(c.cell_contents, "keep")}
    assert fused.packed is layer.self_attn.qkv_proj.packed
    prompts = [list(range(5, 5 + n)) for n in (3, 40)]
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    portable = LLM(str(quantized), kv_cache_bytes=16 << 20, host_forward=False)
    slow = [o.outputs[0].token_ids for o in portable.generate(prompts, GREEDY, use_tqdm=False)]
    assert fast == slow
