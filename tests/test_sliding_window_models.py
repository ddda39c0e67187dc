"""Gemma 2, Gemma 3 (text) and Mistral: sliding-window layers, soft-capping and
Gemma's layers, on tiny random checkpoints, against mlx-lm.

mlx-lm's Gemma 2 and its Llama (which serves Mistral) attend every layer in
full, where transformers honours the window; so the oracle is mlx-lm's model
with each layer given transformers' mask (a window on the sliding layers),
recomputing the whole sequence for every token. mlx-lm's own Gemma 3 windows
its layers itself, and is checked to agree with that oracle. Windows are a
few tokens and blocks 4 tokens, so the prompts outgrow both; Mistral, whose
every layer slides, gives blocks behind its window back to the pool.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import TINY_GEMMA2, TINY_GEMMA3, TINY_MISTRAL, write_tiny_llama

from engine import LLM, SamplingParams
from engine.entrypoints.cli import main
from engine.loading.loader import load_model
from kvcache.block_manager import FREED
from kvcache.paged_cache import PagedKVCache

# Each family's tiny config and the window of each of its layers (None: full),
# as transformers lays them out: Gemma 2 every other layer from the first,
# Gemma 3 all but every `sliding_window_pattern`-th, Mistral all.
FAMILIES = {
    "gemma2": (TINY_GEMMA2, [8, None, 8]),
    "gemma3_text": (TINY_GEMMA3, [12, 12, None]),
    "mistral": (TINY_MISTRAL, [8, 8]),
}
PROMPTS = [[5, 9, 200], list(range(20, 33)), [int(t) for t in
                                              np.random.default_rng(2).integers(3, 300, 45)]]
NEW_TOKENS = 12
LOGPROB_TOLERANCE = 2e-4  # engine log-probabilities against the oracle's, every path
ENGINE = dict(kv_cache_bytes=4 << 20, block_size=4, max_num_batched_tokens=16)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    config, windows = FAMILIES[request.param]
    return write_tiny_llama(tmp_path_factory.mktemp(request.param), **config), windows


class TransformersMask(nn.Module):
    """An mlx-lm block attending with transformers' mask for its layer."""

    def __init__(self, block, window):
        super().__init__()
        self.block, self.window, self.use_sliding = block, window, False

    def __call__(self, x, mask=None, cache=None):
        from mlx_lm.models.base import create_causal_mask

        return self.block(x, create_causal_mask(x.shape[1], window_size=self.window), cache)


def oracle(path, windows):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(path)
    model.model.layers = [TransformersMask(b, w) for b, w in zip(model.model.layers, windows)]
    return model


def oracle_greedy(model, prompt, n=NEW_TOKENS):
    """Greedy tokens and each step's log-probabilities, recomputed in full."""
    tokens, logprobs = list(prompt), []
    for _ in range(n):
        logits = model(mx.array(tokens)[None])[0, -1]
        logprobs.append(np.array(logits - mx.logsumexp(logits)))
        tokens.append(int(np.argmax(logprobs[-1])))
    return tokens[len(prompt):], logprobs


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
        assert tokens == oracle_greedy(oracle(path, windows), prompt)[0]


def engine_outputs(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("path_kind", ["fast", "mlx-forward", "portable"])
def test_greedy_tokens_match_mlx_lm_alone_and_batched(family, path_kind):
    """The CPU fast path (every layer on its C kernel), the MLX forward over
    the C attention kernel, and the portable path (MLX forward and attention),
    with prompts longer than the window cut into chunks of 16 tokens."""
    path, windows = family
    options = {"fast": {}, "mlx-forward": dict(host_forward=False),
               "portable": dict(host_forward=False, paged_kernel=False)}[path_kind]
    llm = LLM(str(path), **ENGINE, **options)
    runner = llm.engine.runner
    assert (runner.host_forward is not None) == (path_kind == "fast")
    assert runner.backend.name == ("portable" if path_kind == "portable" else "cpu")
    model = oracle(path, windows)
    want = [oracle_greedy(model, p) for p in PROMPTS]
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


def test_mistral_gives_back_blocks_behind_its_window(tmp_path):
    """A 45-token prompt and 12 new tokens would fill 15 blocks of 4; with a
    window of 8 a sequence holds at most the window, a 16-token chunk and the
    blocks they straddle. Prefix caching still finds the released blocks."""
    config, windows = FAMILIES["mistral"]
    path = write_tiny_llama(tmp_path / "m", **config)
    llm = LLM(str(path), **ENGINE)
    steps: list[int] = []
    held_blocks(llm, steps)
    want = oracle_greedy(oracle(path, windows), PROMPTS[2])[0]
    assert engine_outputs(llm, [PROMPTS[2]])[0].token_ids == want
    assert max(steps) <= (8 + 16) // 4 + 2 and steps[-1] <= 8 // 4 + 2
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    # The same prompt again: its first blocks come from the prefix cache.
    assert engine_outputs(llm, [PROMPTS[2]])[0].token_ids == want
    assert llm.engine.blocks.prefix_hits > 0


def test_mistral_preempted_under_a_tight_budget_gives_the_same_tokens(tmp_path):
    config, windows = FAMILIES["mistral"]
    path = write_tiny_llama(tmp_path / "m", **config)
    per_block = PagedKVCache.bytes_per_block(2, 4, 2, 16, mx.float32)
    prompts = PROMPTS + [PROMPTS[2][::-1], PROMPTS[1] * 3]
    roomy = engine_outputs(LLM(str(path), **ENGINE), prompts)
    tight = LLM(str(path), **{**ENGINE, "kv_cache_bytes": 14 * per_block})
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
