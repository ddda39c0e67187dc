"""OpenAI API bodies (/v1/completions, /v1/chat/completions, /v1/embeddings)
as msgspec Structs, and the pure functions between them and the engine.

Shared by the HTTP server, the batch runner and the queue worker, so that a
body means the same thing wherever it arrives:

    request = parse_request(url, body)                 # RequestError if bad
    inputs = completion_inputs(request)                # or chat_inputs(request, tok, ...)
    ... run each EngineInput through the engine ...
    body = completion_response(request, outputs, tok)  # or chat_response(...)

Field names and defaults follow OpenAI's API, plus the sampling extensions
vLLM accepts (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
skip_special_tokens). Unknown fields are ignored, as vLLM and OpenAI do.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np

from engine.core.outputs import Logprob, RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.errors import RequestError

COMPLETIONS_URL = "/v1/completions"
CHAT_COMPLETIONS_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"

# Engine finish reasons are already OpenAI's ("stop", "length"); "abort" is vLLM's.
FinishReason = Literal["stop", "length", "abort"] | None


# -- requests ------------------------------------------------------------------

class _SamplingFields(msgspec.Struct, kw_only=True):
    """Sampling fields common to completions and chat (OpenAI + vLLM extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


class CompletionRequest(_SamplingFields, kw_only=True):
    """Body of POST /v1/completions. `prompt` is a string, a list of strings,
    a list of token ids, or a list of token-id lists (one choice set each)."""

    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True   # vLLM's extension


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """Body of POST /v1/embeddings. `input` is a string or a list of strings."""

    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


OpenAIRequest = CompletionRequest | ChatCompletionRequest | EmbeddingRequest

REQUEST_TYPES: dict[str, type] = {
    COMPLETIONS_URL: CompletionRequest,
    CHAT_COMPLETIONS_URL: ChatCompletionRequest,
    EMBEDDINGS_URL: EmbeddingRequest,
}


def parse_request(url: str, body: dict | bytes | str) -> OpenAIRequest:
    """Decode and check a request body for `url` (a JSON object or its bytes).
    Raises RequestError for an unknown url or a body that does not fit."""
    kind = REQUEST_TYPES.get(url)
    if kind is None:
        raise RequestError(f"unsupported url {url!r}; expected one of "
                           f"{', '.join(REQUEST_TYPES)}")
    try:
        if isinstance(body, (bytes, str)):
            request = msgspec.json.decode(body, type=kind)
        else:
            request = msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"invalid JSON body: {exc}") from None
    _check_unsupported(request)
    return request


def _check_unsupported(request: OpenAIRequest) -> None:
    # Features that would silently change the answer are refused, not ignored.
    if isinstance(request, EmbeddingRequest):
        return
    if request.n < 1:
        raise RequestError("n must be at least 1")
    if request.logit_bias:
        raise RequestError("logit_bias is not supported")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise RequestError("suffix is not supported")
        if request.best_of is not None and request.best_of != request.n:
            raise RequestError("best_of is not supported (it must equal n)")
    else:
        if request.tools:
            raise RequestError("tools are not supported")
        fmt = (request.response_format or {}).get("type", "text")
        if fmt != "text":
            raise RequestError(f"response_format {fmt!r} is not supported")


# -- request -> engine ----------------------------------------------------------

class EngineInput(msgspec.Struct, frozen=True):
    """One engine request: a prompt (text or token ids) and how to sample it.
    A body with several prompts or n > 1 becomes several, choice i each."""

    prompt: str | list[int]
    params: SamplingParams


def sampling_params(request: CompletionRequest | ChatCompletionRequest, *,
                    max_tokens: int | None = None, seed: int | None = None) -> SamplingParams:
    """The SamplingParams of one choice of `request` (n is always 1 here).
    Raises RequestError naming the bad field."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        requested = request.max_completion_tokens or request.max_tokens
    else:
        logprobs = request.logprobs
        requested = request.max_tokens
    fields: dict[str, Any] = {
        "max_tokens": requested if requested is not None else max_tokens or 16,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": request.seed if seed is None else seed,
        "stop": request.stop,
        "stop_token_ids": request.stop_token_ids,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "skip_special_tokens": request.skip_special_tokens,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return msgspec.convert(fields, SamplingParams)
    except msgspec.ValidationError as exc:
        raise RequestError(f"invalid sampling parameter: {exc}") from None


def _choices(prompts: list[str | list[int]], request, max_tokens: list[int | None],
             ) -> list[EngineInput]:
    # vLLM's order: the n choices of prompt 0, then of prompt 1, ...; a fixed
    # seed is shifted per choice so n > 1 does not return n equal answers.
    out = []
    for prompt, limit in zip(prompts, max_tokens):
        for i in range(request.n):
            seed = None if request.seed is None else request.seed + i
            out.append(EngineInput(prompt, sampling_params(request, max_tokens=limit,
                                                           seed=seed)))
    return out


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions body, each a string or a token-id list."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise RequestError("prompt must not be empty")
    if all(_is_token_id(t) for t in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
        return [list(p) for p in prompt]
    raise RequestError("prompt must be a string, a list of strings, a list of token ids "
                       "or a list of token-id lists")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def completion_inputs(request: CompletionRequest) -> list[EngineInput]:
    """Engine inputs of a completions body: prompts × n."""
    prompts = completion_prompts(request)
    return _choices(prompts, request, [None] * len(prompts))


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the chat template wants them: role and plain-text content."""
    if not request.messages:
        raise RequestError("messages must not be empty")
    out = []
    for m in request.messages:
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise RequestError(f"message content of type {part.type!r} is not "
                                       "supported (text only)")
                texts.append(part.text)
            content = "".join(texts)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def chat_prompt_ids(request: ChatCompletionRequest, tokenizer) -> list[int]:
    """The prompt token ids: the messages through the model's chat template."""
    text = tokenizer.apply_chat_template(chat_messages(request),
                                         add_generation_prompt=request.add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def chat_inputs(request: ChatCompletionRequest, tokenizer,
                max_model_len: int | None = None) -> list[EngineInput]:
    """Engine inputs of a chat body (n of them). Without max_tokens a choice may
    run to the end of the context, as OpenAI and vLLM do (16 if the caller
    does not say how long the context is)."""
    ids = chat_prompt_ids(request, tokenizer)
    limit = None
    if max_model_len is not None and not (request.max_tokens or request.max_completion_tokens):
        limit = max(1, max_model_len - len(ids))
    return _choices([ids], request, [limit])


def embedding_texts(request: EmbeddingRequest) -> list[str]:
    """The texts of an embeddings body (token-id input is not supported)."""
    value = request.input
    if isinstance(value, str):
        return [value]
    if not value:
        raise RequestError("input must not be empty")
    if not all(isinstance(t, str) for t in value):
        raise RequestError("input must be a string or a list of strings "
                           "(token-id input is not supported)")
    return list(value)


# -- responses -----------------------------------------------------------------

class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int | None = None   # omitted for embeddings
    total_tokens: int


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None] | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: str | int | None = None   # vLLM's: the stop string or token that matched


class CompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    index: int
    embedding: list[float] | str   # str: base64 of little-endian float32
    object: str = "embedding"


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorInfo


OpenAIResponse = CompletionResponse | ChatCompletionResponse | EmbeddingResponse


def new_id(prefix: str) -> str:
    """An OpenAI-style id: "cmpl-…", "chatcmpl-…", "embd-…"."""
    return f"{prefix}-{uuid.uuid4().hex}"


def error_response(message: str, *, type: str = "invalid_request_error",
                   param: str | None = None, code: str | int | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def _usage(outputs: Sequence[RequestOutput], n: int) -> Usage:
    # The n choices of one prompt come together and share it: count it once.
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs[::n])
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                 total_tokens=prompt_tokens + completion)


def _check_error(outputs: Sequence[RequestOutput]) -> None:
    for out in outputs:
        if out.error:
            raise RequestError(out.error)


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    # A byte-level token may be part of a UTF-8 character: its own bytes, not
    # those of the replacement character its text decodes to.
    table = tokenizer.byte_table() if hasattr(tokenizer, "byte_table") else None
    if table and 0 <= token_id < len(table):
        return list(table[token_id])
    return list(text.encode())


def completion_response(request: CompletionRequest, outputs: Sequence[RequestOutput],
                        tokenizer, *, model: str, response_id: str | None = None,
                        created: int | None = None) -> CompletionResponse:
    """The completions body for the finished engine outputs of
    `completion_inputs(request)`, in the same order."""
    _check_error(outputs)
    choices = []
    for i, out in enumerate(outputs):
        result = out.outputs[0]
        text = result.text
        prefix = ""
        if request.echo:
            prefix = out.prompt if out.prompt is not None else tokenizer.decode(
                out.prompt_token_ids)
        logprobs = None
        if request.logprobs is not None and result.logprobs is not None:
            logprobs = _completion_logprobs(result.logprobs, tokenizer, len(prefix))
        choices.append(CompletionChoice(index=i, text=prefix + text, logprobs=logprobs,
                                        finish_reason=result.finish_reason,
                                        stop_reason=result.stop_reason))
    return CompletionResponse(id=response_id or new_id("cmpl"),
                              created=int(time.time()) if created is None else created,
                              model=model, choices=choices, usage=_usage(outputs, request.n))


def _completion_logprobs(logprobs: list[Logprob], tokenizer, offset: int) -> CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        token = _token_text(tokenizer, lp.token_id)
        offsets.append(offset)
        offset += len(token)
        tokens.append(token)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t): v for t, v in lp.top} if lp.top else None)
    return CompletionLogprobs(text_offset=offsets, token_logprobs=values, tokens=tokens,
                              top_logprobs=tops)


def chat_response(request: ChatCompletionRequest, outputs: Sequence[RequestOutput],
                  tokenizer, *, model: str, response_id: str | None = None,
                  created: int | None = None) -> ChatCompletionResponse:
    """The chat body for the finished engine outputs of `chat_inputs(request)`."""
    _check_error(outputs)
    choices = []
    for i, out in enumerate(outputs):
        result = out.outputs[0]
        logprobs = None
        if request.logprobs and result.logprobs is not None:
            logprobs = ChatLogprobs(content=[_chat_logprob(lp, tokenizer)
                                             for lp in result.logprobs])
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=result.text),
                                  logprobs=logprobs, finish_reason=result.finish_reason,
                                  stop_reason=result.stop_reason))
    return ChatCompletionResponse(id=response_id or new_id("chatcmpl"),
                                  created=int(time.time()) if created is None else created,
                                  model=model, choices=choices,
                                  usage=_usage(outputs, request.n))


def _chat_logprob(lp: Logprob, tokenizer) -> ChatTokenLogprob:
    token = _token_text(tokenizer, lp.token_id)
    top = []
    for token_id, value in lp.top or ():
        text = _token_text(tokenizer, token_id)
        top.append(TopLogprob(token=text, logprob=value,
                              bytes=_token_bytes(tokenizer, token_id, text)))
    return ChatTokenLogprob(token=token, logprob=lp.logprob,
                            bytes=_token_bytes(tokenizer, lp.token_id, token), top_logprobs=top)


def embedding_response(request: EmbeddingRequest, vectors: np.ndarray,
                       num_tokens: Sequence[int], *, model: str) -> EmbeddingResponse:
    """The embeddings body for the vectors of `embedding_texts(request)`."""
    if request.dimensions is not None and request.dimensions != vectors.shape[1]:
        raise RequestError(f"dimensions={request.dimensions} is not supported: the model "
                           f"gives {vectors.shape[1]}-dimensional vectors")
    data = []
    for i, row in enumerate(np.asarray(vectors, dtype=np.float32)):
        if request.encoding_format == "base64":
            value: list[float] | str = base64.b64encode(row.astype("<f4").tobytes()).decode()
        else:
            value = row.tolist()
        data.append(EmbeddingData(index=i, embedding=value))
    tokens = int(sum(num_tokens))
    return EmbeddingResponse(data=data, model=model,
                             usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
