"""A request's tokens as the scheduler sees them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Stands in token_ids for a token a step in flight has sampled but the host
# has not read yet (asynchronous scheduling, engine/core/llm_engine.py).
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the model's context
    ABORT = "abort"      # cancelled by the caller or failed


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed_tokens` of them have K/V in
    the cache. A step computes the rest (or a chunk of it); when it catches
    up, the step's sampled token is appended."""

    seq_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_pending: int = 0  # trailing PENDING tokens (at most the steps in flight)
    # Worked out once: the scheduler asks every running sequence every step.
    end_token_ids: frozenset[int] = field(init=False, repr=False)  # tokens that stop it
    max_num_tokens: int = field(init=False, repr=False)  # prompt + max_tokens

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)
        self.end_token_ids = self.stop_token_ids if self.ignore_eos else \
            self.stop_token_ids | self.eos_token_ids
        self.max_num_tokens = len(self.prompt_token_ids) + self.max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def settled_output_token_ids(self) -> list[int]:
        """The output without tokens still in flight (what callers may see)."""
        return self.token_ids[len(self.prompt_token_ids):len(self.token_ids) - self.num_pending]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def stop_reason_for(self, token: int, max_model_len: int) -> FinishReason | None:
        """Why generation ends after `token` was appended, if it does."""
        return self.stop_reason_at(self.num_tokens - 1, token, max_model_len)

    def stop_reason_at(self, index: int, token: int, max_model_len: int) -> FinishReason | None:
        """Why generation ends after `token` at token_ids[index], if it does."""
        if token in self.end_token_ids:
            return FinishReason.STOP
        return self.length_reached_at(index, max_model_len)

    def length_reached_at(self, index: int, max_model_len: int) -> FinishReason | None:
        """LENGTH if a token at token_ids[index] is the last one allowed."""
        if index + 1 >= self.max_num_tokens or index + 1 >= max_model_len:
            return FinishReason.LENGTH
        return None
