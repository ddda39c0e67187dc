"""`conveyor batch --ray`: one batch file answered by a pool of engine actors.

    driver: lines ─► triage (resume skip, duplicates, bad lines ─► error record)
              │ requests, in chunks                        ▲ records, appended
              ▼                                            │ (the driver owns the file)
    actors:  EngineWorker.answer(chunk) ── BatchJob loop ──┘ (serving layer + engine)

The guarantee is the single-process runner's: the output file is the job's
only state and only the driver writes it, one whole line a record, under its
lock. An actor killed mid-chunk is restarted by Ray and the chunk run again
(its records were never written); a killed driver leaves the records it
wrote, and a re-run skips them. At most `chunks_per_worker` chunks wait per
actor, so the driver's memory does not grow with the input.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import (
    ANSWER,
    DUPLICATE,
    DUPLICATE_CUSTOM_ID,
    SKIP,
    InputLine,
    OutputFile,
    error_record,
    triage,
)
from engine.entrypoints.batch.batch_job import BatchSummary
from engine.entrypoints.ray.cluster import actor_resources, connect
from engine.entrypoints.ray.engine_worker import EngineWorker, WorkerConfig
from engine.entrypoints.ray.input_rows import count_rows, read_lines
from engine.errors import ConveyorError

# An actor restarted more often than this is failing on its input, not being
# killed: the job stops (a re-run resumes it).
MAX_ACTOR_RESTARTS = 4


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = 0


class _Body(msgspec.Struct):
    usage: _Usage | None = None


class _Response(msgspec.Struct):
    body: _Body | None = None


class _Tally(msgspec.Struct):
    # Only what the summary needs of a record (msgspec skips the rest).
    error: Any = None
    response: _Response | None = None


_TALLY = msgspec.json.Decoder(_Tally)


class _ActorPool:
    """The engine actors, each fed up to `depth` chunks at once."""

    def __init__(self, ray, config: WorkerConfig, workers: int, cpus_per_worker: int,
                 depth: int):
        remote = ray.remote(max_restarts=MAX_ACTOR_RESTARTS,
                            max_task_retries=MAX_ACTOR_RESTARTS)(_RayWorker)
        options = actor_resources(cpus_per_worker)
        self.ray = ray
        self.actors = [remote.options(**options).remote(config) for _ in range(workers)]
        self.depth = depth
        self.pending: dict[Any, int] = {}   # object ref -> actor index
        self._load = [0] * workers

    def where(self) -> list[tuple[str, int]]:
        """(host, pid) of each actor, once each has started."""
        return self.ray.get([a.where.remote() for a in self.actors])

    def has_room(self) -> bool:
        return min(self._load) < self.depth

    def submit(self, chunk: list[tuple[int, bytes]]) -> None:
        i = self._load.index(min(self._load))
        self.pending[self.actors[i].answer.remote(chunk)] = i
        self._load[i] += 1

    def next_done(self) -> list[bytes]:
        """The records of the next chunk to finish."""
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        ref = ready[0]
        self._load[self.pending.pop(ref)] -= 1
        return self.ray.get(ref)


class _RayWorker(EngineWorker):
    def where(self) -> tuple[str, int]:
        import os

        return socket.gethostname(), os.getpid()


def run_ray_batch(input_path: Path, output_path: Path, config: WorkerConfig, *,
                  address: str | None = "auto", workers: int = 2, cpus_per_worker: int = 1,
                  chunk_lines: int | None = None, input_format: str = "openai",
                  prompt_column: str = "prompt", sampling: dict | None = None,
                  progress: bool = True) -> BatchSummary:
    """Answer `input_path` into `output_path` on a Ray cluster (see the
    module docstring); raises ConveyorError when the job cannot run."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise ConveyorError(f"input file not found: {input_path}" if not input_path.exists()
                            else f"input is not a file: {input_path}")
    if output_path.exists() and output_path.samefile(input_path):
        raise ConveyorError("the output file must not be the input file")
    if workers < 1:
        raise ConveyorError("--ray-workers must be at least 1")
    config = msgspec.structs.replace(config, cpu_threads=cpus_per_worker)
    lines = read_lines(input_path, input_format, prompt_column, sampling or {},
                       config.limits.max_body_bytes)
    summary = BatchSummary()
    start = time.monotonic()
    with OutputFile.open(output_path) as out:
        summary.repaired_bytes = out.repaired_bytes
        if chunk_lines is None:
            todo = count_rows(input_path, input_format) - out.index.records
            chunk_lines = _chunk_lines(todo, workers, config.max_num_seqs)
        ray = connect(address)
        pool = _ActorPool(ray, config, workers, cpus_per_worker, depth=2)
        where = pool.where()  # waits for every actor to start
        if progress:
            for i, (host, pid) in enumerate(where):
                print(f"conveyor: ray worker {i}: pid {pid} on {host}", file=sys.stderr,
                      flush=True)
            print(f"conveyor: ray and {workers} actors started in "
                  f"{time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        try:
            _drive(lines, out, pool, chunk_lines, summary)
        except ray.exceptions.RayTaskError as exc:
            # An actor's error, e.g. a model that cannot load: the job's error.
            cause = exc.cause if isinstance(exc.cause, ConveyorError) else exc
            raise ConveyorError(f"an engine actor failed: {cause}; the records so far are "
                                "kept, run again to resume") from None
        except ray.exceptions.RayActorError as exc:
            raise ConveyorError(f"an engine actor died more than {MAX_ACTOR_RESTARTS} times "
                                f"({exc.__class__.__name__}); run again to resume") from None
        finally:
            for actor in pool.actors:
                ray.kill(actor)
            summary.elapsed = time.monotonic() - start
    return summary


def _chunk_lines(todo: int, workers: int, max_num_seqs: int) -> int:
    """Lines a chunk: large chunks keep each engine's batch full (a chunk's
    tail runs at a falling batch size), but a small job is split evenly so
    that every actor gets a share."""
    return max(1, min(4 * max_num_seqs, -(-todo // workers)))


def _drive(lines: Iterator[InputLine], out: OutputFile, pool: _ActorPool, chunk_lines: int,
           summary: BatchSummary) -> None:
    seen: set[str] = set()
    chunk: list[tuple[int, bytes]] = []
    exhausted = False
    while True:
        while not exhausted and pool.has_room():
            line = next(lines, None)
            if line is None:
                exhausted = True
            elif (request := _admit(line, seen, out, summary)) is not None:
                chunk.append(request)
                if len(chunk) < chunk_lines:
                    continue
            if chunk and (exhausted or len(chunk) >= chunk_lines):
                pool.submit(chunk)
                chunk = []
        if not pool.pending:
            return
        for record in pool.next_done():
            out.write_encoded(record)
            _count(record, summary)


def _admit(line: InputLine, seen: set[str], out: OutputFile,
           summary: BatchSummary) -> tuple[int, bytes] | None:
    """The line to send to an actor, or None when it was handled here."""
    verdict = triage(line, seen, out.index)
    if verdict is SKIP:
        summary.skipped += 1
    elif verdict is DUPLICATE:
        out.write(error_record(line, f"line {line.line}: custom_id {line.custom_id!r} "
                               "appears earlier in the input", DUPLICATE_CUSTOM_ID))
        summary.failed += 1
    elif line.request is None:
        out.write(error_record(line, line.error, line.code))
        summary.failed += 1
    else:
        assert verdict is ANSWER
        return line.line, msgspec.json.encode(line.request)
    return None


def _count(record: bytes, summary: BatchSummary) -> None:
    tally = _TALLY.decode(record)
    if tally.error is not None:
        summary.failed += 1
        return
    summary.done += 1
    body = tally.response.body if tally.response is not None else None
    if body is not None and body.usage is not None:
        summary.prompt_tokens += body.usage.prompt_tokens
        summary.completion_tokens += body.usage.completion_tokens or 0
