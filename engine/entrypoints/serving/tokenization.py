"""/tokenize and /detokenize as vLLM serves them: a prompt (or chat messages
through the chat template, tools included) to token ids, and ids to text."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from engine.entrypoints.serving.errors import bad_request, field_named
from engine.entrypoints.serving.models import GenerationModel
from engine.entrypoints.serving.protocol import ChatMessage, ChatTool, chat_messages
from engine.errors import ConveyorError
from engine.loading.chat_tools import render_chat

TOKENIZE_URL = "/tokenize"
DETOKENIZE_URL = "/detokenize"


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /tokenize: `prompt` (a completion prompt) or `messages`
    (a conversation rendered by the chat template), not both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    # None: True for a prompt, False for messages (the template writes them).
    add_special_tokens: bool | None = None
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[Annotated[int, Meta(ge=0)]]


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


def _decode(raw: bytes | str, kind: type) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        message = f"invalid request body: {exc}"
        raise bad_request(message, field_named(message)) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"invalid JSON body: {exc}") from None


class TokenizationServing:
    """Tokenize and detokenize with the served generation model."""

    def __init__(self, model: GenerationModel):
        self.model = model

    def tokenize(self, raw: bytes | str) -> TokenizeResponse:
        request = _decode(raw, TokenizeRequest)
        self.model.names.check(request.model, "generation")
        tokenizer = self.model.tokenizer
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give either prompt or messages", "prompt")
        if request.prompt is not None:
            special = request.add_special_tokens is not False
            ids = tokenizer.encode(request.prompt, add_special_tokens=special)
        else:
            tools = [msgspec.to_builtins(t) for t in request.tools or ()]
            try:
                text = render_chat(tokenizer, chat_messages(request), tools or None,
                                   add_generation_prompt=request.add_generation_prompt,
                                   **(request.chat_template_kwargs or {}))
            except ConveyorError as exc:
                raise bad_request(str(exc), "messages") from None
            ids = tokenizer.encode(text, add_special_tokens=bool(request.add_special_tokens))
        strs = [tokenizer.id_to_token(i) or "" for i in ids] if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.model.max_model_len,
                                tokens=ids, token_strs=strs)

    def detokenize(self, raw: bytes | str) -> DetokenizeResponse:
        request = _decode(raw, DetokenizeRequest)
        self.model.names.check(request.model, "generation")
        vocab = self.model.vocab_size
        if any(t >= vocab for t in request.tokens):
            raise bad_request(f"token ids must be in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=self.model.tokenizer.decode(request.tokens))
