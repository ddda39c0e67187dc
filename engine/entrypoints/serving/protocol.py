"""OpenAI request bodies (/v1/completions, /v1/chat/completions,
/v1/embeddings) as msgspec Structs: the one definition every entry point
decodes into, with the same checks.

Field names and defaults follow OpenAI's API plus the extensions vLLM accepts
(top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens, truncate_prompt_tokens, structured_outputs and the older
guided_json / guided_regex / guided_choice / guided_grammar). OpenAI fields
that do not change what is generated here (store, metadata, service_tier,
user) are accepted and ignored. An unknown field is a 400, as
OpenAI answers it: a typo must not silently change the answer. Ranges are
schema constraints, so /openapi.json tells clients (and fuzzers) what a
valid body is; SamplingParams still checks them again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from engine.entrypoints.serving.errors import bad_request, field_named

COMPLETIONS_URL = "/v1/completions"
CHAT_COMPLETIONS_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"

_Unit = Annotated[float, Meta(gt=0, le=1)]
_Penalty = Annotated[float, Meta(ge=-2, le=2)]
_Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
_Positive = Annotated[int, Meta(ge=1)]
_Logprobs = Annotated[int, Meta(ge=0, le=20)]
_Stop = Annotated[str, Meta(min_length=1)] | list[Annotated[str, Meta(min_length=1)]]
# vLLM's: keep the prompt's last k tokens; -1: as many as fit.
_Truncate = Annotated[int, Meta(ge=-1)]


class StructuredOutputsField(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` request field (SamplingParams' shape)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Sampling fields common to completions and chat (OpenAI + vLLM extras)."""

    model: str | None = None
    n: _Positive = 1
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: _Unit | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: _Seed | None = None
    stop: _Stop | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # OpenAI fields with no effect on generation here: accepted, ignored.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Meta(ge=0)]] | None = None
    skip_special_tokens: bool = True
    truncate_prompt_tokens: _Truncate | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None   # accepted; one backend serves here
    guided_whitespace_pattern: str | None = None  # accepted; separators are fixed here


class CompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/completions. `prompt` is a string, a list of strings,
    a list of token ids, or a list of token-id lists (one choice set each)."""

    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[Any], Meta(min_length=1)]
    max_tokens: _Positive | None = 16
    logprobs: _Logprobs | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None


class FunctionDefinition(msgspec.Struct, kw_only=True, omit_defaults=True,
                         forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None   # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str   # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None            # a tool message's answer to one


class ChatCompletionRequest(_SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_tokens: _Positive | None = None
    max_completion_tokens: _Positive | None = None
    logprobs: bool = False
    top_logprobs: _Logprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True   # vLLM's extension


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/embeddings. `input` is a string or a list of strings."""

    input: str | Annotated[list[Any], Meta(min_length=1)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _Positive | None = None
    user: str | None = None
    truncate_prompt_tokens: _Truncate | None = None


GenerationRequest = CompletionRequest | ChatCompletionRequest
OpenAIRequest = CompletionRequest | ChatCompletionRequest | EmbeddingRequest

REQUEST_TYPES: dict[str, type] = {
    COMPLETIONS_URL: CompletionRequest,
    CHAT_COMPLETIONS_URL: ChatCompletionRequest,
    EMBEDDINGS_URL: EmbeddingRequest,
}
REQUEST_FIELDS = frozenset(f for t in REQUEST_TYPES.values() for f in t.__struct_fields__)
_DECODERS = {url: msgspec.json.Decoder(kind) for url, kind in REQUEST_TYPES.items()}


def decode_request(url: str, raw: bytes | str) -> OpenAIRequest:
    """Decode a JSON body for a known `url` and refuse what cannot be honoured.
    Raises ServingError (400) naming the field when it can."""
    try:
        request = _DECODERS[url].decode(raw)
    except msgspec.ValidationError as exc:
        message = f"invalid request body: {exc}"
        raise bad_request(message, field_named(message)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None
    check_supported(request)
    return request


def check_supported(request: OpenAIRequest) -> None:
    """Features that would silently change the answer are refused, not ignored."""
    if request.truncate_prompt_tokens == 0:
        raise bad_request("truncate_prompt_tokens must be -1 (as many as fit) or at least 1",
                          "truncate_prompt_tokens")
    if isinstance(request, EmbeddingRequest):
        return
    if request.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    fmt = (request.response_format or {}).get("type", "text")
    if fmt not in RESPONSE_FORMATS:
        raise bad_request(f"response_format type {fmt!r} is not supported; use one of "
                          f"{', '.join(RESPONSE_FORMATS)}", "response_format")
    constraints = [f for f in CONSTRAINT_FIELDS if getattr(request, f) is not None]
    if fmt == "text" and "response_format" in constraints:
        constraints.remove("response_format")
    if len(constraints) > 1:
        raise bad_request(f"give one output constraint, not {' and '.join(constraints)}",
                          constraints[1])
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request("best_of is not supported (it must equal n)", "best_of")
    else:
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        _check_tools(request, constraints)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# Request fields that each constrain the output (at most one per request).
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex",
                     "guided_choice", "guided_grammar")


def _check_tools(request: ChatCompletionRequest, constraints: list[str]) -> None:
    choice = request.tool_choice
    names = [t.function.name for t in request.tools or ()]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and not names:
        raise bad_request("tool_choice 'required' or a named function needs tools", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among "
                          "the tools", "tool_choice")
    if forced and constraints:
        raise bad_request(f"tool_choice {'required' if choice == 'required' else 'function'} "
                          f"constrains the output already; drop {constraints[0]}",
                          constraints[0])


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions body, each a string or a token-id list."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(_is_token_id(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) and p for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise bad_request("prompt must be a non-empty string, a list of them, a list of token ids "
                      "or a list of token-id lists", "prompt")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as chat templates want them: role, plain-text content, and
    the tool fields (an assistant's `tool_calls`, with arguments as objects
    as Hugging Face templates expect; a tool message's `tool_call_id`)."""
    out = []
    for m in request.messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"message content of type {part.type!r} is not "
                                      "supported (text only)", "messages")
                texts.append(part.text)
            content = "".join(texts)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _template_call(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = msgspec.json.decode(call.function.arguments)
    except msgspec.DecodeError:
        raise bad_request(f"tool call {call.id!r}: arguments must be JSON text",
                          "messages") from None
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


def embedding_texts(request: EmbeddingRequest) -> list[str]:
    """The texts of an embeddings body (token-id input is not supported)."""
    value = request.input
    if isinstance(value, str):
        return [value]
    if not all(isinstance(t, str) for t in value):
        raise bad_request("input must be a string or a list of strings "
                          "(token-id input is not supported)", "input")
    return list(value)


