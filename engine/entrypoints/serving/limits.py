"""The limits every entry point applies to a request, checked before any
work that grows with the request is done (a body of n=10**9 must be a 400,
not a billion-entry list)."""

from __future__ import annotations

import msgspec

from engine.errors import ConveyorError

DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_CHOICES = 128           # prompts × n in one request
DEFAULT_MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on `input`
DEFAULT_MAX_WAITING = 1024


class ServingLimits(msgspec.Struct, frozen=True, kw_only=True):
    """One set of limits, shared by HTTP, batch files and queue jobs.

    Prompt length has no limit of its own: prompt + max_tokens must fit the
    model's context (and KV budget), else a 400 unless the request asks for
    truncation (`truncate_prompt_tokens`)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_choices: int = DEFAULT_MAX_CHOICES
    max_embedding_inputs: int = DEFAULT_MAX_EMBEDDING_INPUTS
    max_waiting: int = DEFAULT_MAX_WAITING   # HTTP: requests waiting before a 429

    def __post_init__(self):
        for name in self.__struct_fields__:
            if getattr(self, name) < 1:
                raise ConveyorError(f"{name} must be at least 1")
