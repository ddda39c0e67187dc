"""The OpenAI Batch file format (also vLLM's `run-batch`), read lazily and
written crash-safely.

Input, one JSON object a line:
    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output, one JSON object a line, in any order:
    {"id": "batch_req_…", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "…", "body": {...}}, "error": null}
A request the API refuses has status_code 400 and an OpenAI error body, plus
`error` {"code", "message"}; a line that is not a request at all has
`response` null.

Resuming: the output file is the job's only state. `OutputFile.open` drops a
torn last line (anything after the last newline: a write cut by a kill), then
indexes what is already answered; each new record is one `write` of a whole
line on an O_APPEND descriptor, so a kill leaves at most one torn line.
One runner at a time: the open file is locked (flock), so a second run on
the same output refuses instead of answering every line a second time; the
lock goes with the process, kill -9 included.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import msgspec

from engine.entrypoints.input_file import open_input
from engine.entrypoints.serving.limits import DEFAULT_MAX_BODY_BYTES
from engine.errors import ConveyorError

# Error codes of the records this runner writes (OpenAI's style: snake_case).
INVALID_JSON = "invalid_json"
INVALID_LINE = "invalid_batch_line"
DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
INVALID_REQUEST = "invalid_request"
SERVER_ERROR = "server_error"
LINE_TOO_LONG = "line_too_long"

# What a line may hold besides its body (custom_id, url, method, JSON syntax).
LINE_ENVELOPE_BYTES = 64 << 10


class BatchRequestLine(msgspec.Struct, kw_only=True):
    """One input line. `body` stays raw JSON: the serving layer decodes it
    exactly as the HTTP server decodes a request body."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class BatchResponse(msgspec.Struct, kw_only=True):
    status_code: int
    request_id: str | None = None
    body: Any = None


class BatchError(msgspec.Struct, kw_only=True):
    code: str | None = None
    message: str | None = None


class BatchOutputLine(msgspec.Struct, kw_only=True):
    """One output line. `error` may be a plain string: vLLM writes one."""

    id: str
    custom_id: str | None
    response: BatchResponse | None = None
    error: BatchError | str | None = None


@dataclass
class InputLine:
    """An input line as read: a request, or why it is not one (with the
    custom_id when one could still be found, to put on the error record)."""

    line: int                                # 1-based
    request: BatchRequestLine | None = None
    custom_id: str | None = None
    error: str | None = None
    code: str | None = None

    @property
    def record_id(self) -> str:
        """The output record's id: the line number keeps it stable across
        re-runs, which is how lines with no usable custom_id are resumed."""
        return f"batch_req_{self.line}"


def record_line(record_id: str) -> int:
    """The input line number of a record id made by `InputLine.record_id`."""
    return int(record_id.removeprefix("batch_req_"))


class _Probe(msgspec.Struct):
    custom_id: Any = None


_PROBE = msgspec.json.Decoder(_Probe)
_LINE = msgspec.json.Decoder(BatchRequestLine)


def parse_input_line(line: int, raw: bytes) -> InputLine:
    """Decode one input line; never raises."""
    try:
        probe = _PROBE.decode(raw)
    except msgspec.DecodeError as exc:
        return InputLine(line, error=f"line {line}: invalid JSON: {exc}", code=INVALID_JSON)
    except msgspec.ValidationError as exc:
        return InputLine(line, error=f"line {line}: expected a JSON object ({exc})",
                         code=INVALID_LINE)
    custom_id = probe.custom_id
    if not isinstance(custom_id, str) or not custom_id:
        return InputLine(line, error=f"line {line}: \"custom_id\" must be a non-empty string",
                         code=INVALID_LINE)
    try:
        request = _LINE.decode(raw)
    except msgspec.ValidationError as exc:
        return InputLine(line, custom_id=custom_id, error=f"line {line}: {exc}",
                         code=INVALID_LINE)
    if request.method.upper() != "POST":
        return InputLine(line, custom_id=custom_id, code=INVALID_LINE,
                         error=f"line {line}: method must be POST, not {request.method!r}")
    return InputLine(line, request=request, custom_id=custom_id)


def read_input(path: Path, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Iterator[InputLine]:
    """The input's lines one at a time (never the whole file in memory, nor a
    line much longer than `max_body_bytes`: the rest of such a line is
    skipped and the line answered with an error). Blank lines are skipped."""
    limit = max_body_bytes + LINE_ENVELOPE_BYTES
    with open_input(path) as f:
        n = 0
        while raw := f.readline(limit + 1):
            n += 1
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            if len(raw) > limit and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield InputLine(n, code=LINE_TOO_LONG, error=f"line {n} is longer than "
                                f"{limit} bytes (the body limit is {max_body_bytes} bytes)")
            elif raw.strip():
                yield parse_input_line(n, raw)


def count_lines(path: Path, chunk: int = 1 << 20) -> int:
    """Non-blank-or-not lines of a file, counted in 1 MiB chunks (for the
    progress bar's total; ~0.1 s for 100 MB)."""
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(chunk):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


@dataclass
class ResumeIndex:
    """What an output file already answers: custom_ids, and (for records of
    lines without a usable or unique custom_id) record ids."""

    custom_ids: set[str] = field(default_factory=set)
    record_ids: set[str] = field(default_factory=set)
    records: int = 0

    def add(self, record: _DoneRecord) -> None:
        self.records += 1
        code = record.error.get("code") if isinstance(record.error, dict) else None
        if record.custom_id is None or code == DUPLICATE_CUSTOM_ID:
            if record.id is not None:
                self.record_ids.add(record.id)
        else:
            self.custom_ids.add(record.custom_id)


# triage's verdicts on an input line.
SKIP = "skip"            # an earlier run answered it
DUPLICATE = "duplicate"  # its custom_id appears earlier in the input
ANSWER = "answer"        # to be answered now (a request, or an error record)


def triage(line: InputLine, seen: set[str], index: ResumeIndex) -> str:
    """What to do with `line` given the custom_ids seen earlier in this run
    (updated) and what the output already answers."""
    if line.custom_id is not None and line.custom_id in seen:
        return SKIP if line.record_id in index.record_ids else DUPLICATE
    if line.custom_id is None:
        return SKIP if line.record_id in index.record_ids else ANSWER
    seen.add(line.custom_id)
    return SKIP if line.custom_id in index.custom_ids else ANSWER


class _DoneRecord(msgspec.Struct):
    # Only what resuming needs: msgspec skips the (large) response body.
    id: str | None = None
    custom_id: str | None = None
    error: Any = None


class OutputFile:
    """The results file, opened for appending whole lines."""

    def __init__(self, path: Path, fd: int, index: ResumeIndex, repaired_bytes: int,
                 fsync_interval: float = 1.0):
        self.path = path
        self.index = index
        self.repaired_bytes = repaired_bytes    # length of the torn line dropped
        self._fd = fd
        self._encoder = msgspec.json.Encoder()
        self._fsync_interval = fsync_interval
        self._last_sync = time.monotonic()

    @classmethod
    def open(cls, path: Path) -> OutputFile:
        """Open (or create) `path`, drop a torn last line, index its records."""
        if path.is_dir():
            raise ConveyorError(f"output is a directory, not a file: {path}")
        if not path.parent.is_dir():
            raise ConveyorError(f"output directory does not exist: {path.parent}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ConveyorError(f"cannot open {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConveyorError(f"another `conveyor batch` is writing {path}; let it finish "
                                "(or stop it), then run again to resume") from None
        try:
            repaired = _drop_torn_tail(fd)
            index = _index_records(path)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, index, repaired)

    def write(self, record: BatchOutputLine) -> None:
        """Append one record as one write of a whole line (flushed to the OS
        at once, so a killed process loses nothing it reported written)."""
        self.write_encoded(self._encoder.encode(record))

    def write_encoded(self, record: bytes) -> None:
        """`write` for a record already encoded (one JSON object, no newline),
        e.g. by an engine actor on another machine."""
        data = record + b"\n"
        view = memoryview(data)
        while view:  # a regular file takes it in one go; loop for the odd short write
            view = view[os.write(self._fd, view):]
        now = time.monotonic()
        if now - self._last_sync >= self._fsync_interval:
            os.fsync(self._fd)  # bounds what a power cut (not a kill) can lose
            self._last_sync = now

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(fd: int, chunk: int = 1 << 16) -> int:
    """Truncate everything after the file's last newline; return its length."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    else:
        keep = 0
    if keep < size:
        os.ftruncate(fd, keep)
    return size - keep


def _index_records(path: Path) -> ResumeIndex:
    index = ResumeIndex()
    decoder = msgspec.json.Decoder(_DoneRecord)
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                index.add(decoder.decode(raw))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # Not a torn write (those were dropped): a foreign or damaged
                # file, which appending to could only make worse.
                raise ConveyorError(f"{path}:{n} is not a batch result line ({exc}); "
                                    "fix or remove it, or choose another output file") from None
    return index


def error_record(line: InputLine, message: str, code: str, *,
                 status_code: int | None = None, request_id: str | None = None,
                 body: Any = None) -> BatchOutputLine:
    """The record of a line that got no answer. With status_code, the request
    reached the API (OpenAI's shape: a response holding an error body)."""
    response = None
    if status_code is not None:
        response = BatchResponse(status_code=status_code, request_id=request_id, body=body)
    return BatchOutputLine(id=line.record_id, custom_id=line.custom_id, response=response,
                           error=BatchError(code=code, message=message))


def success_record(line: InputLine, body: Any, request_id: str) -> BatchOutputLine:
    return BatchOutputLine(id=line.record_id, custom_id=line.custom_id,
                           response=BatchResponse(status_code=200, request_id=request_id,
                                                  body=body))
