"""One generation request inside the engine: its sequence, its text, its stops."""

from __future__ import annotations

import time
from typing import Any

from engine.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.loading.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.sequence import FinishReason, Sequence


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer, seed: int,
                 matcher: Any = None):
        """`matcher`: the grammar matcher of a constrained request
        (engine/core/structured_output.py), advanced by every sampled token."""
        self.request_id = request_id
        self.matcher = matcher
        self.prompt = prompt
        self.params = params
        self.seed = seed
        self.sequence = Sequence(
            request_id, list(prompt_token_ids), params.max_tokens,
            eos_token_ids=frozenset(tokenizer.eos_token_ids),
            stop_token_ids=frozenset(params.stop_token_ids or ()),
            ignore_eos=params.ignore_eos)
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=params.skip_special_tokens,
        ) if params.detokenize else None
        self.text = ""                 # visible text (stop strings cut off)
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self._stop_tail = max((len(s) for s in params.stop or ()), default=0)
        self._sent_chars = 0
        self._sent_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # What the sampler reads of a row (engine/core/sampler.py's SamplingRow).
    @property
    def prompt_token_ids(self) -> list[int]:
        return self.sequence.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.sequence.output_token_ids

    @property
    def num_output_tokens(self) -> int:
        return self.sequence.num_output_tokens

    def append(self, token: int, logprob: Logprob | None) -> FinishReason | None:
        """Record a sampled token (already in the sequence); return a stop
        reason when a stop string matched (the caller finishes the sequence)."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        # Stop strings need text (SamplingParams checks), so without a
        # detokenizer there is nothing to add or look for.
        if self.detokenizer is not None and self._add_text(token):
            return FinishReason.STOP
        if self.matcher is not None:
            return self._advance_matcher(token)
        return None

    def _add_text(self, token: int) -> bool:
        """Detokenize `token` onto the text; True when a stop string matched."""
        if token in self.sequence.end_token_ids:
            return False  # EOS and stop tokens are not part of the text
        start = len(self.text)
        self.text += self.detokenizer.add(token)
        return bool(self.params.stop) and len(self.text) > start and self._find_stop(start)

    def _advance_matcher(self, token: int) -> FinishReason | None:
        # A preempted request is recomputed from its tokens without drawing
        # them again, so its matcher already stands where it should.
        if not self.matcher.consume_token(token):
            self.error = f"constrained decoding failed: {self.matcher.get_error()}"
            return FinishReason.ABORT
        if self.matcher.is_stopped():  # the grammar allows nothing more
            return FinishReason.STOP
        return None

    def _find_stop(self, start: int) -> bool:
        # A new match must end inside the new text: look from one stop's length back.
        base = max(0, start - self._stop_tail + 1)
        window = self.text[base:]
        hits = [(window.find(s), s) for s in self.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:base + index]
        self.stop_reason = stop
        return True

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finished:
            return
        if self.stop_reason is None and self.detokenizer:  # held back for UTF-8 completeness
            self.text += self.detokenizer.flush()
        self.finish_reason = reason
        self.error = error or self.error
        self.metrics.finished_time = time.monotonic()
        if reason == FinishReason.STOP and self.stop_reason is None:
            last = self.sequence.token_ids[-1] if self.sequence.num_output_tokens else None
            if last in self.sequence.stop_token_ids:
                self.stop_reason = last

    def output(self, delta: bool) -> RequestOutput:
        """The whole result, or only what is new since the last delta. While
        running, a delta holds back text that could still start a stop string."""
        token_ids = self.sequence.settled_output_token_ids
        if delta:
            visible = len(self.text) if self.finished else max(
                self._sent_chars, len(self.text) - max(0, self._stop_tail - 1))
            text = self.text[self._sent_chars:visible]
            ids = token_ids[self._sent_tokens:]
            logprobs = None if self.logprobs is None else self.logprobs[self._sent_tokens:]
            self._sent_chars, self._sent_tokens = visible, len(token_ids)
        else:
            text, ids, logprobs = self.text, list(token_ids), self.logprobs
        completion = CompletionOutput(0, text, ids, self.finish_reason, logprobs,
                                      self.stop_reason)
        return RequestOutput(self.request_id, self.prompt, self.sequence.prompt_token_ids,
                             [completion], self.finished, self.metrics, self.error)
