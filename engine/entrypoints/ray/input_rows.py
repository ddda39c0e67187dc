"""Batch inputs besides OpenAI Batch JSONL: datasets with a prompt column
(JSONL or Parquet), each row made the batch line of a /v1/completions request
so that it is answered, and resumed, exactly like one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import (
    INVALID_JSON,
    INVALID_LINE,
    BatchRequestLine,
    InputLine,
    count_lines,
    read_input,
)
from engine.entrypoints.input_file import open_input
from engine.entrypoints.serving.protocol import COMPLETIONS_URL
from engine.errors import ConveyorError

INPUT_FORMATS = ("openai", "jsonl", "parquet")
ID_COLUMN = "custom_id"


def prompt_line(n: int, row: dict[str, Any], prompt_column: str,
                sampling: dict[str, Any]) -> InputLine:
    """Row `n` (1-based) as a batch line: its `custom_id` column, else
    "row-N"; its prompt with the sampling fields as a completions body."""
    custom_id = row.get(ID_COLUMN)
    custom_id = str(custom_id) if custom_id not in (None, "") else f"row-{n}"
    prompt = row.get(prompt_column)
    if not isinstance(prompt, str):
        return InputLine(n, custom_id=custom_id, code=INVALID_LINE,
                         error=f"row {n}: column {prompt_column!r} must hold a string")
    body = msgspec.json.encode({**sampling, "prompt": prompt})
    request = BatchRequestLine(custom_id=custom_id, method="POST", url=COMPLETIONS_URL,
                               body=msgspec.Raw(body))
    return InputLine(n, request=request, custom_id=custom_id)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    with open_input(path) as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = msgspec.json.decode(raw)
            except msgspec.DecodeError as exc:
                yield n, None, f"row {n}: invalid JSON: {exc}"
                continue
            yield (n, row, None) if isinstance(row, dict) else (
                n, None, f"row {n}: expected a JSON object")


def _parquet_rows(path: Path, prompt_column: str) -> Iterator[tuple[int, dict, None]]:
    """Checks the file at once (not at the first row), then streams its rows."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's errors have no common base
        raise ConveyorError(f"{path} is not a Parquet file: {exc}") from None
    names = table.schema_arrow.names
    if prompt_column not in names:
        raise ConveyorError(f"{path} has no column {prompt_column!r} (it has "
                            f"{', '.join(names)}); choose one with --prompt-column")
    columns = [prompt_column] + ([ID_COLUMN] if ID_COLUMN in names else [])
    return _stream_parquet(table, columns)


def _stream_parquet(table, columns: list[str]) -> Iterator[tuple[int, dict, None]]:
    n = 0
    for batch in table.iter_batches(batch_size=1024, columns=columns):  # streamed
        for row in batch.to_pylist():
            n += 1
            yield n, row, None


def read_lines(path: Path, input_format: str, prompt_column: str, sampling: dict[str, Any],
               max_body_bytes: int) -> Iterator[InputLine]:
    """The input as batch lines, lazily, whatever its format."""
    if input_format == "openai":
        return read_input(path, max_body_bytes)
    if input_format not in INPUT_FORMATS:
        raise ConveyorError(f"unknown input format {input_format!r} (one of "
                            f"{', '.join(INPUT_FORMATS)})")
    rows = _jsonl_rows(path) if input_format == "jsonl" else _parquet_rows(path, prompt_column)
    return (prompt_line(n, row, prompt_column, sampling) if row is not None
            else InputLine(n, code=INVALID_JSON, error=error) for n, row, error in rows)


def count_rows(path: Path, input_format: str) -> int:
    """About how many lines (rows) the input has: blank lines count too."""
    if input_format != "parquet":
        return count_lines(path)
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # not Parquet: read_lines says so
        return 0
