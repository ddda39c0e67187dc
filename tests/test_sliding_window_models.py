"""Gemma 2, Gemma 3 (text) and Mistral: sliding-window layers, soft-capping and
Gemma's layers, on tiny random checkpoints, against mlx-lm given
transformers' window masks (tests/mlx_lm_oracle.py). mlx-lm's own Gemma 3
windows its layers itself, and is checked to agree with that oracle. Windows
are a few tokens and blocks 4 tokens, so the prompts outgrow both; Mistral,
whose every layer slides, gives blocks behind its window back to the pool.
"""

import json
from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from emulated_kernels import EmulatedCuda, emulated_cuda_kernel
from mlx_lm_oracle import oracle, oracle_greedy
from tiny_models import TINY_SLIDING, write_tiny_llama

from engine import LLM, SamplingParams
from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.entrypoints.cli import main
from engine.errors import ModelLoadError
from engine.loading.loader import load_model
from kvcache.block_manager import FREED
from kvcache.paged_cache import PagedKVCache

FAMILIES = TINY_SLIDING  # family -> (tiny config, window of each layer)
PROMPTS = [[5, 9, 200], list(range(20, 33)), [int(t) for t in
                                              np.random.default_rng(2).integers(3, 300, 45)]]
NEW_TOKENS = 12
LOGPROB_TOLERANCE = 2e-4  # engine log-probabilities against the oracle's, every path
ENGINE = dict(kv_cache_bytes=4 << 20, block_size=4, max_num_batched_tokens=16, max_model_len=512)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    config, windows = FAMILIES[request.param]
    return write_tiny_llama(tmp_path_factory.mktemp(request.param), **config), windows


def test_logits_match_mlx_lm_and_the_window_matters(family):
    path, windows = family
    ours, _ = load_model(path)
    ids = mx.array(PROMPTS[2])
    want = np.array(oracle(path, windows)(ids[None]))[0]
    np.testing.assert_allclose(np.array(ours(ids)), want, rtol=1e-4, atol=1e-4)
    unwindowed = np.array(oracle(path, [None] * len(windows))(ids[None]))[0]
    first = min(w for w in windows if w)
    np.testing.assert_allclose(unwindowed[:first], want[:first], rtol=1e-4, atol=1e-4)
    assert np.abs(unwindowed[first:] - want[first:]).max() > 0.1


def test_mlx_lm_gemma3_windows_its_layers_as_the_oracle_does(tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load

    config, windows = FAMILIES["gemma3_text"]
    path = write_tiny_llama(tmp_path / "g3", **config)
    native, _ = mlx_lm_load(path)  # its own rotating caches on the sliding layers
    for prompt in PROMPTS[1:]:
        tokens = [int(t) for t, _ in generate_step(mx.array(prompt), native,
                                                    max_tokens=NEW_TOKENS)]
        assert tokens == oracle_greedy(oracle(path, windows), prompt, NEW_TOKENS)[0]


def engine_outputs(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


PATHS = {"fast": {}, "mlx-forward": dict(host_forward=False),
         "portable": dict(host_forward=False, paged_kernel=False),
         "portable-async": dict(host_forward=False, paged_kernel=False, async_scheduling=True)}


@pytest.mark.parametrize("path_kind", list(PATHS))
def test_greedy_tokens_match_mlx_lm_alone_and_batched(family, path_kind):
    """The CPU fast path (every layer on its C kernel), the MLX forward over
    the C attention kernel, and the portable path (MLX forward and attention),
    also with asynchronous scheduling (blocks released a step later), with
    prompts longer than the window cut into chunks of 16 tokens."""
    path, windows = family
    llm = LLM(str(path), **ENGINE, **PATHS[path_kind])
    runner = llm.engine.runner
    assert (runner.host_forward is not None) == (path_kind == "fast")
    assert runner.backend.name == ("cpu" if path_kind in ("fast", "mlx-forward") else "portable")
    assert llm.engine.async_scheduling == path_kind.endswith("async")
    model = oracle(path, windows)
    want = [oracle_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    batched = engine_outputs(llm, PROMPTS)
    assert [o.token_ids for o in batched] == [tokens for tokens, _ in want]
    for out, (tokens, logprobs) in zip(batched, want):
        got = [lp.logprob for lp in out.logprobs]
        expected = [row[t] for row, t in zip(logprobs, tokens)]
        np.testing.assert_allclose(got, expected, atol=LOGPROB_TOLERANCE)
    if path_kind == "fast":
        alone = [engine_outputs(llm, [p])[0].token_ids for p in PROMPTS]
        assert alone == [tokens for tokens, _ in want]


def held_blocks(llm, steps):
    """Record the blocks each running sequence holds after every step."""
    engine, step = llm.engine, llm.engine.step

    def recording_step():
        result = step()
        for seq in engine.scheduler.running:
            steps.append(sum(b != FREED for b in engine.blocks.block_table(seq.seq_id)))
        engine.blocks.check_invariants()
        return result
    engine.step = recording_step


@pytest.mark.parametrize("path_kind", ["fast", "portable-async"])
def test_mistral_gives_back_blocks_behind_its_window(tmp_path, path_kind):
    """A 45-token prompt and 12 new tokens would fill 15 blocks of 4; with a
    window of 8 a sequence holds at most the window, a 16-token chunk (two
    with a step in flight) and the blocks they straddle. Prefix caching still
    finds the released blocks."""
    config, windows = FAMILIES["mistral"]
    path = write_tiny_llama(tmp_path / "m", **config)
    llm = LLM(str(path), **ENGINE, **PATHS[path_kind])
    steps: list[int] = []
    held_blocks(llm, steps)
    want = oracle_greedy(oracle(path, windows), PROMPTS[2], NEW_TOKENS)[0]
    assert engine_outputs(llm, [PROMPTS[2]])[0].token_ids == want
    chunks = 2 if llm.engine.async_scheduling else 1
    assert max(steps) <= (8 + 16 * chunks) // 4 + 2 and steps[-1] <= (8 + chunks) // 4 + 2
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    # The same prompt again: its first blocks come from the prefix cache.
    assert engine_outputs(llm, [PROMPTS[2]])[0].token_ids == want
    assert llm.engine.blocks.prefix_hits > 0


@pytest.mark.parametrize("path_kind", ["fast", "portable-async"])
def test_mistral_preempted_under_a_tight_budget_gives_the_same_tokens(tmp_path, path_kind):
    config, windows = FAMILIES["mistral"]
    path = write_tiny_llama(tmp_path / "m", **config)
    per_block = PagedKVCache.bytes_per_block(2, 4, 2, 16, mx.float32)
    prompts = PROMPTS + [PROMPTS[2][::-1], PROMPTS[1] * 3]
    roomy = engine_outputs(LLM(str(path), **ENGINE), prompts)
    tight = LLM(str(path), **{**ENGINE, "kv_cache_bytes": 14 * per_block}, **PATHS[path_kind])
    assert tight.engine.blocks.num_blocks == 14
    assert [o.token_ids for o in engine_outputs(tight, prompts)] == \
        [o.token_ids for o in roomy]
    assert tight.engine.stats().preemptions > 0


def test_generate_command_runs_each_family(family, capsys):
    path, _ = family
    code = main(["generate", "--model", str(path), "--max-tokens", "4", "--prompt", "hello"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip()


def test_transformers_5_rope_parameters_per_layer_kind(tmp_path):
    """transformers >= 5 nests Gemma 3's two RoPE settings under the layer
    kinds; read so, they give the same model as the flat keys."""
    config, _ = FAMILIES["gemma3_text"]
    flat = {k: v for k, v in config.items()
            if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    nested = {**flat, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    ids = mx.array(PROMPTS[2])
    want = np.array(load_model(write_tiny_llama(tmp_path / "flat", **config))[0](ids))
    got = np.array(load_model(write_tiny_llama(tmp_path / "nested", **nested))[0](ids))
    np.testing.assert_array_equal(got, want)
    plain = np.array(load_model(write_tiny_llama(tmp_path / "plain", **flat))[0](ids))
    assert np.abs(plain - want).max() > 0.01  # the settings matter


def test_configs_as_transformers_writes_them(family, tmp_path):
    """transformers' own config class lays out the same windows, and the
    config.json it writes (transformers 5: rope_parameters, layer_types, no
    flat RoPE keys) builds the same model."""
    transformers = pytest.importorskip("transformers")
    path, windows = family
    config = json.loads((path / "config.json").read_text())
    theirs = transformers.CONFIG_MAPPING[config["model_type"]](
        **{k: v for k, v in config.items() if k != "model_type"})
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * len(windows)  # Mistral
    assert [theirs.sliding_window if k == "sliding_attention" else None for k in kinds] == windows
    ours, _ = load_model(path)
    assert [layer.self_attn.window for layer in ours.layers] == windows
    written = write_tiny_llama(tmp_path / "t", **theirs.to_dict())
    ids = mx.array(PROMPTS[2])
    np.testing.assert_array_equal(np.array(load_model(written)[0](ids)), np.array(ours(ids)))


@pytest.mark.parametrize("family_name,change,message", [
    ("mistral", {"sliding_window": 0}, "sliding_window"),
    ("mistral", {"sliding_window": 2**40}, "sliding_window"),
    ("gemma2", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("gemma2", {"sliding_window_pattern": -1}, "sliding_window_pattern"),
    ("gemma2", {"attn_logit_softcapping": "50"}, "soft-capping"),
    ("gemma2", {"final_logit_softcapping": 0}, "soft-capping"),
    ("gemma2", {"query_pre_attn_scalar": -256}, "query_pre_attn_scalar"),
    ("gemma3_text", {"rope_parameters": ["x"]}, "rope_parameters"),
    ("gemma3_text", {"rope_local_base_freq": -1}, "RoPE base"),
])
def test_a_bad_window_cap_or_rope_setting_is_a_one_line_config_error(tmp_path, family_name,
                                                                     change, message):
    config, _ = FAMILIES[family_name]
    path = write_tiny_llama(tmp_path / "m", **{**config, **change})
    with pytest.raises(ModelLoadError, match=f"invalid config.json.*{message}") as info:
        load_model(path)
    assert "\n" not in str(info.value)


# -- the CUDA backend's plumbing, its kernel emulated in numpy (no GPU here) ----

def test_cuda_backend_passes_windows_and_caps_to_its_kernel(tmp_path, monkeypatch):
    """Start-up verification asks for the window and cap a model uses (and
    catches a kernel that ignores the window), and every token through the
    kernel gives the portable path's tokens."""
    from kvcache.attention import cuda
    from kvcache.attention.metadata import AttentionSpec

    spec = AttentionSpec(8, 2, 64, 16, mx.float32, sliding_window=True, softcap=True)
    monkeypatch.setattr(cuda, "_get_kernel", partial(emulated_cuda_kernel, ignore_window=True))
    assert cuda.verify(AttentionSpec(8, 2, 64, 16, mx.float32, softcap=True))
    assert not cuda.verify(spec)
    monkeypatch.setattr(cuda, "_get_kernel", emulated_cuda_kernel)
    assert cuda.verify(spec)

    config, windows = FAMILIES["gemma2"]
    path = write_tiny_llama(tmp_path / "g2", **{**config, "head_dim": 64})
    portable = LLM(str(path), **ENGINE, paged_kernel=False)
    llm = LLM(str(path), **ENGINE, paged_kernel=False)
    llm.engine = LLMEngine(portable.engine.model, portable.tokenizer, portable.engine.config,
                           EngineArgs(**ENGINE, compile=False), EmulatedCuda(mx.cpu))
    assert llm.engine.cache.backend.name == "cuda"
    want = [o.token_ids for o in engine_outputs(portable, PROMPTS)]
    assert [o.token_ids for o in engine_outputs(llm, PROMPTS)] == want
