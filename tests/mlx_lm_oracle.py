"""mlx-lm's models as oracles.

`mlx_lm_greedy` is mlx-lm's own greedy generation. For sliding-window
architectures: mlx-lm's Gemma 2 and its Llama (which serves Mistral) attend
every layer in full, where transformers honours the window. `oracle` gives
each of an mlx-lm model's layers transformers' mask instead (a window on the
sliding layers) and `oracle_greedy` recomputes the whole sequence for every
token, so no cache is involved. Used by the tests and bench/gpu_check.py.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class TransformersMask(nn.Module):
    """An mlx-lm block attending with transformers' mask for its layer."""

    def __init__(self, block, window: int | None):
        super().__init__()
        self.block, self.window = block, window
        self.use_sliding = False  # mlx-lm's Llama asks its blocks this

    def __call__(self, x, mask=None, cache=None):
        from mlx_lm.models.base import create_causal_mask

        return self.block(x, create_causal_mask(x.shape[1], window_size=self.window), cache)


def mlx_lm_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The `n` tokens mlx-lm's generate_step draws greedily after `prompt`."""
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def check_fast_path(path, model, prompts: list[list[int]], n: int = 20):
    """The CPU fast path (its layers bound) batched, alone and the portable
    MLX forward all give mlx-lm's greedy tokens from `model`; returns the
    fast-path LLM for further checks."""
    from engine import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    fast = LLM(str(path), kv_cache_bytes=16 << 20)
    assert fast.engine.runner.host_forward is not None
    portable = LLM(str(path), kv_cache_bytes=16 << 20, host_forward=False)
    batched = [o.outputs[0].token_ids for o in fast.generate(prompts, greedy, use_tqdm=False)]
    alone = [fast.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    slow = [o.outputs[0].token_ids for o in portable.generate(prompts, greedy, use_tqdm=False)]
    assert batched == alone == slow == [mlx_lm_greedy(model, p, n) for p in prompts]
    return fast


def oracle(path, windows: list[int | None]):
    """mlx-lm's model of the checkpoint at `path`, layer i windowed by windows[i]."""
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.model.layers = [TransformersMask(b, w) for b, w in zip(model.model.layers, windows)]
    return model


def oracle_greedy(model, prompt: list[int], n: int):
    """Greedy tokens and each step's log-probabilities [vocab], recomputed in full."""
    tokens, logprobs = list(prompt), []
    for _ in range(n):
        logits = model(mx.array(tokens)[None])[0, -1].astype(mx.float32)
        logprobs.append(np.array(logits - mx.logsumexp(logits)))
        tokens.append(int(np.argmax(logprobs[-1])))
    return tokens[len(prompt):], logprobs



def short_longrope(model, scaling: dict):
    """mlx-lm's model rotating with LongRoPE's short factors (`scaling`, the
    config's rope_scaling): mlx-lm always uses the long ones, transformers and
    Conveyor the short ones within the original context, where every oracle
    sequence of the tests stays."""
    from mlx_lm.models.rope_utils import SuScaledRoPE

    ratio = mx.array(scaling["short_factor"], mx.float32) / mx.array(scaling["long_factor"],
                                                                      mx.float32)
    for _, module in model.named_modules():
        if isinstance(module, SuScaledRoPE):
            module._freqs = module._freqs * ratio
    return model
