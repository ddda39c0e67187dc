"""A decoder language model run as a sentence encoder (Qwen3-Embedding and
other last-token embedders).

The decoder's own inner model (`Model.model`, as in mlx-lm: token ids and
positions in, final-norm hidden states out) runs over a padded batch packed
as [B*T] tokens, every attention layer attending through one causal
EncoderAttentionView instead of a KV cache: a text is a single prefill, so
nothing is cached. The LM head is left out. From here on the Embedder treats
it as it treats BERT (the CPU fast path binds its layers the same way, pooling
reads its hidden states), so embeddings have one path whatever the model.
"""

from __future__ import annotations

import mlx.nn as nn

from engine.errors import ModelLoadError
from models.layers import Attention
from models.layers.encoder_attention import EncoderAttentionView


class DecoderEncoder(nn.Module):
    """`encoder(input_ids, attention_mask)` -> hidden states [B, T, D] of a
    decoder, each token seeing its row's tokens up to itself (right padding)."""

    causal = True  # the Embedder builds causal attention views for it

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.model = decoder.model  # embeddings, blocks, final norm; no LM head
        self.hidden_size = int(decoder.args.hidden_size)
        layers = [m for _, m in self.model.named_modules() if isinstance(m, Attention)]
        if any(layer.softcap is not None for layer in layers):
            raise ModelLoadError("a decoder with soft-capped attention cannot embed here "
                                 "(the encoder attention kernel has no soft-capping)")
        # Texts are cut to the narrowest sliding window, inside which every
        # layer sees the whole text, as it would without a window.
        windows = [layer.window for layer in layers if layer.window is not None]
        self.max_length = min([int(decoder.args.max_position_embeddings), *windows])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *,
                 view: EncoderAttentionView | None = None):
        if view is None:
            view = EncoderAttentionView.for_batch(input_ids, attention_mask, causal=True)
        b, t = input_ids.shape
        layers = self.model.layers
        hidden = self.model(input_ids.reshape(-1), view.positions, [view] * len(layers))
        return hidden.reshape(b, t, -1)


def is_decoder(model: nn.Module) -> bool:
    """A decoder in mlx-lm's shape: an inner `model` of layers behind a head."""
    inner = getattr(model, "model", None)
    return isinstance(inner, nn.Module) and hasattr(inner, "layers") \
        and hasattr(getattr(model, "args", None), "hidden_size")
