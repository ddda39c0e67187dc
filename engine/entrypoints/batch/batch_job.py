"""The batch job runner: an OpenAI Batch input file in, its results out.

    lines ──lazily──► admit (dedupe, resume skip, serving.prepare, submit) ──► engine
      ▲                  │ refused line: error record at once               │ step()
      └── refill while fewer than `max_in_flight` engine requests ◄─────────┘ finished:
                                                                     record appended
Every body goes through the serving layer the HTTP server uses, so a line
gets the answer, or the error, the same body gets over HTTP. The input is
never held in memory: lines are pulled only while the engine has room
(`max_in_flight`, about 2 × max_num_seqs keeps it busy). Embedding lines
are gathered into batches for the Embedder, loaded only if one appears.
Every record is appended and flushed as soon as its line is answered, so
the output file is the job's whole state: a re-run skips what it answers.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import (
    DUPLICATE,
    DUPLICATE_CUSTOM_ID,
    INVALID_REQUEST,
    SERVER_ERROR,
    SKIP,
    InputLine,
    OutputFile,
    count_lines,
    error_record,
    read_input,
    success_record,
    triage,
)
from engine.entrypoints.serving.embedding import EmbeddedTexts, PreparedEmbedding
from engine.entrypoints.serving.errors import ServingError
from engine.entrypoints.serving.generation import PreparedGeneration
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import (
    DEFAULT_EMBEDDING_NAME,
    EmbeddingModel,
    GenerationModel,
    ModelNames,
)
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.entrypoints.serving.runs import GenerationRuns
from engine.errors import ConveyorError


class BatchSummary(msgspec.Struct, kw_only=True):
    """What a run did. `skipped`: lines answered by an earlier run."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed: float = 0.0
    repaired_bytes: int = 0        # a torn last line dropped from the output
    peak_in_flight: int = 0        # most engine requests queued at once
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0     # of which were cached (computed once, shared)

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.skipped} skipped (already "
                f"answered); {self.prompt_tokens} prompt + {self.completion_tokens} output "
                f"tokens in {self.elapsed:.1f} s ({self.output_tokens_per_s:.1f} output tok/s)"
                + (f"; prefix cache {self.prefix_cache_hits}/{self.prefix_cache_queries} prompt "
                   f"tokens ({100 * self.prefix_cache_hits / self.prefix_cache_queries:.0f}%)"
                   if self.prefix_cache_queries else ""))


def _names(name: str | ModelNames) -> ModelNames:
    return name if isinstance(name, ModelNames) else ModelNames([name])


@dataclass
class BatchJob:
    """Run `input_path` into `output_path` (see the module docstring).

    `load_llm()` returns an `engine.LLM` and `load_embedder()` an Embedder;
    each is called at most once, when the first line that needs it arrives.
    The model names are what a line's `model` may say (anything else: 404).
    """

    input_path: Path
    output_path: Path
    load_llm: Callable[[], Any]
    load_embedder: Callable[[], Any]
    model_name: str | ModelNames = "conveyor"
    embedding_model_name: str | ModelNames = "conveyor-embedding"
    max_in_flight: int = 512
    embed_batch_texts: int = 256
    progress: bool = True
    limits: ServingLimits = field(default_factory=ServingLimits)
    summary: BatchSummary = field(default_factory=BatchSummary)

    def __post_init__(self):
        self.serving = OpenAIServing(
            GenerationModel(_names(self.model_name), load=lambda: self.load_llm().engine),
            EmbeddingModel(_names(self.embedding_model_name), load=self.load_embedder),
            self.limits)
        self._runs: GenerationRuns | None = None
        self._lines: dict[int, InputLine] = {}   # line number -> line, while it runs
        self._embeds: list[tuple[InputLine, PreparedEmbedding]] = []
        self._embed_texts = 0
        self._seen: set[str] = set()
        self._out: OutputFile | None = None
        self._bar = None
        self._start = 0.0

    @property
    def _in_flight(self) -> int:
        return self._runs.num_sequences if self._runs is not None else 0

    # -- the loop ----------------------------------------------------------------
    def run(self) -> BatchSummary:
        """Run to the end of the input; return the summary. Raises ConveyorError
        when the job cannot run (missing input, unusable or locked output, model)."""
        if not self.input_path.is_file():
            if not self.input_path.exists():
                raise ConveyorError(f"input file not found: {self.input_path}")
            raise ConveyorError(f"input is not a file: {self.input_path}")
        if self.output_path.exists() and self.output_path.samefile(self.input_path):
            raise ConveyorError("the output file must not be the input file")
        lines = read_input(self.input_path, self.limits.max_body_bytes)
        self._start = time.monotonic()
        with OutputFile.open(self.output_path) as out, self._progress_bar(out) as bar:
            self._out, self._bar = out, bar
            self.summary.repaired_bytes = out.repaired_bytes
            try:
                self._drive(lines)
            finally:
                if self._runs is not None:
                    # On an exception (Ctrl-C, engine failure) leave no request
                    # holding KV blocks; a re-run answers their lines.
                    self._runs.abort_all()
                self.summary.elapsed = time.monotonic() - self._start
                self._count_prefix_cache()
        return self.summary

    def answer(self, lines: Iterable[InputLine], out: Any) -> None:
        """Answer `lines` into `out` (anything with OutputFile's `write` and
        `index`): `run`'s loop without its files, for an engine actor whose
        driver owns the output. Duplicates are judged within `lines` only."""
        self._out, self._seen = out, set()
        try:
            self._drive(iter(lines))
        finally:
            if self._runs is not None:
                self._runs.abort_all()
            self._out = None
            self._lines.clear()

    def pump(self, lines: Iterable[InputLine], out: Any, seconds: float) -> None:
        """Admit `lines` (already triaged by whoever feeds this job), then run
        the loop for about `seconds`, or until nothing is left to run,
        finished records going to `out`. Unlike `answer`, unfinished requests
        stay in the engine between calls, so a job fed in small batches of
        lines keeps its batch full instead of draining it at every call. A
        line already in flight is not admitted twice (a feeder that lost
        track of it may send it again)."""
        self._out = out
        try:
            for line in lines:
                if line.line not in self._lines:
                    self._submit(line)
            deadline = time.monotonic() + seconds
            while self._turn(exhausted=True) and time.monotonic() < deadline:
                pass
        finally:
            self._out = None

    @property
    def waiting(self) -> int:
        """Engine requests admitted but not yet running (the engine's queue)."""
        return self._runs.engine.stats().waiting if self._runs is not None else 0

    def _count_prefix_cache(self) -> None:
        generation = self.serving.generation
        if generation is not None and generation.loaded:
            stats = generation.engine.stats()
            self.summary.prefix_cache_queries = stats.prefix_cache_queries
            self.summary.prefix_cache_hits = stats.prefix_cache_hits

    def _drive(self, lines: Iterator[InputLine]) -> None:
        exhausted = False
        while True:
            while (not exhausted and self._in_flight < self.max_in_flight
                   and self._embed_texts < self.embed_batch_texts):
                line = next(lines, None)
                if line is None:
                    exhausted = True
                else:
                    self._admit(line)
            if not self._turn(exhausted) and exhausted:
                return

    def _turn(self, exhausted: bool) -> bool:
        """One turn of the loop: the embedding batch when it is due, one
        engine step. False when there was nothing to run. `exhausted`: no
        more lines are coming for now."""
        engine_busy = self._runs is not None and self._runs.engine.has_unfinished()
        flush = self._embeds and (exhausted or not engine_busy
                                  or self._embed_texts >= self.embed_batch_texts)
        if flush:
            self._flush_embeddings()
        if engine_busy:
            for number, prepared, outputs in self._runs.step():
                self._finish_generation(self._lines.pop(number), prepared, outputs)
        elif self._in_flight:  # a bug, not a user error: never spin forever
            raise RuntimeError(f"{self._in_flight} requests in flight but the engine has none")
        return bool(engine_busy or flush)

    # -- one input line -------------------------------------------------------------
    def _admit(self, line: InputLine) -> None:
        verdict = triage(line, self._seen, self._out.index)
        if verdict is SKIP:
            return self._skipped()
        if verdict is DUPLICATE:
            return self._fail(line, f"line {line.line}: custom_id {line.custom_id!r} appears "
                              "earlier in the input", DUPLICATE_CUSTOM_ID)
        return self._submit(line)

    def _submit(self, line: InputLine) -> None:
        """Hand a triaged line to the engine, the embedder or an error record."""
        if line.request is None:
            return self._fail(line, line.error, line.code)
        # A model that cannot load raises a ConveyorError that is not a
        # ServingError: it ends the job rather than failing each line.
        try:
            prepared = self.serving.prepare(line.request.url, bytes(line.request.body))
            if isinstance(prepared, PreparedEmbedding):
                self._embeds.append((line, prepared))
                self._embed_texts += len(prepared.texts)
                return None
            if self._runs is None:
                self._runs = GenerationRuns(self.serving.generation.engine)
            self._runs.submit(line.line, prepared)
            self._lines[line.line] = line
        except ServingError as exc:
            return self._refuse(line, exc)
        self.summary.peak_in_flight = max(self.summary.peak_in_flight, self._in_flight)
        return None

    def _finish_generation(self, line: InputLine, prepared: PreparedGeneration,
                           outputs: list) -> None:
        try:
            body = self.serving.respond(prepared, outputs)
        except ServingError as exc:  # the engine failed this request
            return self._refuse(line, exc)
        self._succeed(line, body, body.usage.prompt_tokens, body.usage.completion_tokens or 0)
        return None

    def _flush_embeddings(self) -> None:
        batch, self._embeds, self._embed_texts = self._embeds, [], 0
        embedder = self.serving.embedding.embedder
        texts = [t for _, prepared in batch for t in prepared.texts]
        result = embedder.embed(texts, truncate=True)
        shares = EmbeddedTexts.split(result, [len(p.texts) for _, p in batch])
        for (line, prepared), share in zip(batch, shares, strict=True):
            try:
                body = self.serving.respond(prepared, share)
            except ServingError as exc:
                self._refuse(line, exc)
                continue
            self._succeed(line, body, body.usage.prompt_tokens, 0)

    # -- records --------------------------------------------------------------------
    def _succeed(self, line: InputLine, body: Any, prompt_tokens: int,
                 completion_tokens: int) -> None:
        self._out.write(success_record(line, body, f"req_{uuid.uuid4().hex}"))
        self.summary.done += 1
        self.summary.prompt_tokens += prompt_tokens
        self.summary.completion_tokens += completion_tokens
        self._advance()

    def _refuse(self, line: InputLine, error: ServingError) -> None:
        """The record of a request the API answered with an error: its status
        and OpenAI's error body, as the HTTP server would send them."""
        code = error.code or (SERVER_ERROR if error.status >= 500 else INVALID_REQUEST)
        self._out.write(error_record(line, error.message, code, status_code=error.status,
                                     request_id=f"req_{uuid.uuid4().hex}", body=error.body()))
        self.summary.failed += 1
        self._advance()

    def _fail(self, line: InputLine, message: str, code: str) -> None:
        """The record of a line that is not a request at all (no response)."""
        self._out.write(error_record(line, message, code))
        self.summary.failed += 1
        self._advance()

    def _skipped(self) -> None:
        # Not on the bar: its total leaves answered lines out, so the rate and
        # ETA are those of the work still to do.
        self.summary.skipped += 1

    def _advance(self) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        elapsed = time.monotonic() - self._start
        if elapsed > 0:
            self._bar.set_postfix_str(
                f"{self.summary.completion_tokens / elapsed:.1f} tok/s, "
                f"{self.summary.failed} failed", refresh=False)

    def _progress_bar(self, out: OutputFile):
        from tqdm import tqdm

        total = None
        if self.progress:
            total = max(0, count_lines(self.input_path) - out.index.records)
        return tqdm(total=total, desc="batch", unit=" req", disable=not self.progress,
                    file=sys.stderr, dynamic_ncols=True)


def run_batch_file(input_path: Path, output_path: Path, *, model: str | None = None,
                   embedding_model: str | None = None, served_model_name: str | None = None,
                   max_num_seqs: int = 256, progress: bool = True,
                   engine_args: dict | None = None,
                   limits: ServingLimits | None = None) -> BatchSummary:
    """Run a batch file with Conveyor's models (None: the defaults)."""
    engine_args = {k: v for k, v in (engine_args or {}).items() if v is not None}

    def load_llm():
        from engine.entrypoints.llm import LLM

        return LLM(model, max_num_seqs=max_num_seqs, **engine_args)

    def load_embedder():
        from engine.embedding.embedder import Embedder

        return Embedder.load(embedding_model)

    job = BatchJob(Path(input_path), Path(output_path), load_llm, load_embedder,
                   model_name=ModelNames.of(model, served=served_model_name),
                   embedding_model_name=ModelNames.of(embedding_model,
                                                      default=DEFAULT_EMBEDDING_NAME),
                   max_in_flight=2 * max_num_seqs, progress=progress,
                   limits=limits or ServingLimits())
    return job.run()
