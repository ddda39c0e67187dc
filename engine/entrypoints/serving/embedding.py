"""/v1/embeddings: texts in, vectors out, with the input-count limit and
the over-long policy (a 400 unless the request asks for truncation)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from engine.entrypoints.serving.errors import bad_request
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import EmbeddingModel
from engine.entrypoints.serving.protocol import (
    EMBEDDINGS_URL,
    EmbeddingRequest,
    embedding_texts,
)
from engine.entrypoints.serving.responses import EmbeddingData, EmbeddingResponse, Usage


class EmbeddedTexts(NamedTuple):
    """An embedder's results for some texts (the fields of EmbeddingResult)."""

    vectors: np.ndarray
    truncated: Sequence[bool]
    num_tokens: Sequence[int]

    @classmethod
    def split(cls, result: Any, sizes: Sequence[int]) -> list[EmbeddedTexts]:
        """One embed call's result over several requests' texts, cut back
        into each request's share (`sizes` texts each, in order)."""
        out, start = [], 0
        for size in sizes:
            end = start + size
            out.append(cls(result.vectors[start:end], result.truncated[start:end],
                           result.num_tokens[start:end]))
            start = end
        return out


@dataclass
class PreparedEmbedding:
    """A checked embeddings request: its texts, and whether texts longer than
    the model's maximum may be truncated."""

    url: str
    request: EmbeddingRequest
    model: str
    texts: list[str]
    truncate: bool


class EmbeddingServing:
    """OpenAI's embeddings over an EmbeddingModel (vLLM's OpenAIServingEmbedding).

    Embedders always run with truncation on (one batch may hold several
    requests); `respond` then refuses a request whose text was cut without
    its asking."""

    url = EMBEDDINGS_URL

    def __init__(self, model: EmbeddingModel, limits: ServingLimits):
        self.model, self.limits = model, limits

    def prepare(self, request: EmbeddingRequest) -> PreparedEmbedding:
        """Check `request`; raises ServingError."""
        label = self.model.names.check(request.model, "embedding")
        count = 1 if isinstance(request.input, str) else len(request.input)
        if count > self.limits.max_embedding_inputs:
            raise bad_request(f"at most {self.limits.max_embedding_inputs} inputs per request; "
                              f"this one has {count}", "input")
        texts = embedding_texts(request)
        dim = self.model.dim
        if request.dimensions is not None and request.dimensions != dim:
            raise bad_request(f"dimensions={request.dimensions} is not supported: the model "
                              f"gives {dim}-dimensional vectors", "dimensions")
        keep = request.truncate_prompt_tokens
        limit = self.model.max_length
        if keep is not None and keep != -1 and keep < limit:
            # The embedder cuts texts at the model's maximum only.
            raise bad_request(f"truncate_prompt_tokens must be -1 or at least the model's "
                              f"maximum of {limit} tokens for embeddings",
                              "truncate_prompt_tokens")
        return PreparedEmbedding(self.url, request, label, texts, truncate=keep is not None)

    def respond(self, prepared: PreparedEmbedding, vectors: np.ndarray,
                truncated: Sequence[bool], num_tokens: Sequence[int]) -> EmbeddingResponse:
        """The response for the embedder's results of `prepared.texts`."""
        if not prepared.truncate and any(truncated):
            first = list(truncated).index(True)
            raise bad_request(f"input {first} is longer than the model's maximum of "
                              f"{self.model.max_length} tokens; set truncate_prompt_tokens "
                              "to embed it truncated", "input")
        data = []
        for i, row in enumerate(np.asarray(vectors, dtype=np.float32)):
            if prepared.request.encoding_format == "base64":
                value: list[float] | str = base64.b64encode(row.astype("<f4").tobytes()).decode()
            else:
                value = row.tolist()
            data.append(EmbeddingData(index=i, embedding=value))
        tokens = int(sum(num_tokens))
        return EmbeddingResponse(data=data, model=prepared.model,
                                 usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
