"""What a request returns (vLLM's shapes)."""

from __future__ import annotations

import msgspec


class Logprob(msgspec.Struct):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class CompletionOutput(msgspec.Struct):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    logprobs: list[Logprob] | None = None
    stop_reason: str | int | None = None    # the stop string or token that matched

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


class RequestMetrics(msgspec.Struct):
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


class RequestOutput(msgspec.Struct):
    """A request's state: the whole text so far, or (when streaming) the
    delta since the last output in `outputs[0].text`/`token_ids`."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None
