"""CUDA's fused attention entry (q/k/v one matmul, RoPE applied inside the
attention kernel, models/layers/fusion.py and kvcache/attention/cuda.py)
through the engine on the CPU, with the kernel emulated in numpy
(tests/emulated_kernels.py): the same tokens as the portable path for every
RoPE kind and layer option a family brings. The kernel's own arithmetic is
checked on the GPU (its start-up verify, bench/gpu_check.py)."""

from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from emulated_kernels import EmulatedCuda, emulated_cuda_kernel
from tiny_models import TINY_GEMMA2, TINY_MISTRAL, TINY_QWEN2, write_tiny_llama, write_tiny_phi3

from engine import LLM, SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from kvcache.attention import cuda

ENGINE = dict(kv_cache_bytes=4 << 20, block_size=4, max_num_batched_tokens=16, max_model_len=512)
PROMPTS = [[5, 9, 200], list(range(20, 33)), list(range(40, 75))]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

FAMILIES = {
    "llama": {"head_dim": 64},
    "llama-traditional": {"head_dim": 64, "rope_traditional": True},
    "llama3-scaled": {"head_dim": 64, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}},
    "qwen2-biases": {**TINY_QWEN2, "head_dim": 64},
    "mistral-window": {**TINY_MISTRAL, "head_dim": 64},
    "gemma2-softcap": {**TINY_GEMMA2, "head_dim": 64},
}


class FusingEmulatedCuda(EmulatedCuda):
    """The CPU with CUDA's choices: fused projections, the CUDA backend."""

    fuse_projections = True


def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def on_emulated_cuda(path, monkeypatch, platform=FusingEmulatedCuda):
    calls = []
    monkeypatch.setattr(cuda, "_get_kernel", partial(emulated_cuda_kernel, calls=calls))
    llm = LLM(str(path), **ENGINE, paged_kernel=False)
    llm.engine = LLMEngine(llm.engine.model, llm.tokenizer, llm.engine.config,
                           EngineArgs(**ENGINE, compile=False), platform(mx.cpu))
    return llm, calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_entry_gives_the_portable_tokens(tmp_path, monkeypatch, family):
    path = write_tiny_llama(tmp_path / family, **FAMILIES[family])
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    llm, calls = on_emulated_cuda(path, monkeypatch)
    assert "qkv_proj" in llm.engine.model.layers[0].self_attn
    assert tokens(llm) == want
    # Every layer's launch took the fused projection and rotated it itself.
    assert calls and all(c["ROTATE"] == 1 for c in calls)
    assert all(c["TRAD"] == int("traditional" in family) for c in calls)


@pytest.mark.parametrize("family", ["llama", "llama-traditional", "mistral-window",
                                    "gemma2-softcap"])
def test_tensor_core_pair_gives_the_portable_tokens(tmp_path, monkeypatch, family):
    """Where the tensor-core form serves (half-precision pools on the GPU),
    each layer of a step with prompt rows is a store launch, then an
    attention launch taking the store's output; a step of decode rows only
    is one attention launch that stores first (STORE_OWN). Their inputs,
    templates and order, emulated, give the portable path's tokens (and so
    do windows and caps)."""
    path = write_tiny_llama(tmp_path / family, **FAMILIES[family])
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    monkeypatch.setattr(cuda, "uses_tensor_cores", lambda *shape: True)
    llm, calls = on_emulated_cuda(path, monkeypatch)
    assert tokens(llm) == want
    attends = [j for j, c in enumerate(calls) if c["form"] == "tensor_cores"]
    stores = [j for j, c in enumerate(calls) if c["form"] == "store"]
    own = [j for j in attends if calls[j]["STORE_OWN"]]
    # Every launch that does not store itself follows its store launch.
    assert stores and own and sorted(stores + own) == [j - 1 if j not in own else j
                                                       for j in attends]
    assert len(stores) + len(attends) == len(calls)
    assert all(calls[j]["NWARPS"] == cuda.TC_WARPS and "BF16" in calls[j] for j in attends)


def test_tensor_cores_serve_half_precision_at_64_and_128():
    assert cuda.uses_tensor_cores(mx.bfloat16, 128, 4)
    assert cuda.uses_tensor_cores(mx.float16, 64, 16)
    assert not cuda.uses_tensor_cores(mx.float32, 128, 4)  # the scalar form
    assert not cuda.uses_tensor_cores(mx.bfloat16, 256, 2)  # Gemma's 256: registers
    assert not cuda.uses_tensor_cores(mx.bfloat16, 128, 32)  # 16 rows an mma


def test_row_runs_cover_each_attending_row_once():
    """Decode rows alone, a prompt chunk in runs of 16 // group rows (the
    last one short), a store-only chunk in none, padding rows alone."""
    query_start = np.array([0, 1, 2, 12, 20])  # decode, decode, 10-row chunk, 8-row chunk
    store_only = np.zeros(23, bool)
    store_only[12:20] = True  # the 8-row chunk's attention is dense
    runs, solo = cuda.row_runs(query_start, 23, group=4, store_only=store_only)
    assert [(r >> 5, r & 31) for r in runs] == [(0, 1), (1, 1), (2, 4), (6, 4), (10, 2),
                                                (20, 1), (21, 1), (22, 1)]
    assert not solo.any()  # no contexts given: every run splits its keys
    assert [r & 31 for r in cuda.row_runs(np.array([0, 20]), 20, group=1)[0]] == [16, 4]
    assert [r & 31 for r in cuda.row_runs(np.array([0, 3]), 3, group=16)[0]] == [1, 1, 1]


def test_prompt_chunks_go_solo_by_their_own_length_and_context():
    """A prompt chunk's runs take a warp each where its context is at most
    SOLO_SPAN tokens a row; decode rows, padding and a short chunk on a long
    context split their keys. The choice is the chunk's own: the same chunk
    beside other rows gets the same."""
    query_start = np.array([0, 1, 11, 15])  # a decode row, a fresh 10-row chunk, 4 rows
    contexts = np.array([500, 10, 4 + 32 * 4 + 1])  # the last just past SOLO_SPAN
    runs, solo = cuda.row_runs(query_start, 17, 4, context_lens=contexts)
    assert solo.tolist() == [False, True, True, True, False, False, False]
    alone, _ = cuda.row_runs(np.array([0, 10]), 10, 4, context_lens=np.array([10]))
    assert (runs[solo] - 32).tolist() == alone.tolist()  # the same runs, one row on
    # The kernel's layout: split runs fill a block's two warps, solo runs two
    # to a block, the spare warp idle.
    groups = cuda.warp_runs(runs, solo, warps=2)
    split, alone = runs[~solo], runs[solo]
    assert groups.tolist() == [x for r in split for x in (r, r)] + alone.tolist() + [-1]
    assert cuda.warp_runs(runs, solo, warps=1).tolist() == split.tolist() + alone.tolist()


def test_a_decode_step_splits_every_row():
    assert np.array(cuda.decode_runs(3)).tolist() == [
        x for r in (1, 33, 65) for x in [r] * cuda.TC_WARPS]


def test_phi3_longrope_on_the_fused_entry(tmp_path, monkeypatch):
    """Phi-3's own fused projection and LongRoPE's per-position factors
    (prompts cross original_max_position_embeddings, 24 here)."""
    path = write_tiny_phi3(tmp_path / "phi3", original_max_position_embeddings=24)
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    llm, calls = on_emulated_cuda(path, monkeypatch)
    assert tokens(llm) == want
    assert calls and all(c["ROTATE"] == 1 for c in calls)


def test_layers_the_kernel_cannot_rotate_keep_q_k_v_apart(tmp_path, monkeypatch):
    """Qwen3's per-head q/k norms sit between the matmul and RoPE: its layers
    take the unfused entry (ROTATE 0), with the same tokens."""
    from tiny_models import TINY_QWEN3

    path = write_tiny_llama(tmp_path / "qwen3", **{**TINY_QWEN3, "head_dim": 64})
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    llm, calls = on_emulated_cuda(path, monkeypatch)
    assert tokens(llm) == want
    assert calls and all(c["ROTATE"] == 0 for c in calls)


@pytest.mark.parametrize("dim", [896, 2048, 2050, 3072, 4096, 8192])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_a_correct_add_and_norm_passes_verification_at_every_width(monkeypatch, dim, dtype):
    """verify's tolerance is relative: an absolute one refused the exact
    arithmetic at 3,072 in bfloat16 (a last-place difference on values near
    5), so Phi-3 ran without the fused kernel. The vector width follows the row."""
    from emulated_kernels import emulated_add_rms_norm_kernel

    from engine.platform import cuda_norm

    calls = []
    monkeypatch.setattr(cuda_norm, "_get_kernel", lambda: emulated_add_rms_norm_kernel(calls))
    assert cuda_norm.verify(dim, dtype)
    assert calls[0]["VEC"] == (8 if dim % 8 == 0 else 1)


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap"])
def test_residual_add_and_norm_in_one_kernel(tmp_path, monkeypatch, family):
    """cuda_norm.bind gives each verified RMSNorm the fused add; the decoder
    blocks call it once a layer (Gemma's norms with their offset of one),
    with the portable path's tokens."""
    from emulated_kernels import emulated_add_rms_norm_kernel

    from engine.platform import cuda_norm

    norm_calls = []
    monkeypatch.setattr(cuda_norm, "_get_kernel",
                        lambda: emulated_add_rms_norm_kernel(norm_calls))
    monkeypatch.setattr(cuda_norm, "_verified", {})
    path = write_tiny_llama(tmp_path / family, **FAMILIES[family])
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    norms_a_layer = 4 if family.startswith("gemma") else 2

    class WithFusedNorms(FusingEmulatedCuda):
        def prepare_model(self, model):
            super().prepare_model(model)
            assert cuda_norm.bind(model) == norms_a_layer * len(model.layers) + 1

    llm, calls = on_emulated_cuda(path, monkeypatch, platform=WithFusedNorms)
    assert tokens(llm) == want
    assert norm_calls  # the blocks went through the fused add
    # A kernel that adds wrongly fails verification and is not bound.
    monkeypatch.setattr(cuda_norm, "_verified", {})
    monkeypatch.setattr(cuda_norm, "_get_kernel", lambda: (
        lambda inputs, **kw: emulated_add_rms_norm_kernel()([inputs[0], inputs[0], *inputs[2:]],
                                                            **kw)))
    model = LLM(str(path), **ENGINE, paged_kernel=False).engine.model
    assert cuda_norm.bind(model) == 0
