"""Job handlers: how the queue worker runs the engine work of prepared jobs.
What a job's body means and what its answer is comes from the serving layer
(the worker calls it); a handler only batches jobs through its model and
says which finished (`Finished.result`) or failed (`Finished.error`)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.entrypoints.queue.jobs import Job
from engine.entrypoints.serving.embedding import EmbeddedTexts, PreparedEmbedding
from engine.entrypoints.serving.errors import ServingError
from engine.entrypoints.serving.generation import PreparedGeneration
from engine.entrypoints.serving.models import EmbeddingModel, GenerationModel, ModelNames
from engine.entrypoints.serving.protocol import (
    CHAT_COMPLETIONS_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
)
from engine.entrypoints.serving.runs import GenerationRuns

log = logging.getLogger("conveyor.worker")


@dataclass
class Finished:
    """A job whose engine work ended: `result` for serving.respond, or the
    `error` of a failed run (retried, then dead-lettered)."""

    job: Job
    prepared: Any
    result: Any = None
    error: str | None = None


class JobHandler(Protocol):
    """Runs the jobs of some urls on one model. `admit` takes a prepared job
    (a ServingError if the engine refuses it), `work` advances admitted jobs
    and returns those that ended."""

    urls: tuple[str, ...]
    model: GenerationModel | EmbeddingModel

    def room(self) -> int: ...
    def admit(self, job: Job, prepared: Any) -> None: ...
    def work(self) -> list[Finished]: ...
    def in_flight(self) -> list[Job]: ...


def _names(model: str | ModelNames) -> ModelNames:
    return model if isinstance(model, ModelNames) else ModelNames([model])


class EmbeddingJobs:
    """/v1/embeddings jobs: all texts admitted since the last `work` go
    through one `embed(texts, truncate=True)` call, which batches them under
    the model's token budget. `embedder` is an Embedder or anything with its
    `embed`, `dim` and `max_length` (tests pass stubs)."""

    urls = (EMBEDDINGS_URL,)

    def __init__(self, embedder: Any, *, model: str | ModelNames,
                 token_budget: int = 16384, max_jobs: int = 512):
        self.embedder = embedder
        self.model = EmbeddingModel(_names(model), embedder)
        self.token_budget = token_budget
        self.max_jobs = max_jobs
        self._tokens_per_job = 32.0  # running estimate, refined from each batch
        self._admitted: list[tuple[Job, PreparedEmbedding]] = []

    @classmethod
    def from_embedder(cls, embedder: Any, model: str | ModelNames | None = None
                      ) -> EmbeddingJobs:
        """Sized to one wave of `embedder`'s batches (rows and padded tokens)."""
        streams = max(1, getattr(embedder, "num_streams", 1))
        return cls(embedder, model=model or embedder.name or "embedding",
                   token_budget=embedder.batch_tokens * streams,
                   max_jobs=embedder.max_batch_size * streams)

    def room(self) -> int:
        # Texts are not tokenized before they are read, so the read size comes
        # from the tokens per job seen so far (a job may carry many texts).
        fits = int(self.token_budget // max(self._tokens_per_job, 1.0))
        return max(1, min(self.max_jobs, fits)) - len(self._admitted)

    def admit(self, job: Job, prepared: PreparedEmbedding) -> None:
        self._admitted.append((job, prepared))

    def in_flight(self) -> list[Job]:
        return [job for job, _ in self._admitted]

    def work(self) -> list[Finished]:
        admitted = self._admitted
        if not admitted:
            return []
        try:  # the jobs count as in flight until their batch has run
            texts = [t for _, p in admitted for t in p.texts]
            try:
                result = self.embedder.embed(texts, truncate=True)
            except Exception:  # noqa: BLE001 - find the job at fault by running each alone
                return [self._run_alone(job, prepared) for job, prepared in admitted]
        finally:
            self._admitted = []
        shares = EmbeddedTexts.split(result, [len(p.texts) for _, p in admitted])
        seen = sum(result.num_tokens) / len(admitted)
        self._tokens_per_job = 0.5 * self._tokens_per_job + 0.5 * seen
        return [Finished(job, prepared, share)
                for (job, prepared), share in zip(admitted, shares, strict=True)]

    def _run_alone(self, job: Job, prepared: PreparedEmbedding) -> Finished:
        try:
            result = self.embedder.embed(prepared.texts, truncate=True)
        except Exception as exc:  # noqa: BLE001 - the job fails; it will be retried
            return Finished(job, prepared, error=f"{type(exc).__name__}: {exc}")
        return Finished(job, prepared, EmbeddedTexts(result.vectors, result.truncated,
                                                     result.num_tokens))


class GenerationJobs:
    """/v1/completions and /v1/chat/completions jobs on a continuous-batching
    engine: jobs join the running batch as sequence slots free up.

    `engine` is an LLMEngine, or a callable returning one (loaded on the first
    generation job, so a worker fed only embeddings never loads it).

    A failing engine step aborts every request in it, and which job caused it
    is unknown: the jobs of that step are run again one at a time, so only a
    job that fails alone is charged an attempt."""

    urls = (COMPLETIONS_URL, CHAT_COMPLETIONS_URL)

    def __init__(self, engine: Any, *, model: str | ModelNames):
        load: Callable[[], Any] | None = engine if callable(engine) else None
        self.model = GenerationModel(_names(model), None if load else engine, load=load)
        self._runs: GenerationRuns | None = None
        self._jobs: dict[str, Job] = {}     # entry id -> job, while it runs
        self._suspects: deque[tuple[Job, PreparedGeneration]] = deque()
        self._running: dict[str, PreparedGeneration] = {}

    @property
    def runs(self) -> GenerationRuns:
        if self._runs is None:
            log.info("loading the generation model")
            self._runs = GenerationRuns(self.model.engine)
        return self._runs

    def room(self) -> int:
        if self._suspects:
            return 0  # finding which job broke a step: nothing new meanwhile
        if not self.model.loaded:
            return 256
        # Several choices of one job each take a slot; at least one per job.
        return self.model.engine.args.max_num_seqs - self.runs.num_sequences

    def in_flight(self) -> list[Job]:
        return [*self._jobs.values(), *(job for job, _ in self._suspects)]

    def admit(self, job: Job, prepared: PreparedGeneration) -> None:
        self.runs.submit(job.entry_id, prepared)  # ServingError: refused, none added
        self._jobs[job.entry_id] = job
        self._running[job.entry_id] = prepared

    def work(self) -> list[Finished]:
        if self._suspects and not self._jobs:
            job, prepared = self._suspects.popleft()
            try:
                self.admit(job, prepared)
            except ServingError as exc:
                return [Finished(job, prepared, error=str(exc))]
        if not self._jobs:
            return []
        try:
            done = self.runs.step()
        except Exception as exc:  # noqa: BLE001 - the engine aborted all its requests
            return self._step_failed(f"engine step failed: {type(exc).__name__}: {exc}")
        out = []
        for entry_id, prepared, outputs in done:
            job = self._jobs.pop(entry_id)
            self._running.pop(entry_id)
            errors = [o.error for o in outputs if o.error]
            out.append(Finished(job, prepared, error=errors[0]) if errors
                       else Finished(job, prepared, outputs))
        return out

    def _step_failed(self, error: str) -> list[Finished]:
        failed = [(self._jobs[key], self._running[key]) for key in self._jobs]
        self._jobs.clear()
        self._running.clear()
        if len(failed) == 1:
            job, prepared = failed[0]
            return [Finished(job, prepared, error=error)]  # it failed alone: its fault
        log.warning("%s; running its %d jobs one at a time to find the cause", error,
                    len(failed))
        self._suspects.extend(failed)
        return []
