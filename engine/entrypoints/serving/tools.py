"""Tool calling for chat: what a request's `tools` and `tool_choice` ask of
generation, and how its output becomes `message.tool_calls`.

- "auto" (the default when tools are given): the tools go to the chat
  template and the model's own call format is parsed out of its answer.
- "required" or a named function: the answer is constrained by a JSON schema
  built from the tools' parameter schemas (a list of {"name", "parameters"}
  objects, or the named function's arguments alone), as vLLM does, so the
  calls always parse.
- "none": the tools are left out of the prompt and nothing is parsed.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.core.sampling_params import StructuredOutputsParams
from engine.entrypoints.serving.protocol import (
    ChatCompletionRequest,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from engine.entrypoints.serving.tool_parsers import Call, ToolParser, parser_for

ANY_OBJECT = {"type": "object"}
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls(calls: list[Call]) -> list[ToolCall]:
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=n, arguments=a))
            for n, a in calls]


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    tools: list[dict[str, Any]]   # as chat templates take them
    mode: str                     # "auto", "required" or "named"
    parser: ToolParser
    function: str | None = None   # the named function
    parallel: bool = True         # more than one call allowed ("required")

    @classmethod
    def of(cls, request: ChatCompletionRequest, chat_template: str | None) -> ToolPlan | None:
        """The plan for `request` (None: no tools in play)."""
        choice = request.tool_choice
        if not request.tools or choice == "none":
            return None
        tools = [msgspec.to_builtins(t) for t in request.tools]
        parallel = request.parallel_tool_calls is not False
        parser = parser_for(chat_template)
        if isinstance(choice, NamedToolChoice):
            return cls(tools, "named", parser, choice.function.name, parallel)
        return cls(tools, "required" if choice == "required" else "auto", parser, None, parallel)

    def _parameters(self, name: str) -> dict[str, Any]:
        """The arguments' schema of a forced call. Keys a function does not
        declare are no use to it: unless the schema says otherwise, forced
        arguments hold only declared ones (and small models do not ramble)."""
        for tool in self.tools:
            if tool["function"]["name"] == name:
                schema = tool["function"].get("parameters") or ANY_OBJECT
                if "properties" in schema and "additionalProperties" not in schema:
                    schema = {**schema, "additionalProperties": False}
                return schema
        raise KeyError(name)

    def constraint(self) -> StructuredOutputsParams | None:
        """The JSON schema a forced choice puts on the answer."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.function))
        if self.mode != "required":
            return None
        options = [{"type": "object", "additionalProperties": False,
                    "required": ["name", "parameters"],
                    "properties": {"name": {"const": t["function"]["name"]},
                                   "parameters": self._parameters(t["function"]["name"])}}
                   for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    @property
    def forced(self) -> bool:
        return self.mode != "auto"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer; the text as content when
        no call can be read from it (an answer cut off by max_tokens)."""
        if self.mode == "auto":
            content, calls = self.parser.parse(text)
        else:
            calls = self._forced_calls(text)
            content = None if calls else text
        if calls and not self.parallel:
            calls = calls[:1]
        return content, tool_calls(calls)

    def _forced_calls(self, text: str) -> list[Call]:
        if self.mode == "named":
            try:
                return [(self.function, text)] if isinstance(json.loads(text), dict) else []
            except ValueError:
                return []
        # A list of calls; one cut off by max_tokens keeps its complete calls.
        calls, i = [], text.find("[") + 1
        while i > 0:
            while i < len(text) and text[i] in " ,\n":
                i += 1
            try:
                call, i = _DECODER.raw_decode(text, i)
            except ValueError:
                break
            if isinstance(call, dict) and "name" in call and "parameters" in call:
                calls.append((call["name"], json.dumps(call["parameters"], ensure_ascii=False)))
        return calls


class ToolCallStream:
    """Streams one choice's answer: content passes through until the calls
    begin (text that may be the start of a call marker is held back); the
    calls go out in one piece when the answer ends."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self._text = ""        # the whole answer so far
        self._sent = 0         # characters of it sent as content
        self._in_calls = plan.forced

    def feed(self, delta: str, finished: bool) -> tuple[str, list[ToolCall]]:
        """(content to send now, tool calls to send now)."""
        self._text += delta
        if finished:
            return self._finish()
        if self._in_calls:
            return "", []
        begin = self.plan.parser.start(self._text)
        if begin is not None:
            self._in_calls = True
            return self._send(begin), []
        return self._send(self.plan.parser.held_from(self._text)), []

    def _send(self, upto: int) -> str:
        out = self._text[self._sent:upto]
        self._sent = max(self._sent, upto)
        return out

    def _finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = self.plan.parse(self._text)
        if not calls:
            return self._send(len(self._text)), []
        # The content before the calls has been sent (or is sent now); the
        # calls' own text never is.
        begin = self.plan.parser.start(self._text) if not self.plan.forced else 0
        return self._send(begin or 0), calls

    @property
    def called(self) -> bool:
        return self._in_calls
