"""OpenAI-compatible HTTP server: starlette routes over one shared AsyncLLM.

This file is routes and transport only; what a body means and what the
answer is comes from the serving layer (engine.entrypoints.serving), the
same one batch files and queue jobs go through. Every HTTP request becomes
one or more requests of one engine loop (continuous batching across
clients). The event loop only reads, queues and streams: parsing, chat
templates and tokenizing run on a worker thread (a huge prompt never stalls
/health), forward passes on the engine's thread (generation) or the
embedder's. A client that goes away, streaming or not, aborts its requests,
which frees their KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.core.outputs import RequestOutput
from engine.entrypoints.openai import metrics as metrics_mod
from engine.entrypoints.openai.openapi import Health, openapi_json
from engine.entrypoints.openai.streaming import (
    ClientGone,
    EventStream,
    accumulate,
    merge,
    sse,
    until_disconnect,
)
from engine.entrypoints.openai.transport import (
    HostGuard,
    check_api_key,
    error_response,
    json_response,
    read_json_body,
)
from engine.entrypoints.serving.errors import ServingError, as_serving_error, unknown_url
from engine.entrypoints.serving.generation import PreparedGeneration
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import EmbeddingModel, GenerationModel, ModelNames
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.entrypoints.serving.protocol import (
    CHAT_COMPLETIONS_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    REQUEST_FIELDS,
    REQUEST_TYPES,
)
from engine.entrypoints.serving.responses import ModelList
from engine.entrypoints.serving.streaming import StreamRenderer
from engine.entrypoints.serving.tokenization import (
    DETOKENIZE_URL,
    TOKENIZE_URL,
    TokenizationServing,
)
from engine.errors import ConveyorError

log = logging.getLogger("conveyor.server")

RATE_SAMPLE_S = 1.0   # how often tokens/s samples the engine's counter
PREPARE_THREADS = 2   # threads that parse, template and tokenize bodies


class OpenAIServer:
    """The routes' state: the engines, the serving layer over them, the limits."""

    def __init__(self, llm: Any | None, embedder: Any | None, serving: OpenAIServing, *,
                 api_key: str | None = None):
        if llm is None and embedder is None:
            raise ConveyorError("the server needs a generation or an embedding model")
        self.llm, self.embedder, self.serving = llm, embedder, serving
        self.limits = serving.limits
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics_mod.ServerMetrics(
            serving.generation.names.label if serving.generation is not None else "default")
        self.created = int(time.time())
        self.embeddings_waiting = 0
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS,
                                                thread_name_prefix="conveyor-prepare")

    # -- plumbing --------------------------------------------------------------
    def route(self, path: str, handler: Callable[[Request], Awaitable[Response]],
              methods: list[str], *, protected: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if protected:
                    check_api_key(request, self.api_key)
                response = await handler(request)
            except ClientGone:
                response = Response(status_code=499)  # nobody reads it (nginx's code)
            except Exception as exc:  # noqa: BLE001 - every error is an OpenAI body
                error = as_serving_error(exc, REQUEST_FIELDS)
                if error is not exc and not isinstance(exc, ConveyorError):
                    log.exception("error serving %s", path)  # a bug, not the client
                response = error_response(error)
            self.metrics.count_request(path, response.status_code)
            return response
        return Route(path, endpoint, methods=methods)

    async def _prepare(self, request: Request, url: str):
        raw = await read_json_body(request, self.limits.max_body_bytes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prepare_pool, self.serving.prepare, url, raw)

    def close(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # -- generation ------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETIONS_URL)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT_COMPLETIONS_URL)

    async def _generate(self, request: Request, url: str) -> Response:
        prepared: PreparedGeneration = await self._prepare(request, url)
        if getattr(self.llm, "error", None) is not None:
            raise ServingError(503, "the engine has failed; restart the server")
        self._check_overload()
        streams = [self.llm.generate(item.prompt, item.params,
                                     request_id=f"{prepared.response_id}-{i}")
                   for i, item in enumerate(prepared.inputs)]
        events = merge(streams)
        if prepared.request.stream:
            renderer = StreamRenderer(self.serving.serving(url), prepared)
            return EventStream(self._events(renderer, events), on_disconnect=self._client_gone)
        finals: list[RequestOutput | None] = [None] * len(prepared.inputs)

        async def collect() -> None:
            async with aclosing(events):
                async for i, delta in events:
                    finals[i] = accumulate(finals[i], delta)
                    self._observe(delta)

        await until_disconnect(request, collect(), self._client_gone)
        return json_response(self.serving.respond(prepared, finals))

    def _check_overload(self) -> None:
        # Requests posted to the engine's inbox but not yet admitted count as
        # waiting too: a burst arriving during one step must not slip through.
        waiting = self.llm.engine.stats().waiting + self.llm.num_pending()
        self._refuse_if_full(waiting)

    def _refuse_if_full(self, waiting: int) -> None:
        if waiting >= self.limits.max_waiting:
            self.metrics.rejected_overload += 1
            raise ServingError(429, f"the server is busy: {waiting} requests are waiting "
                               f"(limit {self.limits.max_waiting}); retry later",
                               type="rate_limit_exceeded", code="queue_full",
                               headers={"Retry-After": "1"})

    def _client_gone(self) -> None:
        self.metrics.client_aborts += 1

    def _observe(self, delta: RequestOutput) -> None:
        if delta.finished:
            m = delta.metrics
            self.metrics.count_finished(delta.outputs[0].finish_reason or "abort",
                                        m.time_to_first_token, m.e2e_latency)

    async def _events(self, renderer: StreamRenderer,
                      events: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[bytes]:
        """The SSE body. After the headers an error can only travel inside the
        stream, as an OpenAI error body."""
        for chunk in renderer.opening():
            yield sse(chunk)
        try:
            async with aclosing(events):
                async for i, delta in events:
                    self._observe(delta)
                    chunk = renderer.chunk(i, delta)
                    if chunk is not None:
                        yield sse(chunk)
        except Exception as exc:  # noqa: BLE001 - reported to the client in the stream
            error = as_serving_error(exc, REQUEST_FIELDS)
            if error.status >= 500:
                log.error("stream failed: %s", exc)
            yield sse(error.body())
        else:
            for chunk in renderer.closing():
                yield sse(chunk)
        yield b"data: [DONE]\n\n"

    # -- embeddings --------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        prepared = await self._prepare(request, EMBEDDINGS_URL)
        # Embedding requests queue for one encoder thread: bounded like generation.
        self._refuse_if_full(self.embeddings_waiting)
        self.embeddings_waiting += 1
        try:
            result = await until_disconnect(request, self.embedder.embed(prepared.texts),
                                            self._client_gone)
        finally:
            self.embeddings_waiting -= 1
        self.metrics.embedding_requests += 1
        return json_response(self.serving.respond(prepared, result))

    # -- tokenizer ---------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._tokenization(request, "detokenize")

    async def _tokenization(self, request: Request, what: str) -> Response:
        if self.serving.generation is None:
            raise ServingError(404, "no generation model is served here", param="model",
                               code="model_not_found")
        raw = await read_json_body(request, self.limits.max_body_bytes)
        work = getattr(TokenizationServing(self.serving.generation), what)
        loop = asyncio.get_running_loop()
        return json_response(await loop.run_in_executor(self._prepare_pool, work, raw))

    # -- the rest ------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        return json_response(ModelList(data=self.serving.model_cards(self.created)))

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for card in self.serving.model_cards(self.created):
            if card.id == name:
                return json_response(card)
        raise ServingError(404, f"the model {name!r} does not exist", code="model_not_found",
                           param="model")

    async def health(self, request: Request) -> Response:
        if self.llm is not None and getattr(self.llm, "error", None) is not None:
            return json_response(Health(status="engine failed"), status=503)
        return json_response(Health(status="ok"))

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
              model_name: str | ModelNames = "default",
              embedding_model_name: str | ModelNames | None = None,
              api_key: str | None = None, limits: ServingLimits | None = None,
              allowed_hosts: Iterable[str] | None = None) -> Any:
    """The ASGI app. `llm` is an AsyncLLM (generation; None: none served),
    `embedder` an EmbeddingWorker (None: no embeddings). The names are what
    clients pass as `model` and what /v1/models lists. `allowed_hosts`: the
    Host header names accepted (None: any; give them for a loopback server)."""
    generation = embedding = None
    if llm is not None:
        generation = GenerationModel(_names(model_name), llm.engine)
    if embedder is not None:
        name = embedding_model_name or getattr(embedder, "name", None) or "embedding"
        embedding = EmbeddingModel(_names(name), embedder)
    serving = OpenAIServing(generation, embedding, limits)
    server = OpenAIServer(llm, embedder, serving, api_key=api_key)
    routes = [
        server.route(COMPLETIONS_URL, server.completions, ["POST"]),
        server.route(CHAT_COMPLETIONS_URL, server.chat_completions, ["POST"]),
        server.route(EMBEDDINGS_URL, server.embeddings, ["POST"]),
        server.route(TOKENIZE_URL, server.tokenize, ["POST"]),
        server.route(DETOKENIZE_URL, server.detokenize, ["POST"]),
        server.route("/v1/models", server.models, ["GET"]),
        server.route("/v1/models/{model:path}", server.model, ["GET"]),
        server.route("/health", server.health, ["GET"], protected=False),
        server.route("/metrics", server.prometheus, ["GET"], protected=False),
        server.route("/openapi.json", server.openapi, ["GET"], protected=False),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape.
        status = getattr(exc, "status_code", 500)
        if status == 404:  # as batch files and queue jobs answer an unknown url
            return error_response(unknown_url(request.url.path, REQUEST_TYPES))
        return error_response(ServingError(status, getattr(exc, "detail", None) or "error",
                                           headers=getattr(exc, "headers", None)))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        ticker = asyncio.ensure_future(server.sample_rates())
        try:
            yield
        finally:
            ticker.cancel()
            server.close()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                    lifespan=lifespan)
    app.state.server = server
    if allowed_hosts is None:
        return app
    guarded = HostGuard(app, allowed_hosts)
    guarded.state = app.state
    return guarded


def _names(name: str | ModelNames) -> ModelNames:
    return name if isinstance(name, ModelNames) else ModelNames([name])
