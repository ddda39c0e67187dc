"""What an encoder's attention layer attends through: every token of a padded
row sees every real token of its row (bidirectional), padding sees nothing.
A causal view (a decoder run as a sentence encoder, engine/embedding/
decoder.py) lets each token see the real tokens up to itself only.

It offers the cache-view interface the shared Attention layer calls
(`attend(q, k, v, scale)` on packed [B*T, heads, dim] MLX arrays, and
`attend_host` for host arrays), so encoder models reuse the decoder's layer.
`attend` is the reference. `attend_host` runs the platform's kernel when the
caller gave one (engine/platform/cpu_ops.py `encoder_attention`, for right-
padded rows), else the same math in numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class EncoderAttentionView:
    def __init__(self, batch: int, length: int, lengths, keep, positions, zeros,
                 host_kernel=None, causal: bool = False):
        self.batch, self.length = batch, length
        # host_kernel(q, k, v, batch, length, lengths, scale, causal=) -> out, or None
        self.host_kernel = host_kernel
        self.causal = causal
        self.lengths = lengths      # [B] real tokens of each row (right padding)
        self.keep = keep            # [B, T] bool, or None when nothing is padded
        self.positions = positions  # [B*T] position of each packed token
        self.zeros = zeros          # [B*T] token type 0

    @classmethod
    def for_batch(cls, input_ids, attention_mask=None, host_kernel=None,
                  causal: bool = False) -> EncoderAttentionView:
        """The view for a batch of ids [B, T] (MLX or numpy) and its mask;
        `host_kernel` attends host arrays (the mask must then be right padding,
        as it must for a causal view)."""
        b, t = input_ids.shape
        lib = np if isinstance(input_ids, np.ndarray) else mx
        positions = lib.broadcast_to(lib.arange(t, dtype=lib.int32)[None], (b, t)).reshape(-1)
        zeros = lib.zeros((b * t,), dtype=lib.int32)
        if attention_mask is None:
            return cls(b, t, None, None, positions, zeros, host_kernel, causal)
        keep = attention_mask != 0
        lengths = keep.astype(lib.int32).sum(axis=1)
        return cls(b, t, lengths, keep, positions, zeros, host_kernel, causal)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float,
               window: int | None = None, softcap: float | None = None) -> mx.array:
        self._check(window, softcap)
        b, t = self.batch, self.length

        def rows(a):
            return a.reshape(b, t, a.shape[1], a.shape[2]).transpose(0, 2, 1, 3)

        mask = None if self.keep is None else self.keep[:, None, None, :]
        if self.causal:
            seen = mx.tril(mx.ones((t, t), dtype=mx.bool_))
            mask = seen if mask is None else mask & seen
        out = mx.fast.scaled_dot_product_attention(rows(q), rows(k), rows(v), scale=scale,
                                                   mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b * t, q.shape[1], q.shape[2])

    def attend_host(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                    window: int | None = None, softcap: float | None = None) -> np.ndarray:
        """The same on host arrays (numpy, float32)."""
        self._check(window, softcap)
        b, t = self.batch, self.length
        if self.host_kernel is not None:
            return self.host_kernel(q, k, v, b, t, self.lengths, scale, causal=self.causal)
        qs, ks, vs = (a.reshape(b, t, a.shape[1], a.shape[2]) for a in (q, k, v))
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            ks, vs = np.repeat(ks, rep, axis=2), np.repeat(vs, rep, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", qs, ks) * np.float32(scale)
        seen = np.ones((b, 1, t, t), dtype=bool)
        if self.keep is not None:
            seen &= np.asarray(self.keep)[:, None, None, :]
        if self.causal:
            seen &= np.tril(np.ones((t, t), dtype=bool))
        if self.keep is not None or self.causal:
            scores = np.where(seen, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, vs).astype(np.float32)
        return out.reshape(b * t, q.shape[1], q.shape[2])

    def _check(self, window, softcap) -> None:
        # No encoder has either. A decoder's sliding window at least as long
        # as the rows changes nothing (the embedder cuts texts to it);
        # otherwise refusing beats attending the wrong way.
        if softcap is not None or (window is not None and window < self.length):
            raise ValueError("encoder attention has no soft-capping, nor a sliding "
                             "window shorter than its rows")
