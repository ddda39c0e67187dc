"""The dummy step the memory plan measures (vLLM's profile run): the engine's
own forward and sampler over a batch as heavy as the scheduler can make one,
in a pool of just the blocks that batch needs."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from engine.core.model_runner import ModelRunner
from engine.core.sampler import SamplingRow, sample
from engine.core.sampling_params import SamplingParams
from kvcache.paged_cache import PagedKVCache
from scheduler.scheduler import ScheduledChunk, SchedulerOutput

# Nucleus sampling sorts each row's logits: the sampler's costliest path.
DUMMY_SAMPLING = SamplingParams(temperature=1.0, top_p=0.95)


def dummy_lengths(tokens: int, step_tokens: int, max_num_seqs: int,
                  max_model_len: int) -> list[int]:
    """Chunk lengths of a `tokens`-token stand-in for a full step of
    `step_tokens`: its share of the most rows a step may run (every row's
    logits and sampling take memory), one token each, and the rest in
    chunks as long as max_model_len allows (a long prompt chunk's attention
    takes the most)."""
    step_tokens = min(step_tokens, max_num_seqs * max_model_len)
    tokens = min(tokens, step_tokens)
    rows = max(1, min(max_num_seqs, step_tokens) * tokens // step_tokens)
    rows = max(rows, -(-tokens // max_model_len))
    lengths, left = [], tokens
    for i in range(rows):
        take = min(max_model_len, left - (rows - i - 1))
        lengths.append(take)
        left -= take
    return lengths


def dummy_step(model, make_cache: Callable[[int], PagedKVCache], block_size: int, host_forward,
               sampler_kernels, lengths: list[int]) -> Callable[[], None]:
    """Allocate the pool a step of chunks of `lengths` tokens needs (with
    `make_cache(num_blocks)`) and return what runs that step: the forward
    and the sampler, evaluated."""
    chunks, rows, next_block = [], [], 0
    bs = block_size
    for i, n in enumerate(lengths):
        blocks = -(-n // bs)
        table = tuple(range(next_block, next_block + blocks))
        chunks.append(ScheduledChunk(f"dummy-{i}", (0,) * n, 0, table, True))
        rows.append(SamplingRow(DUMMY_SAMPLING, i, [0] * n, []))
        next_block += blocks
    cache = make_cache(next_block)
    runner = ModelRunner(model, cache, host_forward=host_forward)
    batch = runner.prepare(SchedulerOutput(tuple(chunks)))

    def run() -> None:
        result = sample(runner.forward(batch), rows, sampler_kernels)
        mx.eval(result.token_ids, *cache.k, *cache.v)

    return run
