"""Tool calls in generated text, in the formats of the families Conveyor loads:
Hermes-style `<tool_call>{json}</tool_call>` (Qwen, and the format offered to
templates without tools of their own), Llama 3's bare JSON object (after an
optional `<|python_tag|>`), and Mistral's `[TOOL_CALLS]` list.

A parser splits a finished output into the text before the calls and the
calls as (function name, arguments as JSON text); streaming uses its
markers to know when text stops being content.
"""

from __future__ import annotations

import json
import re
from typing import Any

Call = tuple[str, str]   # (function name, arguments as JSON text)
_DECODER = json.JSONDecoder()


class ToolParser:
    """Base: find where calls start, then read them."""

    name = ""
    markers: tuple[str, ...] = ()
    at_start_only = False           # calls only count at the very start of the output
    needs_special_tokens = False    # the marker is a special token: keep it in the text

    def start(self, text: str) -> int | None:
        """Where the calls begin in `text`, or None when there are none."""
        if self.at_start_only:
            head = len(text) - len(text.lstrip())
            return head if any(text.startswith(m, head) for m in self.markers) else None
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found) if found else None

    def held_from(self, text: str) -> int:
        """While streaming: where the part of `text` that may still become a
        call marker begins (len(text) when none may)."""
        if self.at_start_only:
            stripped = text.lstrip()
            return 0 if any(m.startswith(stripped) for m in self.markers) else len(text)
        longest = max((k for m in self.markers for k in range(1, len(m))
                       if text.endswith(m[:k])), default=0)
        return len(text) - longest

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """(content, calls) of a finished output; all content when no call parses."""
        begin = self.start(text)
        if begin is None:
            return text, []
        try:
            calls = self.calls(text[begin:])
        except (ValueError, TypeError, KeyError, AttributeError):
            return text, []
        if not calls:
            return text, []
        content = text[:begin].strip()
        return content or None, calls

    def calls(self, text: str) -> list[Call]:
        raise NotImplementedError


def _arguments(value: Any) -> str:
    if isinstance(value, str):
        json.loads(value)  # must be JSON text already
        return value
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise ValueError("tool arguments must be a JSON object")
    return json.dumps(value, ensure_ascii=False)


def _call(obj: Any, args_key: str = "arguments") -> Call:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call is an object with a name")
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters")))
    return obj["name"], _arguments(args)


def _json_values(text: str, separators: str = "") -> list[Any]:
    """The JSON values written one after another in `text`, apart from
    whitespace and `separators`."""
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        value, i = _DECODER.raw_decode(text, i)
        values.append(value)


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def calls(self, text: str) -> list[Call]:
        return [_call(json.loads(body)) for body in self._CALL.findall(text) if body.strip()]


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>", "{")
    at_start_only = True
    needs_special_tokens = True

    def calls(self, text: str) -> list[Call]:
        text = text.strip().removeprefix("<|python_tag|>")
        return [_call(v, "parameters") for v in _json_values(text, ";")]


class MistralParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    needs_special_tokens = True

    def calls(self, text: str) -> list[Call]:
        body = text.split("[TOOL_CALLS]", 1)[1].strip()
        if body.startswith("["):   # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            return [_call(v) for v in _DECODER.raw_decode(body)[0]]
        calls = []                 # [TOOL_CALLS]name[ARGS]{...}[TOOL_CALLS]name{...}
        for part in filter(None, (p.strip() for p in text.split("[TOOL_CALLS]")[1:])):
            name, _, rest = part.partition("[ARGS]") if "[ARGS]" in part else (
                part[:part.index("{")], "", part[part.index("{"):])
            calls.append((name.strip(), _arguments(_DECODER.raw_decode(rest.strip())[0])))
        return calls


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}


def parser_for(chat_template: str | None) -> ToolParser:
    """The format a model's chat template asks for (Hermes when it names none,
    which is also the format offered to templates without tools)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return PARSERS["mistral"]
    if "<tool_call>" in template:
        return PARSERS["hermes"]
    if "<|python_tag|>" in template or "ipython" in template:
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
