"""OpenAI-compatible HTTP server: starlette routes over one shared AsyncLLM.

Every HTTP request becomes one or more requests of the same engine loop
(continuous batching across clients); the event loop only parses, queues and
streams, while forward passes run on the engine's thread (generation) or a
worker thread (embeddings, one batch at a time). A client that goes away,
streaming or not, aborts its requests, which frees their KV blocks before the
next step. Request bodies are decoded into the Structs of
engine.entrypoints.openai.protocol (strictly: an unknown field is a 400), and every error
is OpenAI's `{"error": {...}}` body with a 4xx status for anything a client
can cause.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from typing import Annotated, Any

import msgspec
from msgspec import Meta
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.core.outputs import RequestOutput
from engine.entrypoints.openai import metrics as metrics_mod
from engine.entrypoints.openai import protocol as proto
from engine.errors import ConveyorError
from scheduler.scheduler import RequestTooLong

log = logging.getLogger("conveyor.server")

DEFAULT_MAX_BODY_BYTES = 8 << 20
DEFAULT_MAX_WAITING = 1024
DEFAULT_MAX_CHOICES = 128   # prompts × n in one body
TOKENIZE_INLINE_BYTES = 16 << 10  # larger bodies are tokenized on a worker thread
RATE_SAMPLE_S = 1.0         # how often tokens/s samples the engine's counter


# -- bodies the protocol module does not define ----------------------------------

# The server refuses unknown fields (a typo must not silently change the
# answer), so it decodes into strict subclasses of the shared Structs. They
# also restate SamplingParams' ranges as schema constraints, so /openapi.json
# tells clients (and fuzzers) what a valid body is; SamplingParams still has
# the last word.
_Unit = Annotated[float, Meta(gt=0, le=1)]
_Penalty = Annotated[float, Meta(ge=-2, le=2)]
_Seed = Annotated[int, Meta(ge=0)]
_Positive = Annotated[int, Meta(ge=1)]
_TopK = Annotated[int, Meta(ge=-1)]
_Logprobs = Annotated[int, Meta(ge=0, le=20)]
_Stop = Annotated[str, Meta(min_length=1)] | list[Annotated[str, Meta(min_length=1)]]
_TokenIds = list[Annotated[int, Meta(ge=0)]]
_Choices = Annotated[int, Meta(ge=1, le=DEFAULT_MAX_CHOICES)]


class CompletionBody(proto.CompletionRequest, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/completions."""

    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[Any], Meta(min_length=1)]
    n: _Choices = 1
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: _Unit | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: _Seed | None = None
    stop: _Stop | None = None
    top_k: _TopK | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    stop_token_ids: _TokenIds | None = None
    max_tokens: _Positive | None = 16
    logprobs: _Logprobs | None = None


class ChatCompletionBody(proto.ChatCompletionRequest, kw_only=True,
                         forbid_unknown_fields=True):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[proto.ChatMessage], Meta(min_length=1)]
    n: _Choices = 1
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: _Unit | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    seed: _Seed | None = None
    stop: _Stop | None = None
    top_k: _TopK | None = None
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    stop_token_ids: _TokenIds | None = None
    max_tokens: _Positive | None = None
    max_completion_tokens: _Positive | None = None
    top_logprobs: _Logprobs | None = None


class EmbeddingBody(proto.EmbeddingRequest, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /v1/embeddings."""

    input: str | Annotated[list[str], Meta(min_length=1)]
    dimensions: _Positive | None = None


BODY_TYPES: dict[str, type] = {
    proto.COMPLETIONS_URL: CompletionBody,
    proto.CHAT_COMPLETIONS_URL: ChatCompletionBody,
    proto.EMBEDDINGS_URL: EmbeddingBody,
}
_KNOWN_FIELDS = frozenset(f for t in BODY_TYPES.values() for f in t.__struct_fields__)


class CompletionStreamChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: proto.CompletionLogprobs | None = None
    finish_reason: proto.FinishReason = None
    stop_reason: str | int | None = None


class CompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed completion."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: proto.Usage | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: proto.ChatLogprobs | None = None
    finish_reason: proto.FinishReason = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One SSE event of a streamed chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: proto.Usage | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "conveyor"
    max_model_len: int | None = None


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class Health(msgspec.Struct, kw_only=True):
    status: str


# -- errors ------------------------------------------------------------------------

class APIError(Exception):
    """An error with its HTTP status, sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> Response:
        body = proto.error_response(self.message, type=self.type, param=self.param,
                                    code=self.code)
        return Response(msgspec.json.encode(body), status_code=self.status,
                        media_type="application/json", headers=self.headers)


_FIELD_AT = re.compile(r"at `\$\.([A-Za-z_]+)")
_FIELD_NAMED = re.compile(r"field `([A-Za-z_]+)`")


def _bad_request(message: str) -> APIError:
    """A 400 whose `param` names the field the message is about, when it can."""
    param = None
    match = _FIELD_AT.search(message) or _FIELD_NAMED.search(message)
    if match:
        param = match.group(1)
    else:
        first = re.split(r"[\s=:,]", message.removeprefix("invalid sampling parameter: "), 1)[0]
        if first in _KNOWN_FIELDS:
            param = first
    return APIError(400, message, param=param)


class EmbeddingWorker:
    """An Embedder on its own thread: loaded there and run there, one batch
    at a time, so the event loop never waits on an encoder forward. (MLX
    streams belong to the thread that made them, and the Embedder makes its
    streams when it loads: it must run where it was loaded.)"""

    def __init__(self, load: Callable[[], Any], name: str):
        self.name = name
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="conveyor-embed")
        self.embedder = self._thread.submit(load).result()
        self.dim: int = self.embedder.dim
        self.max_length: int = self.embedder.max_length

    @classmethod
    def load(cls, model: str | None = None, name: str | None = None) -> EmbeddingWorker:
        """engine.embedding.embedder.Embedder.load(model) on the worker's thread."""
        from engine.embedding.embedder import Embedder

        return cls(lambda: Embedder.load(model), name or model or "all-MiniLM-L6-v2")

    async def embed(self, texts: Sequence[str]):
        """Embedder.embed(texts) on the worker thread: an EmbeddingResult."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.embedder.embed, list(texts))

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# -- the app -------------------------------------------------------------------

class OpenAIServer:
    """The routes' state: the engines, the served names and the limits."""

    def __init__(self, llm: Any | None, embedder: Any | None, *, model_name: str | None,
                 embedding_model_name: str | None = None, api_key: str | None = None,
                 max_waiting: int = DEFAULT_MAX_WAITING,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_choices: int = DEFAULT_MAX_CHOICES):
        if llm is None and embedder is None:
            raise ConveyorError("the server needs a generation or an embedding model")
        self.llm, self.embedder = llm, embedder
        self.model_name = model_name if llm is not None else None
        self.embedding_model_name = embedding_model_name if embedder is not None else None
        self.api_key = api_key.encode() if api_key else None
        self.max_waiting, self.max_body_bytes = max_waiting, max_body_bytes
        self.max_choices = max_choices
        self.metrics = metrics_mod.ServerMetrics()
        self.created = int(time.time())

    # -- plumbing --------------------------------------------------------------
    def route(self, path: str, handler: Callable[[Request], Awaitable[Response]],
              methods: list[str], *, protected: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if protected:
                    self._authorize(request)
                response = await handler(request)
            except APIError as exc:
                response = exc.response()
            except _ClientGone:
                response = Response(status_code=499)  # nobody reads it (nginx's code)
            except ConveyorError as exc:
                response = _bad_request(str(exc)).response()
            except Exception:  # a bug, not the client's input: log it, answer 500
                log.exception("error serving %s", path)
                response = APIError(500, "internal server error", type="server_error"
                                    ).response()
            self.metrics.count_request(path, response.status_code)
            return response
        return Route(path, endpoint, methods=methods)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        too_big = APIError(413, f"request body is larger than {self.max_body_bytes} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it comes: no length header needed
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _decode(self, request: Request, url: str):
        body_type = BODY_TYPES[url]
        raw = await self._read_body(request)
        try:
            body = msgspec.json.decode(raw, type=body_type)
        except msgspec.ValidationError as exc:
            raise _bad_request(f"invalid request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise APIError(400, f"invalid JSON body: {exc}") from None
        try:
            proto.parse_request(url, raw)  # the shared checks of unsupported features
        except ConveyorError as exc:
            raise _bad_request(str(exc)) from None
        return body, len(raw)

    def _served(self, requested: str | None, served: str | None, what: str) -> str:
        if served is None:
            raise APIError(404, f"this server has no {what} model", code="model_not_found",
                           param="model")
        if requested is not None and requested != served:
            raise APIError(404, f"the model {requested!r} does not exist; this server's "
                           f"{what} model is {served!r}", code="model_not_found",
                           param="model")
        return served


    # -- generation ----------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, proto.COMPLETIONS_URL, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, proto.CHAT_COMPLETIONS_URL, chat=True)

    def _inputs(self, body, chat: bool) -> list[proto.EngineInput]:
        """The body's engine inputs, prompts as checked token ids."""
        if chat:
            self._check_choices(body, 1)
            inputs = proto.chat_inputs(body, self.llm.engine.tokenizer, self._max_model_len())
        else:
            self._check_choices(body, len(proto.completion_prompts(body)))
            inputs = proto.completion_inputs(body)
        return self._prepare(inputs)

    def _check_choices(self, body, num_prompts: int) -> None:
        # Checked before the protocol builds one input per choice: n=10**9
        # must be a 400, not a server building a billion-entry list.
        if body.n > self.max_choices or body.n * num_prompts > self.max_choices:
            raise APIError(400, f"at most {self.max_choices} choices (prompts × n) per "
                           "request", param="n")

    def _max_model_len(self) -> int:
        return self.llm.engine.scheduler.config.max_model_len

    def _prepare(self, inputs: list[proto.EngineInput]) -> list[proto.EngineInput]:
        """Token ids for every prompt, checked against the context and the KV
        budget now, so a bad request is a 400 before any response starts."""
        engine = self.llm.engine
        vocab = engine.model.args.vocab_size
        out = []
        for item in inputs:
            ids = (engine.tokenizer.encode(item.prompt) if isinstance(item.prompt, str)
                   else item.prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})",
                               param="prompt")
            try:
                engine.scheduler.check_fits(len(ids), item.params.max_tokens)
            except RequestTooLong as exc:
                raise APIError(400, str(exc), param="max_tokens"
                               if "max_tokens" in str(exc) and ids else "prompt") from None
            out.append(proto.EngineInput(ids, item.params))
        return out

    def _check_overload(self) -> None:
        # Requests posted to the engine's inbox but not yet admitted count as
        # waiting too: a burst arriving during one step must not slip through.
        waiting = self.llm.engine.stats().waiting + self.llm.num_pending()
        if waiting >= self.max_waiting:
            self.metrics.rejected_overload += 1
            raise APIError(429, f"the server is busy: {waiting} requests are waiting "
                           f"(limit {self.max_waiting}); retry later",
                           type="rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"})

    async def _generate(self, request: Request, url: str, *, chat: bool) -> Response:
        body, size = await self._decode(request, url)
        model = self._served(body.model, self.model_name, "generation")
        if getattr(self.llm, "error", None) is not None:
            raise APIError(503, "the engine has failed; restart the server",
                           type="server_error")
        # Tokenizing (and templating) a long prompt takes milliseconds: off the loop.
        if size > TOKENIZE_INLINE_BYTES:
            inputs = await run_in_threadpool(self._inputs, body, chat)
        else:
            inputs = self._inputs(body, chat)
        self._check_overload()
        response_id = proto.new_id("chatcmpl" if chat else "cmpl")
        streams = [self.llm.generate(item.prompt, item.params, request_id=f"{response_id}-{i}")
                   for i, item in enumerate(inputs)]
        events = _merge(streams)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return EventStream(self._events(body, events, model, response_id, len(inputs),
                                            include_usage, chat=chat),
                               on_disconnect=self._client_gone)
        finals: list[RequestOutput | None] = [None] * len(inputs)

        async def collect() -> None:
            async with aclosing(events):
                async for i, delta in events:
                    finals[i] = _accumulate(finals[i], delta)
                    self._observe(delta)

        await _until_disconnect(request, collect(), self._client_gone)
        self._raise_engine_error(finals)
        tok = self.llm.engine.tokenizer
        build = proto.chat_response if chat else proto.completion_response
        result = build(body, finals, tok, model=model, response_id=response_id)
        return _json(result)

    def _client_gone(self) -> None:
        self.metrics.client_aborts += 1

    def _observe(self, delta: RequestOutput) -> None:
        if delta.finished:
            m = delta.metrics
            self.metrics.count_finished(delta.outputs[0].finish_reason or "abort",
                                        m.time_to_first_token, m.e2e_latency)

    @staticmethod
    def _raise_engine_error(outputs) -> None:
        for out in outputs:
            if out is None or out.error:
                raise APIError(500, out.error if out else "the request did not finish",
                               type="server_error")

    async def _events(self, body, events, model: str, response_id: str, num_choices: int,
                      include_usage: bool, *, chat: bool) -> AsyncIterator[bytes]:
        """The SSE body: one chunk per delta that shows something, the usage
        chunk if asked for, then `[DONE]`. After the headers an error can only
        travel inside the stream, as an OpenAI error body."""
        tok = self.llm.engine.tokenizer
        created = int(time.time())
        usage = _UsageCounter(num_choices)
        if chat:
            chunk_type, render = ChatCompletionChunk, self._chat_choice
            # OpenAI's first event of each choice carries the role and no text.
            yield _sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=[
                ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(num_choices)]))
        else:
            chunk_type, render = CompletionChunk, self._completion_choice
            # Echoed prompts go out once, in each choice's first chunk.
            body = _Echo(msgspec.structs.replace(body, echo=False), num_choices, body.echo)
        try:
            async with aclosing(events):
                async for i, delta in events:
                    self._observe(delta)
                    if delta.error:
                        raise APIError(500, delta.error, type="server_error")
                    usage.add(i, delta)
                    choice = render(body, i, delta, tok, model, response_id, created)
                    if choice is not None:
                        yield _sse(chunk_type(id=response_id, created=created, model=model,
                                              choices=[choice]))
        except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
            error = exc if isinstance(exc, APIError) else (
                _bad_request(str(exc)) if isinstance(exc, ConveyorError)
                else APIError(500, "internal server error", type="server_error"))
            if error.status >= 500:
                log.error("stream failed: %s", exc)
            payload = proto.error_response(error.message, type=error.type, param=error.param,
                                         code=error.code)
            yield _sse(payload)
        else:
            if include_usage:
                yield _sse(chunk_type(id=response_id, created=created, model=model,
                                      choices=[], usage=usage.usage(getattr(body, "n", 1))))
        yield b"data: [DONE]\n\n"

    @staticmethod
    def _completion_choice(body: _Echo, i: int, delta: RequestOutput, tok, model: str,
                           response_id: str, created: int) -> CompletionStreamChoice | None:
        choice = proto.completion_response(body.request, [delta], tok, model=model,
                                           response_id=response_id,
                                           created=created).choices[0]
        text = choice.text
        if body.pending[i]:
            body.pending[i] = False
            text = tok.decode(delta.prompt_token_ids) + text
        elif not (text or choice.finish_reason or choice.logprobs):
            return None  # a token whose text is held back (a partial character)
        return CompletionStreamChoice(index=i, text=text, logprobs=choice.logprobs,
                                      finish_reason=choice.finish_reason,
                                      stop_reason=choice.stop_reason)

    @staticmethod
    def _chat_choice(body, i: int, delta: RequestOutput, tok, model: str, response_id: str,
                     created: int) -> ChatStreamChoice | None:
        choice = proto.chat_response(body, [delta], tok, model=model, response_id=response_id,
                                     created=created).choices[0]
        text = choice.message.content
        if not (text or choice.finish_reason or choice.logprobs):
            return None  # a token whose text is held back (a partial character)
        return ChatStreamChoice(index=i, delta=ChatDelta(content=text or None),
                                logprobs=choice.logprobs, finish_reason=choice.finish_reason,
                                stop_reason=choice.stop_reason)

    # -- embeddings ----------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        body, _ = await self._decode(request, proto.EMBEDDINGS_URL)
        model = self._served(body.model, self.embedding_model_name, "embedding")
        texts = proto.embedding_texts(body)
        if body.dimensions is not None and body.dimensions != self.embedder.dim:
            raise APIError(400, f"dimensions={body.dimensions} is not supported: the model "
                           f"gives {self.embedder.dim}-dimensional vectors", param="dimensions")
        result = await _until_disconnect(request, self.embedder.embed(texts),
                                         self._client_gone)
        self.metrics.embedding_requests += 1
        return _json(proto.embedding_response(body, result.vectors, result.num_tokens,
                                              model=model))

    # -- the rest --------------------------------------------------------------------
    def _cards(self) -> list[ModelCard]:
        cards = []
        if self.model_name is not None:
            cards.append(ModelCard(id=self.model_name, created=self.created,
                                   max_model_len=self._max_model_len()))
        if self.embedding_model_name is not None:
            cards.append(ModelCard(id=self.embedding_model_name, created=self.created,
                                   max_model_len=self.embedder.max_length))
        return cards

    async def models(self, request: Request) -> Response:
        return _json(ModelList(data=self._cards()))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for card in self._cards():
            if card.id == name:
                return _json(card)
        raise APIError(404, f"the model {name!r} does not exist", code="model_not_found",
                       param="model")

    async def health(self, request: Request) -> Response:
        if self.llm is not None and getattr(self.llm, "error", None) is not None:
            return _json(Health(status="engine failed"), status=503)
        return _json(Health(status="ok"))

    async def sample_rates(self) -> None:
        """Sample the generated-token counter every RATE_SAMPLE_S, so tokens/s
        is right on the first scrape too."""
        while self.llm is not None:
            self.metrics.sample_rate(self.llm.engine.stats())
            await asyncio.sleep(RATE_SAMPLE_S)

    async def prometheus(self, request: Request) -> Response:
        stats = self.llm.engine.stats() if self.llm is not None else None
        return Response(self.metrics.render(stats), media_type=metrics_mod.CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return Response(openapi_json(self.api_key is not None), media_type="application/json")


def build_app(llm: Any | None = None, embedder: Any | None = None, *,
              model_name: str | None = "default", embedding_model_name: str | None = None,
              api_key: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              max_choices: int = DEFAULT_MAX_CHOICES) -> Starlette:
    """The ASGI app. `llm` is an AsyncLLM (generation; None: none served),
    `embedder` an EmbeddingWorker (None: no /v1/embeddings model).
    The names are what clients pass as `model` and what /v1/models lists."""
    server = OpenAIServer(llm, embedder, model_name=model_name,
                          embedding_model_name=embedding_model_name or
                          (getattr(embedder, "name", None) or "embedding"),
                          api_key=api_key, max_waiting=max_waiting,
                          max_body_bytes=max_body_bytes, max_choices=max_choices)
    routes = [
        server.route(proto.COMPLETIONS_URL, server.completions, ["POST"]),
        server.route(proto.CHAT_COMPLETIONS_URL, server.chat_completions, ["POST"]),
        server.route(proto.EMBEDDINGS_URL, server.embeddings, ["POST"]),
        server.route("/v1/models", server.models, ["GET"]),
        server.route("/v1/models/{model:path}", server.model, ["GET"]),
        server.route("/health", server.health, ["GET"], protected=False),
        server.route("/metrics", server.prometheus, ["GET"], protected=False),
        server.route("/openapi.json", server.openapi, ["GET"], protected=False),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape.
        status = getattr(exc, "status_code", 500)
        return APIError(status, getattr(exc, "detail", None) or "error",
                        headers=getattr(exc, "headers", None)).response()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        ticker = asyncio.ensure_future(server.sample_rates())
        try:
            yield
        finally:
            ticker.cancel()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                    lifespan=lifespan)
    app.state.server = server
    return app


# -- streaming helpers -------------------------------------------------------------

class EventStream:
    """A server-sent-events response that closes its event source as soon as
    the client disconnects (or a write to it fails), so the engine requests
    behind it are aborted at once rather than when the next token is ready."""

    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None]):
        self.events = events
        self.on_disconnect = on_disconnect
        self.status_code = 200

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done() and not writer.cancelled():
                error = writer.exception()
                if error is not None and not isinstance(error, OSError):
                    log.error("streaming failed", exc_info=error)
            if not writer.done() or isinstance(writer.exception(), OSError):
                self.on_disconnect()
        finally:
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.events.aclose()  # closes the engine streams: abort


async def _wait_disconnect(receive) -> None:
    # The body has been read, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(request: Request, work: Awaitable, on_disconnect):
    """Run `work`; if the client disconnects first, cancel it (aborting its
    engine requests) and raise _ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        on_disconnect()
        raise _ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _merge(streams: list[AsyncIterator[RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, delta) from several engine streams as they come.
    Closing this iterator cancels every stream, which aborts its request."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _accumulate(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """The whole output so far, from the previous total and a delta."""
    d = delta.outputs[0]
    if total is None:
        first = msgspec.structs.replace(
            d, token_ids=list(d.token_ids),
            logprobs=None if d.logprobs is None else list(d.logprobs))
        return msgspec.structs.replace(delta, outputs=[first])
    c = total.outputs[0]
    c.text += d.text
    c.token_ids.extend(d.token_ids)
    if d.logprobs is not None:
        c.logprobs = (c.logprobs or []) + d.logprobs
    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    total.finished, total.error, total.metrics = delta.finished, delta.error, delta.metrics
    return total


class _UsageCounter:
    """Token counts of a streamed response (prompt counted once per prompt)."""

    def __init__(self, num_choices: int):
        self.prompt = [0] * num_choices
        self.completion = 0

    def add(self, i: int, delta: RequestOutput) -> None:
        self.prompt[i] = len(delta.prompt_token_ids)
        self.completion += len(delta.outputs[0].token_ids)

    def usage(self, n: int = 1) -> proto.Usage:
        prompt = sum(self.prompt[::n])
        return proto.Usage(prompt_tokens=prompt, completion_tokens=self.completion,
                           total_tokens=prompt + self.completion)


class _Echo:
    """A completions body with echo off, and which choices still owe their
    echoed prompt (echo on: each choice's first chunk starts with it)."""

    def __init__(self, request, num_choices: int, echo: bool):
        self.request, self.n = request, request.n
        self.pending = [echo] * num_choices


def _sse(event: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


def _json(body: msgspec.Struct, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status,
                    media_type="application/json")


# -- OpenAPI -------------------------------------------------------------------------

_ERRORS = {400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
           413: "Request body too large", 429: "Too many requests waiting"}


def openapi_json(with_auth: bool = False) -> bytes:
    """The OpenAPI 3.1 document, its schemas generated from the Structs."""
    types = [CompletionBody, ChatCompletionBody, EmbeddingBody, proto.CompletionResponse,
             proto.ChatCompletionResponse, proto.EmbeddingResponse, CompletionChunk,
             ChatCompletionChunk, ModelList, ModelCard, Health, proto.ErrorResponse]
    (_, components) = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}")

    def ref(t: type) -> dict:
        return {"$ref": f"#/components/schemas/{t.__name__}"}

    def json_content(t: type) -> dict:
        return {"application/json": {"schema": ref(t)}}

    errors = {str(code): {"description": text, "content": json_content(proto.ErrorResponse)}
              for code, text in _ERRORS.items()}
    security = [{"bearer": []}] if with_auth else []

    def post(body: type, result: type, chunk: type | None, summary: str) -> dict:
        ok = json_content(result)
        if chunk is not None:  # stream: true answers with server-sent events of `chunk`
            ok["text/event-stream"] = {"schema": {"type": "string"},
                                       "x-event-schema": ref(chunk)}
        return {"post": {"summary": summary, "security": security,
                         "requestBody": {"required": True, "content": json_content(body)},
                         "responses": {"200": {"description": "OK", "content": ok},
                                       **errors}}}

    def get(result: dict, summary: str, codes=(), secured: bool = True) -> dict:
        op = {"summary": summary, "responses": {"200": {"description": "OK",
                                                        "content": result}}}
        if secured:
            op["security"] = security
            op["responses"]["401"] = errors["401"]
        for code in codes:
            op["responses"][str(code)] = errors[str(code)]
        return {"get": op}

    paths = {
        proto.COMPLETIONS_URL: post(CompletionBody, proto.CompletionResponse, CompletionChunk,
                                    "Complete a prompt"),
        proto.CHAT_COMPLETIONS_URL: post(ChatCompletionBody, proto.ChatCompletionResponse,
                                         ChatCompletionChunk, "Answer a conversation"),
        proto.EMBEDDINGS_URL: post(EmbeddingBody, proto.EmbeddingResponse, None,
                                   "Embed texts"),
        "/v1/models": get(json_content(ModelList), "List the served models"),
        "/v1/models/{model}": {"get": {
            **get(json_content(ModelCard), "One served model", codes=(404,))["get"],
            "parameters": [{"name": "model", "in": "path", "required": True,
                            # Plain names: fuzzed ids with "/" or "." would be
                            # normalised away by clients before they reach us.
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}
                           ]}},
        "/health": get(json_content(Health), "Liveness", secured=False),
        "/metrics": get({metrics_mod.CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                        "Prometheus metrics", secured=False),
    }
    paths["/health"]["get"]["responses"]["503"] = {"description": "The engine has failed",
                                                   "content": json_content(Health)}
    for path in (proto.COMPLETIONS_URL, proto.CHAT_COMPLETIONS_URL):
        paths[path]["post"]["responses"]["500"] = {
            "description": "The engine failed", "content": json_content(proto.ErrorResponse)}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": "1",
                 "description": "OpenAI-compatible API of the Conveyor engine"},
        "paths": paths,
        "components": {"schemas": components},
    }
    if with_auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
    return msgspec.json.encode(document)
