"""Batched token sampling with per-row parameters, vectorised in MLX.

Randomness is a counter-based hash of (seed, output index, token id), not a
stateful generator: a seeded request draws the same tokens whether it runs
alone or beside others, and after being preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from engine.core.sampling_params import SamplingParams
from engine.platform.base import PORTABLE_SAMPLING, SamplerKernels
from engine.platform.fast_math import exp_from_arg, exp_shifted_arg

MAX_CANDIDATES = 1024  # tokens considered by top-k / top-p filtering


@dataclass
class SamplingRow:
    """What the sampler needs of one row: params, seed, and token history.
    The engine passes its Requests instead, which have these attributes:
    a row object a step for each of 256 rows costs the host ~0.1 ms."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def num_output_tokens(self) -> int:
        """The output index of the token drawn now (its noise's counter)."""
        return len(self.output_token_ids)


@dataclass
class TokenMask:
    """The tokens constrained rows may draw (engine/core/structured_output.py):
    `bitmask[j]` is row `rows[j]`'s mask, bit t % 32 of int32 word t // 32
    set when token t is allowed. Rows not listed are not masked at all."""

    rows: list[int]
    bitmask: np.ndarray


@dataclass(frozen=True)
class RowNeeds:
    """Which of the sampler's per-row options some row of a batch may use.
    False promises that no row does, so `sample` skips checking every row
    for it (3 passes over 256 rows cost the host ~50 us a step); True means
    look at each row."""

    penalties: bool = True
    random: bool = True   # a row that is not greedy
    logprobs: bool = True


class RowNeedsCounter:
    """How many live requests use each option, kept as requests come and
    go (the engine's): a batch's rows are some of them, so an option none
    uses is one no row uses. `constrained` counts requests under a grammar
    (their rows get a TokenMask)."""

    def __init__(self):
        self.penalties = self.random = self.logprobs = self.constrained = 0

    def count(self, params: SamplingParams, change: int) -> None:
        """Add (`change` 1) or take away (-1) a request's options."""
        self.penalties += change * params.has_penalties
        self.random += change * (not params.greedy)
        self.logprobs += change * (params.logprobs is not None)
        self.constrained += change * (params.structured_outputs is not None)

    @property
    def host_bound(self) -> bool:
        """Some live request needs its previous token on the host before
        its next row is drawn (penalties, a grammar)."""
        return self.penalties > 0 or self.constrained > 0

    @property
    def needs(self) -> RowNeeds:
        return RowNeeds(self.penalties > 0, self.random > 0, self.logprobs > 0)


# A masked-out token's logprob is reported as this (vLLM's floor), not -inf,
# which JSON cannot carry.
MASKED_LOGPROB = -9999.0


@dataclass
class SamplerOutput:
    token_ids: mx.array            # [B] int32
    logprobs: mx.array | None      # [B] logprob of each sampled token
    top_ids: mx.array | None       # [B, K]
    top_logprobs: mx.array | None  # [B, K]


# MLX's CPU exp and log run one scalar at a time: over a [64, 49152] logits
# array a logsumexp took ~38 ms and Gumbel noise (two logs) ~75 ms, more than
# a decode step's attention. So the platform hands the sampler its kernels
# (SamplerKernels): on the CPU the exp is the vectorised polynomial of
# engine/platform/fast_math.py and the whole-vocabulary passes run in C. Full-
# vocabulary draws use the inverse CDF (one uniform a row), which needs no log.


def _exp_below(x: mx.array, top: mx.array, kernels: SamplerKernels) -> mx.array:
    """e^(x - top) for finite x <= top (top broadcast along the last axis)."""
    if kernels.fast_exp:
        return exp_from_arg(exp_shifted_arg(x, top))
    return mx.exp(x - top)


def _logsumexp(x: mx.array, kernels: SamplerKernels) -> mx.array:
    """logsumexp over the last axis (keepdims) of finite x [B, V]; with host
    kernels in C (one vectorised pass a row)."""
    if kernels.host is not None:
        lse, _ = kernels.host.softmax(_host_f32(x), np.ones(x.shape[0], np.float32))
        return mx.array(lse)[:, None]
    top = x.max(axis=-1, keepdims=True)
    return top + mx.log(_exp_below(x, top, kernels).sum(axis=-1, keepdims=True))


def _hash_uniform(seeds: mx.array, steps: mx.array, token_ids: mx.array) -> mx.array:
    """Uniform (0, 1) noise for each (row, token id) from a 32-bit integer
    hash; `token_ids` is [V] or [B, K]. Keyed by token id, so drawing from a
    candidate subset gives each token the same noise as the full vocabulary."""
    u32 = mx.uint32
    ids = token_ids.astype(u32)
    if ids.ndim == 1:
        ids = ids[None, :]
    x = (seeds[:, None] * mx.array(0x9E3779B1, u32)) ^ (steps[:, None] * mx.array(0x85EBCA77, u32))
    x = x ^ (ids * mx.array(0xC2B2AE3D, u32))
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


def sample(logits: mx.array, rows: list[SamplingRow],
           kernels: SamplerKernels = PORTABLE_SAMPLING,
           mask: TokenMask | None = None, needs: RowNeeds = RowNeeds()) -> SamplerOutput:
    """Draw one token per row of `logits` [B, V] (lazy; the caller evals),
    with the platform's `kernels` (the same draws on every path); `mask`
    limits the constrained rows to their allowed tokens; `needs` says which
    options no row uses (the rows are not checked for those)."""
    logits = logits.astype(mx.float32)
    batch, vocab = logits.shape
    if needs.penalties and any(r.params.has_penalties for r in rows):
        logits = _apply_penalties(logits, rows)
    if mask is not None:
        logits = _apply_mask(logits, mask, on_host=kernels.host is not None)
        if kernels.fast_exp and kernels.host is None:
            kernels = replace(kernels, fast_exp=False)  # the polynomial exp needs finite input
    want_logprobs = needs.logprobs and any(r.params.logprobs is not None for r in rows)
    logprobs_all = logits - _logsumexp(logits, kernels) if want_logprobs else None
    if want_logprobs and mask is not None:
        logprobs_all = mx.maximum(logprobs_all, MASKED_LOGPROB)

    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    if needs.random and not all(r.params.greedy for r in rows):
        tokens = mx.where(mx.array([r.params.greedy for r in rows]), tokens,
                          _sample_random(logits, rows, kernels))

    out = SamplerOutput(tokens, None, None, None)
    if want_logprobs:
        out.logprobs = mx.take_along_axis(logprobs_all, tokens[:, None], axis=-1)[:, 0]
        k = max(r.params.logprobs or 0 for r in rows)
        if k:
            out.top_ids = _top_ids(logprobs_all, k, kernels)
            out.top_logprobs = mx.take_along_axis(logprobs_all, out.top_ids, axis=-1)
    return out


_BIAS = np.array([-np.inf, 0.0], np.float32)  # indexed by "allowed"


def _apply_mask(logits: mx.array, mask: TokenMask, on_host: bool) -> mx.array:
    """-inf for every token a constrained row may not draw; other rows keep
    their values. Each row is masked on its own, so a row draws the same
    token alone or in any batch. On the CPU (`on_host`) the rows are changed
    in numpy, where the logits already are: MLX's CPU scatter and `where` took
    ~13 ms for 32 rows of 49k against ~3 ms. Elsewhere the packed bits go to
    the device (4 bytes per 32 tokens) and are unpacked there."""
    vocab = logits.shape[1]
    if on_host:
        allowed = np.unpackbits(mask.bitmask.view(np.uint8), axis=1, bitorder="little")
        host = np.array(logits)
        host[mask.rows] += np.take(_BIAS, allowed[:, :vocab])
        return mx.array(host)
    bits = mx.array(mask.bitmask)[:, :, None] >> mx.arange(32, dtype=mx.int32)
    allowed = (bits & 1).reshape(len(mask.rows), -1)[:, :vocab].astype(mx.bool_)
    idx = mx.array(mask.rows, dtype=mx.int32)
    logits[idx] = mx.where(allowed, logits[idx], mx.array(-mx.inf, dtype=mx.float32))
    return logits


def _host_f32(x: mx.array) -> np.ndarray:
    """x evaluated and seen from numpy as float32, without a copy when it
    already is (the logits are ~12 MB at 64 rows)."""
    return np.asarray(x if x.dtype == mx.float32 else x.astype(mx.float32))


def _top_ids(x: mx.array, k: int, kernels: SamplerKernels) -> mx.array:
    """[B, k] ids of each row's k largest entries of x [B, V], largest first."""
    if kernels.host is not None:  # a C selection instead of MLX's argpartition
        return mx.array(kernels.host.top_k(_host_f32(x), k))
    ids = mx.argpartition(-x, kth=k - 1, axis=-1)[:, :k]
    order = mx.argsort(-mx.take_along_axis(x, ids, axis=-1), axis=-1)
    return mx.take_along_axis(ids, order, axis=-1)


def _row_seeds(rows: list[SamplingRow]) -> mx.array:
    return mx.array([(r.seed ^ (r.seed >> 32)) & 0xFFFFFFFF for r in rows], dtype=mx.uint32)


def _row_steps(rows: list[SamplingRow]) -> mx.array:
    return mx.array([r.num_output_tokens for r in rows], dtype=mx.uint32)


def _gumbel(rows: list[SamplingRow], token_ids: mx.array) -> mx.array:
    return -mx.log(-mx.log(_hash_uniform(_row_seeds(rows), _row_steps(rows), token_ids)))


def _sample_random(logits: mx.array, rows: list[SamplingRow],
                   kernels: SamplerKernels) -> mx.array:
    batch, vocab = logits.shape
    # Greedy rows take the argmax; a neutral temperature keeps their (unused)
    # draw finite instead of dividing by ~0.
    temps = mx.array([1.0 if r.params.greedy else r.params.temperature for r in rows],
                     dtype=mx.float32)
    scaled = logits / temps[:, None]
    neg_inf = mx.array(-mx.inf, dtype=mx.float32)
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if not (any(top_k) or any(p < 1 for p in top_p) or any(min_p)):
        return _inverse_cdf(logits, scaled, temps, rows, kernels)

    # Filtering keeps few tokens, so draw among the top MAX_CANDIDATES only:
    # whole-vocabulary sorts and noise are slow on the CPU (seconds at 256
    # rows). top_k is exact up to that size; top_p and min_p are exact
    # whenever the tokens they keep fit in the candidates.
    cand = min(vocab, max(max(top_k), MAX_CANDIDATES))
    ids = _top_ids(scaled, cand, kernels)
    vals = mx.take_along_axis(scaled, ids, axis=-1)
    rank = mx.arange(cand)[None, :]
    keep = rank < mx.array([k or cand for k in top_k])[:, None]
    # Probabilities against the whole vocabulary.
    probs = mx.exp(vals - _logsumexp(scaled, kernels))
    before = mx.cumsum(mx.where(keep, probs, 0), axis=-1) - probs
    keep = keep & (before < mx.array(top_p, dtype=mx.float32)[:, None])
    keep = keep & (probs >= mx.array(min_p, dtype=mx.float32)[:, None] * probs[:, :1])
    keep = keep | (rank == 0)  # the most likely token always survives
    choice = mx.argmax(mx.where(keep, vals, neg_inf) + _gumbel(rows, ids), axis=-1)
    return mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(mx.int32)


def _inverse_cdf(logits: mx.array, scaled: mx.array, temps: mx.array,
                 rows: list[SamplingRow], kernels: SamplerKernels) -> mx.array:
    """One draw a row from softmax(scaled) over the whole vocabulary: the
    first token whose cumulative weight passes u * total, u keyed by (seed,
    output index) as the candidates' noise is. With host kernels in C from
    the unscaled logits and temps (the same draw, ~2 ms instead of ~18)."""
    u = _hash_uniform(_row_seeds(rows), _row_steps(rows), mx.array([-1], dtype=mx.int32))
    if kernels.host is not None:
        _, ids = kernels.host.softmax(_host_f32(logits), np.asarray(temps), np.asarray(u)[:, 0])
        return mx.array(ids)
    weights = _exp_below(scaled, scaled.max(axis=-1, keepdims=True), kernels)
    cdf = mx.cumsum(weights, axis=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: keep the target inside.
    target = mx.minimum(u * total, total * (1 - 2**-20))
    return mx.argmax(cdf > target, axis=-1).astype(mx.int32)
