"""An Embedder on its own thread, for the HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.entrypoints.serving.models import DEFAULT_EMBEDDING_NAME


class EmbeddingWorker:
    """An Embedder loaded and run on its own thread, one batch at a time, so
    the event loop never waits on an encoder forward. (MLX streams belong to
    the thread that made them, and the Embedder makes its streams when it
    loads: it must run where it was loaded.)"""

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

        return cls(lambda: Embedder.load(model), name or model or DEFAULT_EMBEDDING_NAME)

    async def embed(self, texts: Sequence[str]):
        """Embedder.embed(texts) (truncating, each cut flagged) on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self.embedder.embed, list(texts))

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
