"""Queue jobs: a stream entry read as a job, and a job's end (its result,
or a failure to retry) written back as a batch output line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from engine.entrypoints.batch.batch_file import (
    INVALID_REQUEST,
    SERVER_ERROR,
    BatchError,
    BatchOutputLine,
    BatchResponse,
)
from engine.entrypoints.serving.errors import ServingError, bad_request


class Job(msgspec.Struct):
    """One stream entry, read."""

    entry_id: str             # the entry's id in the jobs stream
    job_id: str               # the producer's id (the entry id when it gave none)
    url: str
    body: bytes               # the JSON body as sent (decoded by the serving layer)
    fields: dict[str, str]    # every field as sent, for the dead-letter stream
    attempts: int = 1         # deliveries so far, this one included


class UnreadableJob(Exception):
    """An entry that is no job (no url or body, a field not UTF-8): answered
    with `error` at once, never retried (it would fail the same way)."""

    def __init__(self, job: Job, error: ServingError):
        super().__init__(error.message)
        self.job, self.error = job, error


def decode_job(entry_id: str, raw: dict[bytes, bytes], attempts: int = 1) -> Job:
    """A Job from a stream entry's fields; UnreadableJob if it is not one."""
    fields = text_fields(raw)
    # "custom_id" as in a batch file's lines, or plain "id".
    job_id = fields.get("custom_id") or fields.get("id") or entry_id
    job = Job(entry_id, job_id, fields.get("url", ""), fields.get("body", "").encode(),
              fields, attempts)
    for key, value in raw.items():
        try:
            key.decode(), value.decode()
        except UnicodeDecodeError:
            raise UnreadableJob(job, bad_request(f"field {_text_or_repr(key)} is not UTF-8")
                                ) from None
    if not job.url:
        raise UnreadableJob(job, bad_request("the job has no url field", "url"))
    if "body" not in fields:
        raise UnreadableJob(job, bad_request("the job has no body field", "body"))
    return job


@dataclass
class Outcome:
    """A job's end: a response body (status 200), a refusal (the API's error
    answer), or a failure (`error`) to retry and, at the last attempt,
    dead-letter."""

    job: Job
    body: Any = None
    refusal: ServingError | None = None
    error: str | None = None

    @property
    def status_code(self) -> int:
        return self.refusal.status if self.refusal is not None else 200


def result_record(outcome: Outcome) -> BatchOutputLine:
    """A job's result as a batch output line (batch_file's format): custom_id
    is the job id, request_id the job's entry in the stream."""
    job, refusal = outcome.job, outcome.refusal
    error = body = None
    if refusal is not None:
        default = SERVER_ERROR if refusal.status >= 500 else INVALID_REQUEST
        error = BatchError(code=refusal.code or default, message=refusal.message)
        body = refusal.body()
    else:
        body = outcome.body
    return BatchOutputLine(
        id=f"queue_req_{job.entry_id}", custom_id=job.job_id, error=error,
        response=BatchResponse(status_code=outcome.status_code, request_id=job.entry_id,
                               body=body))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def text_fields(raw: dict) -> dict[str, str]:
    """An entry's fields as text; what is not UTF-8 kept as its repr."""
    return {_text_or_repr(k): _text_or_repr(v) for k, v in raw.items()}


def _text_or_repr(value: Any) -> str:
    try:
        return text(value)
    except UnicodeDecodeError:
        return repr(value)
