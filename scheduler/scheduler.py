"""Continuous batching: every step admits, runs, preempts and finishes.

The policy follows vLLM v1: each sequence's `num_computed_tokens` catches up
with its `num_tokens` under one token budget per step, which makes decode,
chunked prefill and recomputation after preemption the same rule. Running
sequences go first (oldest first); waiting ones are admitted first come,
first served while the batch size, the token budget and free blocks allow.
When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it is requeued at the
front, to be recomputed later. With prefix caching (kvcache/block_manager.py)
an admitted sequence starts after the longest cached prefix of its tokens, so
a shared prompt prefix, or a preempted sequence's own blocks while they are
still cached, is not computed again. When every layer of the model has a
sliding window, blocks behind a sequence's window go back to the pool as it
advances (BlockManager.release_behind_window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from kvcache.block_manager import BlockManager
from scheduler.sequence import PENDING, FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192


# A ScheduledChunk is made once per row and step (256 rows a step on a GPU,
# where the host is the bottleneck): with slots and not frozen, which made
# building one ~4x dearer (~0.1 ms a step at 256 rows). Nothing changes a
# chunk once it is made.
@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's share of a step: compute `token_ids` at positions
    `start .. start+len-1`, writing K/V through `block_table`."""

    seq_id: str
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    samples: bool  # the chunk reaches the end of the sequence: sample a token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()
    num_batched_tokens: int = -1  # the chunks' tokens (-1: counted here)

    def __post_init__(self):
        if self.num_batched_tokens < 0:
            object.__setattr__(self, "num_batched_tokens",
                               sum(len(c.token_ids) for c in self.chunks))

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def decode_only(self) -> bool:
        """Every chunk is one token."""
        return self.num_batched_tokens == len(self.chunks)

    @cached_property
    def seq_ids(self) -> list[str]:
        """The sequence of each chunk, in order (asked by several consumers)."""
        return [chunk.seq_id for chunk in self.chunks]


# What a step will have done to one sequence once it has run: (seq, row,
# computed, index, fills): its computed count then, where its sampled token
# goes (index into token_ids, None if the chunk samples nothing), taken from
# `row` of the step's sampled ids, and whether the chunk completes a block
# (only then has prefix caching a block to register). A plain tuple: even a
# named one costs ~0.2 us a row to build, 50 us a step at 256 rows.
PlannedResult = tuple[Sequence, int, int, int | None, bool]


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class RequestTooLong(ValueError):
    """The request cannot run even alone: prompt plus output exceed the
    model's context or the whole KV budget."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.stats = SchedulerStats()

    # -- requests ----------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        total = num_prompt_tokens + max_tokens
        limit = self.config.max_model_len
        if num_prompt_tokens == 0:
            raise RequestTooLong("the prompt is empty")
        if total > limit:
            raise RequestTooLong(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the model's context of {limit} tokens")
        # With a sliding window on every layer, what must fit is the window
        # and a step's chunk, not the whole sequence.
        if self.blocks.most_blocks_held(total, self.config.max_num_batched_tokens) > \
                self.blocks.num_blocks:
            capacity = self.blocks.num_blocks * self.blocks.block_size
            raise RequestTooLong(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the whole KV cache ({capacity} tokens); raise kv_cache_bytes")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        if seq.seq_id in self.sequences:
            raise ValueError(f"duplicate request id {seq.seq_id!r}")
        self.sequences[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now (stop, length, abort) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        if seq.num_pending:  # tokens of steps in flight past the end: never filled in
            del seq.token_ids[seq.num_tokens - seq.num_pending:]
            seq.num_pending = 0
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.sequences.pop(seq.seq_id, None)
        self.stats.finished[reason.value] = self.stats.finished.get(reason.value, 0) + 1

    def abort(self, seq_id: str) -> Sequence | None:
        seq = self.sequences.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    # -- one step ----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        # Every running sequence every step (256 rows a step on a GPU, where
        # the host is the bottleneck): its chunk is made here, with one call
        # (its table, whose length says whether it needs a block).
        running, max_len = SequenceStatus.RUNNING, self.config.max_model_len
        table_snapshot, bs = self.blocks.table_snapshot, self.blocks.block_size
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            tokens = seq.token_ids
            end = len(tokens)
            # Its token on the way (asynchronous scheduling) is its last one
            # (max_tokens, context): nothing left to compute. Sequence.
            # length_reached_at's test, inline: a call a row is ~20 us a step.
            if seq.num_pending and (end >= seq.max_num_tokens or end >= max_len):
                continue
            start = seq.num_computed_tokens
            stop = end if end - start <= budget else start + budget
            table = table_snapshot(seq.seq_id)
            if stop > len(table) * bs:  # most decode steps: the newest block has room
                if not self._reserve(seq, stop, preempted):
                    continue
                table = table_snapshot(seq.seq_id)  # preempting others left it as it is
            ids = (tokens[start],) if stop - start == 1 else tuple(tokens[start:stop])
            chunks.append(ScheduledChunk(seq.seq_id, ids, start, table, stop == end))
            budget -= stop - start

        # Admit only when nothing was preempted: a step short of blocks for
        # its running sequences has none to give to new ones.
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            # A waiting sequence holds no blocks (new, or preempted and freed):
            # it starts from the longest prefix of its tokens already cached.
            hits = self.blocks.cached_prefix(seq.token_ids, seq.seq_id)
            cached = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_take_prefix(hits, cached + n):
                break
            seq.num_computed_tokens = self.blocks.take_prefix(seq.seq_id, hits,
                                                              seq.num_prompt_tokens)
            seq.num_cached_tokens = seq.num_computed_tokens
            self.blocks.allocate(seq.seq_id, cached + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(self._chunk(seq, n))
            budget -= n

        self.stats.steps += 1
        return SchedulerOutput(tuple(chunks), tuple(preempted),
                               self.config.max_num_batched_tokens - budget)

    def _reserve(self, seq: Sequence, num_tokens: int, preempted: list[str]) -> bool:
        """Grow `seq`'s blocks to hold `num_tokens`, preempting the most
        recently admitted sequences if needed; False when `seq` itself was
        preempted."""
        need = self.blocks.blocks_needed(seq.seq_id, num_tokens)
        while not self.blocks.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.seq_id)
            if victim is seq:
                return False
        self.blocks.allocate(seq.seq_id, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(seq.seq_id, tuple(seq.token_ids[start:start + n]), start,
                              self.blocks.table_snapshot(seq.seq_id),
                              start + n == len(seq.token_ids))

    def update(self, output: SchedulerOutput, sampled: list[int]) -> list[tuple[Sequence, int]]:
        """Record a finished step: `sampled[i]` is the token drawn for
        `output.chunks[i]` (ignored where the chunk does not sample). Returns
        the (sequence, new token) pairs; finished sequences free their blocks."""
        return self.resolve(self.plan_results(output), sampled)

    def plan_results(self, output: SchedulerOutput) -> list[PlannedResult]:
        """Advance every scheduled sequence as if `output` had run, with a
        PENDING token for each sampled one, so the next step can be planned
        while this one runs (asynchronous scheduling); `resolve` fills them in."""
        planned = []
        sequences, running = self.sequences, SequenceStatus.RUNNING
        bs = self.blocks.block_size
        for row, chunk in enumerate(output.chunks):
            seq = sequences.get(chunk.seq_id)
            if seq is None or seq.status is not running:
                continue  # aborted or preempted since the step was planned
            n = len(chunk.token_ids)
            computed = seq.num_computed_tokens = seq.num_computed_tokens + n
            index = None
            if chunk.samples:
                index = len(seq.token_ids)
                seq.token_ids.append(PENDING)
                seq.num_pending += 1
            planned.append((seq, row, computed, index, computed % bs < n))
        return planned

    def resolve(self, planned: list[PlannedResult], sampled: list[int],
                ) -> list[tuple[Sequence, int]]:
        """Fill in the tokens a step sampled (`sampled[row]`), register its
        computed blocks for prefix caching and finish what stopped. Sequences
        finished meanwhile are skipped; one preempted meanwhile keeps its token."""
        new_tokens = []
        finished, running = SequenceStatus.FINISHED, SequenceStatus.RUNNING
        max_model_len = self.config.max_model_len
        # Registration has nothing to do unless the chunk completed a block:
        # the sequence's earlier blocks were registered by the chunks that
        # completed them (or it was freed since, and its prefix taken anew).
        register = self.blocks.register_computed
        # Without a sliding window no block is ever released behind one.
        release = self.blocks.release_behind_window if self.blocks.sliding_window else None
        for seq, row, computed, index, fills in planned:
            status = seq.status
            if status is finished:
                continue
            if index is not None:
                token = sampled[row]
                seq.token_ids[index] = token
                seq.num_pending -= 1
                new_tokens.append((seq, token))
            if status is running:
                if fills:
                    register(seq.seq_id, seq.token_ids, computed)
                if release is not None:  # registered first: leaving blocks stay findable
                    release(seq.seq_id, computed)
            # stop_reason_at's condition, asked here first: most rows go on,
            # and a call a row costs ~20 us a step at 256 rows.
            if index is not None and (token in seq.end_token_ids or index + 1 >= max_model_len
                                      or index + 1 >= seq.max_num_tokens):
                # (drops a later step's PENDING token)
                self.finish(seq, seq.stop_reason_at(index, token, max_model_len))
        return new_tokens

    def reset(self, reason: FinishReason = FinishReason.ABORT) -> list[Sequence]:
        """Finish every sequence (after a failed step): nothing keeps a block."""
        everyone = list(self.running) + list(self.waiting)
        for seq in everyone:
            self.finish(seq, reason)
        return everyone
