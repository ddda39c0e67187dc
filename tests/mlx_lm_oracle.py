"""mlx-lm's models as oracles for sliding-window architectures.

mlx-lm's Gemma 2 and its Llama (which serves Mistral) attend every layer in
full, where transformers honours the window. `oracle` gives each of an
mlx-lm model's layers transformers' mask instead (a window on the sliding
layers) and `oracle_greedy` recomputes the whole sequence for every token,
so no cache is involved. Used by tests/test_sliding_window_models.py and
bench/gpu_check.py.
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
