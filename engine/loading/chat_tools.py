"""Tools in chat prompts. A chat template that knows tools (it reads the
`tools` variable, as Hugging Face templates of Qwen, Llama 3 and Mistral do)
gets them as they are. For one that does not (SmolLM2's), the tools are
described in the system message in the Hermes format, and earlier calls and
their results are written into the messages as that format's tags, so any
chat model can be offered tools and read its own calls back.
"""

from __future__ import annotations

import json
from typing import Any

TOOLS_PREAMBLE = (
    "You may call one or more functions to answer the user. The functions are described "
    "as JSON schemas inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function name>, "arguments": <the arguments as a JSON object>}}\n</tool_call>')


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` variable itself."""
    return bool(template) and "tools" in template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None,
                add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The prompt text for `messages` (OpenAI-shaped dicts) offering `tools`
    (OpenAI/Hugging Face tool dicts: {"type": "function", "function": {...}})."""
    if template_knows_tools(tokenizer.chat_template):
        if tools:
            kwargs["tools"] = tools
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    messages = [_plain(m) for m in messages]
    if tools:
        messages = _with_tool_preamble(messages, tools)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _with_tool_preamble(messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                        ) -> list[dict[str, Any]]:
    described = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    preamble = TOOLS_PREAMBLE.format(tools=described)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{preamble}" if first["content"] else preamble
        return [first, *messages[1:]]
    return [{"role": "system", "content": preamble}, *messages]


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message with its tool fields written as Hermes-format text, for
    templates that read only role and content."""
    calls = message.get("tool_calls")
    if message["role"] == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
    if not calls:
        return {k: v for k, v in message.items() if k in ("role", "content", "name")}
    text = [message.get("content") or ""]
    for call in calls:
        function = call.get("function", call)
        body = {"name": function.get("name"), "arguments": function.get("arguments")}
        text.append(f"<tool_call>\n{json.dumps(body, ensure_ascii=False)}\n</tool_call>")
    return {"role": message["role"], "content": "\n".join(t for t in text if t)}
