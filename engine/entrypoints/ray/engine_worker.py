"""One engine behind the batch runner's own loop, answering batch lines:
the body of a Ray actor (Ray Data UDF or batch-file actor).

Lines are (line number, raw line bytes); the answers are the encoded output
records, exactly what the single-process runner would append for those
lines. Two ways in: `answer(chunk)` runs a chunk to its end (Ray Data's
batches), `pump(lines)` streams (the batch-file driver: new lines join the
running batch, finished records come back every fraction of a second). The
worker never touches the output file: whoever drove it decides what is
written, so a killed worker loses only the lines it held.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import (
    BatchOutputLine,
    ResumeIndex,
    parse_input_line,
    record_line,
)
from engine.entrypoints.batch.batch_job import BatchJob
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import DEFAULT_EMBEDDING_NAME, ModelNames


class WorkerConfig(msgspec.Struct, kw_only=True, frozen=True):
    """What an actor needs to build its engine (sent once, at start-up)."""

    model: str | None = None
    embedding_model: str | None = None
    served_model_name: str | None = None
    max_num_seqs: int = 256
    engine_args: dict[str, Any] = {}
    limits: ServingLimits = ServingLimits()
    # CPU actors: the cores the actor is given, hence its threads and its
    # share of the RAM (default: the whole machine, which actors sharing it
    # would oversubscribe).
    cpu_threads: int | None = None


class Pumped(msgspec.Struct, frozen=True):
    """What one `pump` call returns."""

    incarnation: str                  # new each time the worker is built
    waiting: int                      # requests its engine has queued, not yet running
    records: list[tuple[int, bytes]]  # (line number, encoded record) of lines that finished


class _Records:
    """OutputFile's stand-in: keeps the encoded records of one call, each
    with its input line number."""

    def __init__(self):
        self.index = ResumeIndex()   # resuming is the driver's business
        self.lines: list[tuple[int, bytes]] = []
        self._encoder = msgspec.json.Encoder()

    def write(self, record: BatchOutputLine) -> None:
        self.lines.append((record_line(record.id), self._encoder.encode(record)))


class EngineWorker:
    """A BatchJob kept across calls (the model loads at the first line that
    needs it, once). `incarnation` is new each time the worker is built, so
    a driver can tell that a restarted actor lost the lines it held."""

    def __init__(self, config: WorkerConfig,
                 load_llm: Callable[[], Any] | None = None,
                 load_embedder: Callable[[], Any] | None = None):
        self.incarnation = uuid.uuid4().hex
        engine_args = {k: v for k, v in config.engine_args.items() if v is not None}
        if config.cpu_threads:
            _share_cpu_machine(config.cpu_threads)

        def default_llm():
            from engine.entrypoints.llm import LLM

            return LLM(config.model, max_num_seqs=config.max_num_seqs, **engine_args)

        def default_embedder():
            from engine.embedding.embedder import Embedder

            return Embedder.load(config.embedding_model)

        self.job = BatchJob(
            Path(), Path(), load_llm or default_llm, load_embedder or default_embedder,
            model_name=ModelNames.of(config.model, served=config.served_model_name),
            embedding_model_name=ModelNames.of(config.embedding_model,
                                               default=DEFAULT_EMBEDDING_NAME),
            max_in_flight=2 * config.max_num_seqs, progress=False, limits=config.limits)

    def answer(self, chunk: Sequence[tuple[int, bytes]]) -> list[bytes]:
        """The encoded output record of each line of `chunk` (any order)."""
        records = _Records()
        self.job.answer((parse_input_line(n, raw) for n, raw in chunk), records)
        return [record for _, record in records.lines]

    def pump(self, lines: Sequence[tuple[int, bytes]], seconds: float) -> Pumped:
        """Take `lines` (triaged by the driver) into the running batch, run it
        for about `seconds`, and return the records of the lines that
        finished meanwhile."""
        records = _Records()
        self.job.pump((parse_input_line(n, raw) for n, raw in lines), records, seconds)
        return Pumped(self.incarnation, self.job.waiting, records.lines)

    def summary(self) -> dict:
        """Token counts so far (for the driver's summary)."""
        s = self.job.summary
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}


def _share_cpu_machine(cpus: int) -> None:
    """Give the CPU platform `cpus` of the machine's cores (before an engine
    is built on it: the platform is made once per device and shared)."""
    from engine.platform import current_platform

    platform = current_platform()
    if platform.name == "cpu":
        platform.share_machine(cpus)
