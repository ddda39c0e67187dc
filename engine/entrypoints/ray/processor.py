"""Ray Data: a dataset of prompts (or OpenAI Batch rows) mapped to one with
outputs, through an actor pool of Conveyor engines.

    processor = build_processor("HuggingFaceTB/SmolLM2-135M-Instruct",
                                {"max_tokens": 64, "temperature": 0}, concurrency=4)
    out = processor(ray.data.read_parquet("prompts.parquet"))   # lazy, streamed
    out.write_parquet("answers/")

Each row goes through the serving layer as a /v1/completions body (prompt
rows) or as its own batch line (rows with `custom_id`, `url` and `body`),
so it gets the answer, or the error, the HTTP server would give. Ray Data
streams blocks through the pool, so memory stays flat on any input size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import BatchRequestLine, InputLine
from engine.entrypoints.ray.cluster import actor_resources, import_ray
from engine.entrypoints.ray.engine_worker import EngineWorker, WorkerConfig
from engine.entrypoints.ray.input_rows import prompt_line

# Columns added to prompt rows.
OUTPUT_COLUMNS = ("generated_text", "finish_reason", "num_generated_tokens", "error")
# OpenAI Batch rows get the output record as JSON in this column.
RECORD_COLUMN = "record"


class _Record(msgspec.Struct):
    id: str
    response: Any = None
    error: Any = None


class DatasetWorker:
    """The map_batches callable: one engine, built when Ray starts the actor."""

    def __init__(self, config: WorkerConfig, sampling: dict[str, Any], prompt_column: str):
        self.worker = EngineWorker(config)
        self.sampling, self.prompt_column = sampling, prompt_column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        columns = {k: list(v) for k, v in batch.items()}
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(),
                                                                           strict=True)]
        openai_rows = "body" in columns and "url" in columns
        lines = [self._line(n, row, openai_rows) for n, row in enumerate(rows, start=1)]
        chunk = [(x.line, msgspec.json.encode(x.request)) for x in lines if x.request]
        records = {r.id: (r, raw) for raw in self.worker.answer(chunk)
                   for r in [msgspec.json.decode(raw, type=_Record)]}
        out = dict(batch)
        if openai_rows:
            out[RECORD_COLUMN] = [
                records[x.record_id][1].decode() if x.request else
                msgspec.json.encode({"id": x.record_id, "custom_id": x.custom_id,
                                     "response": None, "error": {"code": x.code,
                                                                 "message": x.error}}).decode()
                for x in lines]
            return out
        values = [_prompt_result(records.get(x.record_id, (None,))[0], x) for x in lines]
        for i, name in enumerate(OUTPUT_COLUMNS):
            out[name] = [v[i] for v in values]
        return out

    def _line(self, n: int, row: dict, openai_rows: bool) -> InputLine:
        if not openai_rows:
            return prompt_line(n, row, self.prompt_column, self.sampling)
        body = row["body"]
        raw = body.encode() if isinstance(body, str) else msgspec.json.encode(body)
        request = BatchRequestLine(custom_id=str(row.get("custom_id") or f"row-{n}"),
                                   method=str(row.get("method") or "POST"), url=str(row["url"]),
                                   body=msgspec.Raw(raw))
        return InputLine(n, request=request, custom_id=request.custom_id)


def _prompt_result(record: _Record | None, line: InputLine) -> tuple:
    """(text, finish_reason, tokens, error) of a prompt row."""
    if record is None:
        return None, None, 0, line.error
    if record.error is not None:
        message = record.error.get("message") if isinstance(record.error, dict) else record.error
        return None, None, 0, message
    body = record.response["body"]
    choice = body["choices"][0]
    return choice["text"], choice["finish_reason"], body["usage"]["completion_tokens"], None


def build_processor(model: str | None = None, sampling_params: dict[str, Any] | None = None, *,
                    concurrency: int = 1, batch_size: int = 64, cpus_per_worker: int = 1,
                    prompt_column: str = "prompt", engine_args: dict[str, Any] | None = None,
                    max_num_seqs: int = 256,
                    served_model_name: str | None = None) -> Callable[[Any], Any]:
    """A function from a `ray.data.Dataset` to the dataset with outputs.

    Prompt rows (column `prompt_column`) gain `generated_text`,
    `finish_reason`, `num_generated_tokens` and `error`; OpenAI Batch rows
    (`custom_id`, `url`, `body` as a dict or JSON text) gain `record`, the
    JSON output line `conveyor batch` would write. `sampling_params` are
    completions-API fields (max_tokens, temperature, top_p, seed, ...).
    `concurrency` engine actors run, each on a GPU or `cpus_per_worker` CPUs.
    """
    import_ray()
    config = WorkerConfig(model=model, served_model_name=served_model_name,
                          max_num_seqs=max_num_seqs, engine_args=engine_args or {},
                          cpu_threads=cpus_per_worker)
    resources = actor_resources(cpus_per_worker)

    def process(dataset):
        return dataset.map_batches(
            DatasetWorker, fn_constructor_kwargs={"config": config,
                                                  "sampling": dict(sampling_params or {}),
                                                  "prompt_column": prompt_column},
            concurrency=concurrency, batch_size=batch_size, batch_format="numpy",
            **resources)

    return process
