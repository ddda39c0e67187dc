"""OpenAIServing: the one path from an OpenAI request body to engine work and
back, shared by the HTTP server, batch files and queue jobs.

    prepared = serving.prepare(url, raw_body)     # ServingError if refused
    ... run prepared.inputs (generation) or prepared.texts (embeddings) ...
    body = serving.respond(prepared, result)      # the OpenAI response Struct

How the engine work runs is the entry point's business (an AsyncLLM stream,
a synchronous engine loop, an embedder thread); what a body means, which
limits apply and what the answer or error is, is decided here only.
"""

from __future__ import annotations

from typing import Any

from engine.entrypoints.serving.chat import ChatServing
from engine.entrypoints.serving.completion import CompletionServing
from engine.entrypoints.serving.embedding import EmbeddingServing, PreparedEmbedding
from engine.entrypoints.serving.errors import model_not_found, too_large, unknown_url
from engine.entrypoints.serving.generation import GenerationServing, PreparedGeneration
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import EmbeddingModel, GenerationModel
from engine.entrypoints.serving.protocol import (
    CHAT_COMPLETIONS_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    REQUEST_TYPES,
    OpenAIRequest,
    decode_request,
)
from engine.entrypoints.serving.responses import ModelCard, OpenAIResponse

Prepared = PreparedGeneration | PreparedEmbedding


class OpenAIServing:
    """The served models (either may be None: not served) under one set of limits."""

    def __init__(self, generation: GenerationModel | None = None,
                 embedding: EmbeddingModel | None = None,
                 limits: ServingLimits | None = None):
        self.generation, self.embedding = generation, embedding
        self.limits = limits or ServingLimits()
        self._servings: dict[str, Any] = {}
        if generation is not None:
            self._servings[COMPLETIONS_URL] = CompletionServing(generation, self.limits)
            self._servings[CHAT_COMPLETIONS_URL] = ChatServing(generation, self.limits)
        if embedding is not None:
            self._servings[EMBEDDINGS_URL] = EmbeddingServing(embedding, self.limits)

    def decode(self, url: str, raw: bytes | str) -> OpenAIRequest:
        """The request for `url` from its JSON body; ServingError if refused."""
        if url not in REQUEST_TYPES:
            raise unknown_url(url, REQUEST_TYPES)
        if len(raw) > self.limits.max_body_bytes:
            raise too_large(self.limits.max_body_bytes)
        return decode_request(url, raw)

    def serving(self, url: str) -> GenerationServing | EmbeddingServing:
        """The serving class for a known `url`; a 404 when its model is not served."""
        serving = self._servings.get(url)
        if serving is None:
            what = "embedding" if url == EMBEDDINGS_URL else "generation"
            raise model_not_found(f"no {what} model is served here")
        return serving

    def prepare(self, url: str, raw: bytes | str) -> Prepared:
        """Decode and check a body and build its engine work. May load a lazy
        model and tokenizes: off the event loop for servers."""
        request = self.decode(url, raw)
        return self.serving(url).prepare(request)

    def respond(self, prepared: Prepared, result: Any) -> OpenAIResponse:
        """The response body: `result` is the finished RequestOutputs of a
        generation (choice order) or the embedder's result (`vectors`,
        `truncated`, `num_tokens`) for an embedding."""
        serving = self.serving(prepared.url)
        if isinstance(prepared, PreparedEmbedding):
            return serving.respond(prepared, result.vectors, result.truncated,
                                   result.num_tokens)
        return serving.respond(prepared, result)

    def model_cards(self, created: int) -> list[ModelCard]:
        """/v1/models: the loaded models under their labels."""
        cards = []
        if self.generation is not None and self.generation.loaded:
            cards.append(ModelCard(id=self.generation.names.label, created=created,
                                   max_model_len=self.generation.max_model_len))
        if self.embedding is not None:
            cards.append(ModelCard(id=self.embedding.names.label, created=created,
                                   max_model_len=self.embedding.max_length))
        return cards
