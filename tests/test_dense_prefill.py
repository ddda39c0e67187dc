"""Fresh prompt chunks through dense causal attention on the CUDA backend
(kvcache/attention/dense_prefill.py), the kernel storing their K/V only:
the plan's bookkeeping, and the engine's tokens against the portable path
on the CPU with the kernel emulated (tests/emulated_kernels.py)."""

import mlx.core as mx
import numpy as np
import pytest
from emulated_kernels import emulated_cuda_kernel
from test_fused_attention import ENGINE, FAMILIES, GREEDY, FusingEmulatedCuda, tokens
from tiny_models import TINY_GEMMA3, TINY_QWEN3, write_tiny_llama, write_tiny_phi3

from engine import LLM
from engine.core.llm_engine import EngineArgs, LLMEngine
from kvcache.attention import cuda, dense_prefill


def test_plan_groups_fresh_chunks_by_padded_length(monkeypatch):
    monkeypatch.setattr(dense_prefill, "MIN_CHUNK", 32)
    # Two decode rows, then chunks of 40 (fresh), 33 (fresh), 50 (continuing a
    # context of 10) and 100 (fresh) tokens, then 3 padding rows.
    lens = [1, 1, 40, 33, 50, 100]
    starts = np.concatenate([[0], np.cumsum(lens)])
    context = np.array([7, 12, 40, 33, 60, 100])
    n = int(starts[-1]) + 3
    plan = dense_prefill.plan(starts, context, 2, n)
    assert [(g.chunks, g.length) for g in plan.groups] == [(2, 64), (1, 128)]
    rows = np.array(plan.groups[0].rows).reshape(2, 64)
    assert rows[0, :40].tolist() == list(range(2, 42))
    assert (rows[0, 40:] == 2).all()  # padding slots repeat the chunk's first row
    assert rows[1, :33].tolist() == list(range(42, 75))
    dense = np.array(plan.dense)
    answered = np.r_[2:75, 125:225]
    assert dense[answered].all() and dense.sum() == len(answered)
    assert sorted(plan.rows.tolist()) == answered.tolist()
    at = np.array(plan.at)
    assert at[2:42].tolist() == list(range(40)) and at[42:75].tolist() == list(range(64, 97))
    assert at[125:225].tolist() == list(range(128, 228))
    assert np.array(plan.groups[1].positions).tolist() == list(range(128))


def test_plan_is_decided_per_chunk_on_its_own_length():
    """A chunk goes dense whatever its step holds besides: alone or beside
    others, a request's attention takes the same path."""
    # 64 chunks of 128 tokens: all in the kernel; one of 300 tokens: dense.
    starts = np.arange(65) * 128
    assert dense_prefill.plan(starts, np.full(64, 128), 0, 64 * 128) is None
    alone = dense_prefill.plan(np.array([0, 300]), np.array([300]), 0, 300)
    assert [(g.chunks, g.length) for g in alone.groups] == [(1, 512)]
    beside = dense_prefill.plan(np.array([0, 1, 101, 401]), np.array([9, 100, 300]), 1, 401)
    assert [(g.chunks, g.length) for g in beside.groups] == [(1, 512)]
    assert beside.rows.tolist() == list(range(101, 401))
    # A windowed model: chunks up to its shortest window only.
    assert dense_prefill.plan(np.array([0, 300]), np.array([300]), 0, 300, 300) is not None
    assert dense_prefill.plan(np.array([0, 300]), np.array([300]), 0, 300, 299) is None


@pytest.fixture
def dense_everywhere(monkeypatch):
    """Every fresh chunk of two or more tokens through the dense path; counts its calls."""
    monkeypatch.setattr(dense_prefill, "MIN_CHUNK", 2)
    seen = []
    real = dense_prefill.attend

    def attend(plan, *a, **k):
        seen.append(sum(g.chunks for g in plan.groups))
        return real(plan, *a, **k)

    monkeypatch.setattr(dense_prefill, "attend", attend)
    return seen


def emulated(path, monkeypatch, **engine):
    monkeypatch.setattr(cuda, "_get_kernel", emulated_cuda_kernel)
    args = {**ENGINE, **engine}
    llm = LLM(str(path), **args, paged_kernel=False)
    llm.engine = LLMEngine(llm.engine.model, llm.tokenizer, llm.engine.config,
                           EngineArgs(**args, compile=False), FusingEmulatedCuda(mx.cpu))
    return llm


@pytest.mark.parametrize("family", ["llama", "llama-traditional", "llama3-scaled",
                                    "qwen2-biases", "qwen3-qk-norm", "phi3-longrope"])
def test_dense_prefill_gives_the_portable_tokens(tmp_path, monkeypatch, dense_everywhere,
                                                 family):
    """Fused (RoPE applied on the dense rows) and unfused (Qwen3's q/k norms)
    entries; prompts longer than a step's 16 tokens, so a step holds fresh
    chunks (dense) beside continuing ones and decode rows (kernel)."""
    if family == "phi3-longrope":
        path = write_tiny_phi3(tmp_path / family, original_max_position_embeddings=24)
    elif family == "qwen3-qk-norm":
        path = write_tiny_llama(tmp_path / family, **{**TINY_QWEN3, "head_dim": 64})
    else:
        path = write_tiny_llama(tmp_path / family, **FAMILIES[family])
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    assert tokens(emulated(path, monkeypatch)) == want
    assert dense_everywhere and max(dense_everywhere) >= 2  # chunks batched together


@pytest.mark.parametrize("family", ["mistral-window", "gemma3-window"])
def test_windowed_models_take_chunks_within_their_shortest_window(
        tmp_path, monkeypatch, dense_everywhere, family):
    """Mistral (window 8 on every layer) and Gemma 3 (12 on local layers,
    q/k norms): chunks up to the window go dense, longer ones (the 13- and
    16-token chunks here) stay in the kernel, which applies the window."""
    config = FAMILIES.get(family) or {**TINY_GEMMA3, "head_dim": 64}
    path = write_tiny_llama(tmp_path / family, **config)
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    longest = []
    real_plan = dense_prefill.plan
    monkeypatch.setattr(dense_prefill, "plan", lambda *a: longest.append(a[-1]) or real_plan(*a))
    assert tokens(emulated(path, monkeypatch)) == want
    assert dense_everywhere  # the 3-token prompt went dense
    assert set(longest) == {config["sliding_window"]}


def test_a_capped_model_keeps_every_row_in_the_kernel(tmp_path, monkeypatch, dense_everywhere):
    path = write_tiny_llama(tmp_path / "gemma2", **FAMILIES["gemma2-softcap"])
    want = tokens(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    assert tokens(emulated(path, monkeypatch)) == want
    assert dense_everywhere == []


def test_a_layer_the_plan_cannot_serve_is_refused(monkeypatch):
    monkeypatch.setattr(dense_prefill, "MIN_CHUNK", 2)
    plan = dense_prefill.plan(np.array([0, 10]), np.array([10]), 0, 10)
    with pytest.raises(RuntimeError, match="window 8"):
        cuda._check_dense_fits(plan, 8, None)
    with pytest.raises(RuntimeError, match="cap 2.0"):
        cuda._check_dense_fits(plan, None, 2.0)
    cuda._check_dense_fits(plan, 16, None)  # within the window: served


def test_prompts_of_many_lengths_in_one_step(tmp_path, monkeypatch, dense_everywhere):
    """Prompts of 3 to 90 tokens admitted together (one 512-token step):
    several padded lengths, each its own dense batch."""
    path = write_tiny_llama(tmp_path / "llama", **FAMILIES["llama"])
    prompts = [list(range(7, 7 + n)) for n in (3, 9, 17, 40, 90)]
    engine = dict(max_num_batched_tokens=512, kv_cache_bytes=8 << 20)

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    want = run(LLM(str(path), **{**ENGINE, **engine}, paged_kernel=False, host_forward=False))
    assert run(emulated(path, monkeypatch, **engine)) == want
    assert max(dense_everywhere) == 5


def test_a_step_of_dense_rows_only(tmp_path, monkeypatch, dense_everywhere):
    """A prompt filling its step's token bucket exactly (8 tokens: no padding
    row) goes dense whole, so no row attends in the kernel: its launch still
    gets one thread block (an empty grid is an invalid CUDA launch, which a
    256-token prompt alone hit on the GPU), with the portable path's tokens."""
    path = write_tiny_llama(tmp_path / "llama", **FAMILIES["llama"])
    prompt = [list(range(7, 15))]

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompt, GREEDY, use_tqdm=False)]

    want = run(LLM(str(path), **ENGINE, paged_kernel=False, host_forward=False))
    monkeypatch.setattr(cuda, "uses_tensor_cores", lambda *shape: True)  # row runs
    assert run(emulated(path, monkeypatch)) == want
    assert dense_everywhere and set(dense_everywhere) == {1}  # one chunk a layer
    runs, solo = cuda.row_runs(np.array([0, 8]), 8, 4, np.ones(8, bool), np.array([8]))
    assert runs.tolist() == [0] and not solo.any()
    assert cuda.warp_runs(runs, solo).tolist() == [0] * cuda.TC_WARPS


def test_default_threshold_through_the_engine(tmp_path, monkeypatch):
    """At the default MIN_CHUNK, prompts of 256 and 300 tokens go dense and
    one of 255 stays in the kernel, with the portable path's tokens."""
    path = write_tiny_llama(tmp_path / "llama", **FAMILIES["llama"])
    prompts = [list(range(7, 7 + n)) for n in (255, 256, 300)]
    engine = dict(max_num_batched_tokens=1024, kv_cache_bytes=16 << 20)
    planned = []
    real_plan = dense_prefill.plan
    monkeypatch.setattr(dense_prefill, "plan",
                        lambda *a: planned.append(r := real_plan(*a)) or r)

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]

    want = run(LLM(str(path), **{**ENGINE, **engine}, paged_kernel=False, host_forward=False))
    assert run(emulated(path, monkeypatch, **engine)) == want
    first = next(p for p in planned if p is not None)
    assert [(g.chunks, g.length) for g in first.groups] == [(1, 256), (1, 512)]
    assert first.rows.tolist() == list(range(255, 255 + 256 + 300))
