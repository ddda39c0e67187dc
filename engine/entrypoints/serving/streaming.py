"""Stream chunks of a generation: engine deltas (choice index, RequestOutput
delta) in, OpenAI's stream events out, in the order OpenAI sends them:
chat's role event first, then one chunk per delta that shows something,
then the usage chunk when `stream_options.include_usage` asks for it."""

from __future__ import annotations

import dataclasses

import msgspec

from engine.core.outputs import RequestOutput
from engine.entrypoints.serving.errors import engine_failed
from engine.entrypoints.serving.generation import GenerationServing, PreparedGeneration
from engine.entrypoints.serving.protocol import ChatCompletionRequest
from engine.entrypoints.serving.responses import (
    ChatCompletionChunk,
    ChatDelta,
    ChatStreamChoice,
    CompletionChunk,
    DeltaFunctionCall,
    DeltaToolCall,
    Usage,
)
from engine.entrypoints.serving.tools import ToolCallStream


class StreamRenderer:
    """The chunks of one streamed request. Not thread-safe: one consumer."""

    def __init__(self, serving: GenerationServing, prepared: PreparedGeneration):
        self.serving, self.prepared = serving, prepared
        self.chat = isinstance(prepared.request, ChatCompletionRequest)
        options = prepared.request.stream_options or {}
        self.include_usage = bool(options.get("include_usage"))
        num_choices = len(prepared.inputs)
        # With tools, each choice's text goes through a ToolCallStream, and
        # the serving layer sees the deltas as plain text.
        self._tools = ([ToolCallStream(prepared.tools) for _ in range(num_choices)]
                       if prepared.tools is not None else None)
        self._plain = dataclasses.replace(prepared, tools=None)
        self._first = [True] * num_choices
        self._prompt_tokens = [0] * num_choices
        self._completion_tokens = 0

    def _chunk(self, choices: list, usage: Usage | None = None) -> msgspec.Struct:
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        p = self.prepared
        return kind(id=p.response_id, created=p.created, model=p.model, choices=choices,
                    usage=usage)

    def opening(self) -> list[msgspec.Struct]:
        """Chat's first event: each choice's role, no text (as OpenAI sends it)."""
        if not self.chat:
            return []
        return [self._chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant",
                                                                        content=""))
                             for i in range(len(self.prepared.inputs))])]

    def chunk(self, index: int, delta: RequestOutput) -> msgspec.Struct | None:
        """The chunk for one delta of choice `index`; None when it shows nothing
        (a token whose text is held back: part of a character or a stop string).
        Raises a 500 ServingError if the engine failed the request."""
        if delta.error:
            raise engine_failed(delta.error)
        self._prompt_tokens[index] = len(delta.prompt_token_ids)
        self._completion_tokens += len(delta.outputs[0].token_ids)
        choice = self.serving.choice(self._plain, index, delta, first=self._first[index])
        calls = None
        if self.chat:
            text, finish_reason = choice.message.content, choice.finish_reason
            if self._tools is not None:
                text, found = self._tools[index].feed(text or "", delta.finished)
                calls = [DeltaToolCall(index=i, id=c.id, type="function",
                                       function=DeltaFunctionCall(name=c.function.name,
                                                                  arguments=c.function.arguments))
                         for i, c in enumerate(found)] or None
                if calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            shown = ChatStreamChoice(index=index,
                                     delta=ChatDelta(content=text or None, tool_calls=calls),
                                     logprobs=choice.logprobs, finish_reason=finish_reason,
                                     stop_reason=choice.stop_reason)
        else:
            text, shown = choice.text, choice
        if not (text or calls or choice.finish_reason or choice.logprobs):
            return None
        self._first[index] = False
        return self._chunk([shown])

    def closing(self) -> list[msgspec.Struct]:
        """The usage chunk, when asked for (no choices, the totals)."""
        if not self.include_usage:
            return []
        n = self.prepared.n
        prompt = sum(self._prompt_tokens[::n])
        usage = Usage(prompt_tokens=prompt, completion_tokens=self._completion_tokens,
                      total_tokens=prompt + self._completion_tokens)
        return [self._chunk([], usage)]
