"""`conveyor batch --ray`: one batch file answered by a pool of engine actors.

    driver: lines ─► triage (resume skip, duplicates, bad lines ─► error record)
              │ requests, as each actor has room           ▲ records, appended
              ▼                                            │ (the driver owns the file)
    actors:  EngineWorker.pump(lines) ── BatchJob loop ────┘ (serving layer + engine)

The guarantee is the single-process runner's: the output file is the job's
only state and only the driver writes it, one whole line a record, under its
lock. An actor killed mid-job is restarted by Ray and the lines it held are
sent to it again (their records were never written); a killed driver leaves
the records it wrote, and a re-run skips them. Each actor holds about what
its engine runs plus a small queue (actor_pool.py), so the driver's memory
does not grow with the input.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
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
from engine.entrypoints.ray.actor_pool import ActorPool
from engine.entrypoints.ray.cluster import connect
from engine.entrypoints.ray.engine_worker import WorkerConfig
from engine.entrypoints.ray.input_rows import count_rows, read_lines
from engine.errors import ConveyorError


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


def run_ray_batch(input_path: Path, output_path: Path, config: WorkerConfig, *,
                  address: str | None = "auto", workers: int = 2, cpus_per_worker: int = 1,
                  input_format: str = "openai",
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
        # A small job is split evenly, so that every actor gets a share.
        todo = count_rows(input_path, input_format) - out.index.records
        first_fill = min(config.max_num_seqs, -(-todo // workers))
        ray = connect(address)
        connected = time.monotonic()
        pool = ActorPool(ray, config, workers, cpus_per_worker, first_fill)
        try:
            where = pool.where()  # waits for every actor to start
            if progress:
                for i, (host, pid) in enumerate(where):
                    print(f"conveyor: ray worker {i}: pid {pid} on {host}", file=sys.stderr,
                          flush=True)
                print(f"conveyor: ray at {ray.get_runtime_context().gcs_address} ready in "
                      f"{connected - start:.1f} s, {workers} actors started in "
                      f"{time.monotonic() - connected:.1f} s more", file=sys.stderr, flush=True)
            _drive(lines, out, pool, summary)
        except ray.exceptions.RayTaskError as exc:
            # An actor's error, e.g. a model that cannot load: the job's error.
            cause = exc.cause if isinstance(exc.cause, ConveyorError) else exc
            raise ConveyorError(f"an engine actor failed: {cause}; the records so far are "
                                "kept, run again to resume") from None
        except ray.exceptions.RayActorError as exc:
            # Killed more than MAX_ACTOR_RESTARTS times, or its Ray went away.
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConveyorError(f"an engine actor died for good ({exc.__class__.__name__}: "
                                f"{why}); the records so far are kept, run again to "
                                "resume") from None
        finally:
            pool.kill()
            summary.elapsed = time.monotonic() - start
    return summary


def _drive(lines: Iterator[InputLine], out: OutputFile, pool: ActorPool,
           summary: BatchSummary) -> None:
    seen: set[str] = set()
    exhausted = False
    everyone = range(len(pool.actors))
    returned: Iterable[int] = everyone
    while True:
        # Only an actor whose call came back can have room for more; it gets
        # calls until `calls_per_actor` are queued, so that it never waits.
        for i in returned:
            while True:
                batch: list[tuple[int, bytes]] = []
                room = pool.room(i)
                while not exhausted and len(batch) < room:
                    line = next(lines, None)
                    if line is None:
                        exhausted = True
                    elif (request := _admit(line, seen, out, summary)) is not None:
                        batch.append(request)
                if not (batch or pool.wants_call(i)):
                    break
                pool.send(i, batch)
        if not pool.calls:
            if exhausted:
                return
            returned = everyone  # every line pulled was answered here (skipped, refused)
            continue
        returned, records = pool.next_done()
        for record in records:
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
