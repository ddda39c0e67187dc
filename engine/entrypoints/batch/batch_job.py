"""The batch job runner: an OpenAI Batch input file in, its results out.

    lines ──lazily──► admit (dedupe, resume skip, parse, add_request) ──► engine
      ▲                  │ bad line: error record at once                  │ step()
      └── refill while fewer than `max_in_flight` engine requests ◄────────┘ finished:
                                                                    record appended
The input is never held in memory: lines are pulled only while the engine
has room (`max_in_flight`, about 2 × max_num_seqs keeps it busy). Embedding
lines are gathered into batches for the Embedder, loaded only if one appears.
Every record is appended and flushed as soon as its line is answered, so the
output file is the job's whole state: a re-run skips what it answers.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from engine.core.outputs import RequestOutput
from engine.entrypoints.batch.batch_file import (
    DUPLICATE_CUSTOM_ID,
    INVALID_REQUEST,
    InputLine,
    OutputFile,
    count_lines,
    error_record,
    read_input,
    success_record,
)
from engine.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_inputs,
    chat_response,
    completion_inputs,
    completion_response,
    embedding_response,
    embedding_texts,
    error_response,
    parse_request,
)
from engine.errors import ConveyorError, RequestError


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

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.skipped} skipped (already "
                f"answered); {self.prompt_tokens} prompt + {self.completion_tokens} output "
                f"tokens in {self.elapsed:.1f} s ({self.output_tokens_per_s:.1f} output tok/s)")


@dataclass
class _Pending:
    """A completion/chat line waiting for its engine requests (one a choice)."""

    line: InputLine
    request: CompletionRequest | ChatCompletionRequest
    outputs: list[RequestOutput | None]
    remaining: int


@dataclass
class _PendingEmbedding:
    line: InputLine
    request: EmbeddingRequest
    texts: list[str]


@dataclass
class BatchJob:
    """Run `input_path` into `output_path` (see the module docstring).

    `load_llm()` returns an `engine.LLM` and `load_embedder()` an Embedder;
    each is called at most once, when the first line that needs it arrives.
    """

    input_path: Path
    output_path: Path
    load_llm: Callable[[], Any]
    load_embedder: Callable[[], Any]
    model_name: str = "conveyor"
    embedding_model_name: str = "conveyor-embedding"
    max_in_flight: int = 512
    embed_batch_texts: int = 256
    progress: bool = True
    summary: BatchSummary = field(default_factory=BatchSummary)

    def __post_init__(self):
        self._llm = None
        self._embedder = None
        self._pending: dict[str, tuple[_Pending, int]] = {}  # engine request id -> choice
        self._in_flight = 0
        self._embeds: list[_PendingEmbedding] = []
        self._embed_texts = 0
        self._seen: set[str] = set()
        self._out: OutputFile | None = None
        self._bar = None
        self._start = 0.0

    # -- the loop ----------------------------------------------------------------
    def run(self) -> BatchSummary:
        """Run to the end of the input; return the summary. Raises ConveyorError
        when the job cannot run (missing input, unreadable output, model)."""
        if not self.input_path.is_file():
            if not self.input_path.exists():
                raise ConveyorError(f"input file not found: {self.input_path}")
            raise ConveyorError(f"input is not a file: {self.input_path}")
        if self.output_path.exists() and self.output_path.samefile(self.input_path):
            raise ConveyorError("the output file must not be the input file")
        lines = read_input(self.input_path)
        self._start = time.monotonic()
        with OutputFile.open(self.output_path) as out, self._progress_bar(out) as bar:
            self._out, self._bar = out, bar
            self.summary.repaired_bytes = out.repaired_bytes
            try:
                self._drive(lines)
            finally:
                self._abort_all()
                self.summary.elapsed = time.monotonic() - self._start
        return self.summary

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
            engine_busy = self._llm is not None and self._llm.engine.has_unfinished()
            if self._embeds and (exhausted or not engine_busy
                                 or self._embed_texts >= self.embed_batch_texts):
                self._flush_embeddings()
            if engine_busy:
                self._step()
            elif self._in_flight:  # a bug, not a user error: never spin forever
                raise RuntimeError(f"{self._in_flight} requests in flight but the engine "
                                   "has none")
            elif exhausted and not self._embeds:
                return

    def _step(self) -> None:
        for request in self._llm.engine.step():
            if not request.finished:
                continue
            pending, choice = self._pending.pop(request.request_id)
            pending.outputs[choice] = request.output(delta=False)
            pending.remaining -= 1
            self._in_flight -= 1
            if pending.remaining == 0:
                self._finish_generation(pending)

    def _abort_all(self) -> None:
        # On an exception (Ctrl-C, engine failure) leave no request holding KV
        # blocks; their lines are simply not answered and a re-run does them.
        if self._llm is not None:
            for rid in list(self._pending):
                self._llm.engine.abort_request(rid)
        self._pending.clear()
        self._in_flight = 0

    # -- one input line -------------------------------------------------------------
    def _admit(self, line: InputLine) -> None:
        index = self._out.index
        if line.custom_id is not None and line.custom_id in self._seen:
            if line.record_id in index.record_ids:
                return self._skipped()
            return self._fail(line, f"line {line.line}: custom_id {line.custom_id!r} appears "
                              "earlier in the input", DUPLICATE_CUSTOM_ID)
        if line.custom_id is None:
            if line.record_id in index.record_ids:
                return self._skipped()
        else:
            self._seen.add(line.custom_id)
            if line.custom_id in index.custom_ids:
                return self._skipped()
        if line.request is None:
            return self._fail(line, line.error, line.code)
        try:
            request = parse_request(line.request.url, line.request.body)
            if isinstance(request, EmbeddingRequest):
                texts = embedding_texts(request)
                self._embeds.append(_PendingEmbedding(line, request, texts))
                self._embed_texts += len(texts)
                return None
        except RequestError as exc:
            return self._fail(line, str(exc), INVALID_REQUEST, status_code=400)
        llm = self._get_llm()  # outside the try: a model that cannot load ends the job
        try:
            self._submit(line, request, llm)
        except ConveyorError as exc:  # RequestError, or a model with no chat template
            self._fail(line, str(exc), INVALID_REQUEST, status_code=400)
        return None

    def _submit(self, line: InputLine, request: CompletionRequest | ChatCompletionRequest,
                llm) -> None:
        engine = llm.engine
        if isinstance(request, ChatCompletionRequest):
            inputs = chat_inputs(request, llm.tokenizer, engine.scheduler.config.max_model_len)
        else:
            inputs = completion_inputs(request)
        pending = _Pending(line, request, [None] * len(inputs), len(inputs))
        added: list[str] = []
        try:
            for choice, item in enumerate(inputs):
                rid = f"{line.line}.{choice}"
                engine.add_request(item.prompt, item.params, request_id=rid)
                added.append(rid)
                self._pending[rid] = (pending, choice)
        except RequestError:
            for rid in added:  # all choices or none
                engine.abort_request(rid)
                del self._pending[rid]
            raise
        self._in_flight += len(inputs)
        self.summary.peak_in_flight = max(self.summary.peak_in_flight, self._in_flight)

    def _finish_generation(self, pending: _Pending) -> None:
        request, outputs = pending.request, pending.outputs
        model = request.model or self.model_name
        tokenizer = self._llm.tokenizer
        try:
            if isinstance(request, ChatCompletionRequest):
                body = chat_response(request, outputs, tokenizer, model=model)
            else:
                body = completion_response(request, outputs, tokenizer, model=model)
        except RequestError as exc:  # the engine failed this request
            return self._fail(pending.line, str(exc), "server_error", status_code=500)
        self._succeed(pending.line, body, body.usage.prompt_tokens,
                      body.usage.completion_tokens or 0)
        return None

    def _flush_embeddings(self) -> None:
        batch, self._embeds, self._embed_texts = self._embeds, [], 0
        embedder = self._get_embedder()
        texts = [t for item in batch for t in item.texts]
        result = embedder.embed(texts, truncate=True)
        start = 0
        for item in batch:
            rows = slice(start, start + len(item.texts))
            start = rows.stop
            cut = [i for i, t in enumerate(result.truncated[rows]) if t]
            try:
                if cut:
                    raise RequestError(
                        f"input {cut[0]} is longer than the model's maximum of "
                        f"{embedder.max_length} tokens")
                body = embedding_response(item.request, result.vectors[rows],
                                          result.num_tokens[rows],
                                          model=item.request.model or self.embedding_model_name)
            except RequestError as exc:
                self._fail(item.line, str(exc), INVALID_REQUEST, status_code=400)
                continue
            self._succeed(item.line, body, body.usage.prompt_tokens, 0)

    # -- records --------------------------------------------------------------------
    def _succeed(self, line: InputLine, body: Any, prompt_tokens: int,
                 completion_tokens: int) -> None:
        self._out.write(success_record(line, body, f"req_{uuid.uuid4().hex}"))
        self.summary.done += 1
        self.summary.prompt_tokens += prompt_tokens
        self.summary.completion_tokens += completion_tokens
        self._advance()

    def _fail(self, line: InputLine, message: str, code: str, *,
              status_code: int | None = None) -> None:
        body = None
        if status_code is not None:
            kind = "server_error" if status_code >= 500 else "invalid_request_error"
            body = error_response(message, type=kind, code=code)
        request_id = f"req_{uuid.uuid4().hex}" if status_code is not None else None
        self._out.write(error_record(line, message, code, status_code=status_code,
                                     request_id=request_id, body=body))
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

    # -- models, loaded on first use -----------------------------------------------
    def _get_llm(self):
        if self._llm is None:
            self._llm = self.load_llm()
        return self._llm

    def _get_embedder(self):
        if self._embedder is None:
            self._embedder = self.load_embedder()
        return self._embedder


def run_batch_file(input_path: Path, output_path: Path, *, model: str | None = None,
                   embedding_model: str | None = None, max_num_seqs: int = 256,
                   progress: bool = True, engine_args: dict | None = None) -> BatchSummary:
    """Run a batch file with Conveyor's models (None: the defaults)."""
    engine_args = {k: v for k, v in (engine_args or {}).items() if v is not None}

    def load_llm():
        from engine.entrypoints.llm import LLM

        return LLM(model, max_num_seqs=max_num_seqs, **engine_args)

    def load_embedder():
        from engine.embedding.embedder import Embedder

        return Embedder.load(embedding_model)

    job = BatchJob(Path(input_path), Path(output_path), load_llm, load_embedder,
                   model_name=_model_name(model, "SmolLM2-135M-Instruct"),
                   embedding_model_name=_model_name(embedding_model, "all-MiniLM-L6-v2"),
                   max_in_flight=2 * max_num_seqs, progress=progress)
    return job.run()


def _model_name(model: str | None, default: str) -> str:
    if model is None:
        return default
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else (path.name or model)
