"""Batched token sampling with per-row parameters, vectorised in MLX.

Randomness is a counter-based hash of (seed, output index, token id), not a
stateful generator: a seeded request draws the same tokens whether it runs
alone or beside others, and after being preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs of one row: params, seed, and token history."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    token_ids: mx.array            # [B] int32
    logprobs: mx.array | None      # [B] logprob of each sampled token
    top_ids: mx.array | None       # [B, K]
    top_logprobs: mx.array | None  # [B, K]


def _hash_uniform(seeds: mx.array, steps: mx.array, vocab: int) -> mx.array:
    """Uniform (0, 1) noise [B, vocab] from a 32-bit integer hash."""
    u32 = mx.uint32
    idx = mx.arange(vocab, dtype=u32)[None, :]
    x = (seeds[:, None] * mx.array(0x9E3779B1, u32)) ^ (steps[:, None] * mx.array(0x85EBCA77, u32))
    x = x ^ (idx * mx.array(0xC2B2AE3D, u32))
    for mult in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = x * mx.array(mult, u32)
    x = x ^ (x >> 16)
    return ((x >> 8).astype(mx.float32) + 0.5) * (1.0 / 16777216.0)


def _apply_penalties(logits: mx.array, rows: list[SamplingRow]) -> mx.array:
    batch, vocab = logits.shape
    width = max(1, max(len(r.prompt_token_ids) + len(r.output_token_ids) for r in rows))
    ids = np.zeros((batch, width), np.int32)
    in_output = np.zeros((batch, width), np.float32)
    present = np.zeros((batch, width), np.float32)
    rep = np.ones(batch, np.float32)
    pres = np.zeros(batch, np.float32)
    freq = np.zeros(batch, np.float32)
    for b, r in enumerate(rows):
        if not r.params.has_penalties:
            continue
        hist = r.prompt_token_ids + r.output_token_ids
        ids[b, :len(hist)] = hist
        present[b, :len(hist)] = 1
        in_output[b, len(r.prompt_token_ids):len(hist)] = 1
        rep[b], pres[b], freq[b] = (r.params.repetition_penalty, r.params.presence_penalty,
                                    r.params.frequency_penalty)
    row_idx = mx.broadcast_to(mx.arange(batch)[:, None], ids.shape)
    ids_mx = mx.array(ids)
    seen = mx.zeros((batch, vocab)).at[row_idx, ids_mx].add(mx.array(present)) > 0
    counts = mx.zeros((batch, vocab)).at[row_idx, ids_mx].add(mx.array(in_output))
    rep_mx = mx.array(rep)[:, None]
    # Repetition penalty (prompt and output, CTRL-style); OpenAI's presence
    # and frequency penalties (output only).
    logits = mx.where(seen, mx.where(logits > 0, logits / rep_mx, logits * rep_mx), logits)
    return (logits - mx.array(pres)[:, None] * (counts > 0)
            - mx.array(freq)[:, None] * counts)


def sample(logits: mx.array, rows: list[SamplingRow]) -> SamplerOutput:
    """Draw one token per row of `logits` [B, V] (lazy; the caller evals)."""
    logits = logits.astype(mx.float32)
    batch, vocab = logits.shape
    if any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits, rows)
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs_all = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if want_logprobs else None

    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    if not all(r.params.greedy for r in rows):
        tokens = mx.where(mx.array([r.params.greedy for r in rows]), tokens,
                          _sample_random(logits, rows))

    out = SamplerOutput(tokens, None, None, None)
    if want_logprobs:
        out.logprobs = mx.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
        k = max(r.params.logprobs or 0 for r in rows)
        if k:
            top = mx.argpartition(-logprobs_all, kth=k - 1, axis=-1)[:, :k]
            top_lp = mx.take_along_axis(logprobs_all, top, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            out.top_ids = mx.take_along_axis(top, order, axis=-1)
            out.top_logprobs = mx.take_along_axis(top_lp, order, axis=-1)
    return out


def _sample_random(logits: mx.array, rows: list[SamplingRow]) -> mx.array:
    batch, vocab = logits.shape
    temps = mx.array([r.params.temperature or 1.0 for r in rows], dtype=mx.float32)
    scaled = logits / temps[:, None]
    neg_inf = mx.array(-mx.inf, dtype=mx.float32)

    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(top_k) or any(p < 1 for p in top_p):
        ordered = -mx.sort(-scaled, axis=-1)  # descending
        rank = mx.arange(vocab)[None, :]
        if any(top_k):
            k = mx.array([k or vocab for k in top_k])[:, None]
            ordered = mx.where(rank < k, ordered, neg_inf)
        probs = mx.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always >= 1 token).
        before = mx.cumsum(probs, axis=-1) - probs
        keep = before < mx.array(top_p, dtype=mx.float32)[:, None]
        last = mx.maximum(keep.sum(axis=-1) - 1, 0)
        threshold = mx.take_along_axis(ordered, last[:, None], axis=-1)
        scaled = mx.where(scaled >= threshold, scaled, neg_inf)

    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        probs = mx.softmax(scaled, axis=-1)
        floor = mx.array(min_p, dtype=mx.float32)[:, None] * probs.max(axis=-1, keepdims=True)
        scaled = mx.where(probs >= floor, scaled, neg_inf)

    seeds = mx.array([r.seed & 0xFFFFFFFF for r in rows], dtype=mx.uint32)
    steps = mx.array([len(r.output_token_ids) for r in rows], dtype=mx.uint32)
    gumbel = -mx.log(-mx.log(_hash_uniform(seeds, steps, vocab)))
    return mx.argmax(scaled + gumbel, axis=-1).astype(mx.int32)
