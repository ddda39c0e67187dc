"""Queue worker: jobs from a Redis stream through the engine, results back.

Redis layout (names from the command line):

    <stream>          jobs; each entry has fields id (or custom_id), url and
                      body: a batch-file line's fields, body the JSON object
                      that url takes over HTTP
    <group>           the consumer group on <stream>; each worker is a consumer
    <results>         stream of results: fields id (the job's) and result, a
                      batch output line (engine.entrypoints.batch.batch_file) as JSON
    <results>:by-id   hash, job id -> result JSON: the one result of each job
    <stream>:dead     dead letters: the job's own fields plus error, attempts,
                      entry (its id in <stream>) and consumer

A result is written by one Lua script that HSETNXes it into the hash, XADDs it
to the results stream only if that won, and XACKs the entry: a re-delivered or
re-submitted job never gets a second result, and nothing is acked without its
result. Entries a dead consumer left pending are taken over with XAUTOCLAIM
once idle for `claim_idle_ms`; an entry delivered more than `max_attempts`
times, or failing on its last attempt, goes to the dead-letter stream instead.

A job the API would answer with an error (a bad field, a prompt too long) gets
that error as its result (status_code 400). A job that cannot be read at all
(no url or body, a body that is not a JSON object, an unknown url) or whose
run fails (an engine error) is not acked, so it is retried: it is malformed or
unlucky, and the dead-letter stream is where a person looks at it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from engine.entrypoints.batch.batch_file import (
    INVALID_REQUEST,
    BatchError,
    BatchOutputLine,
    BatchResponse,
)
from engine.entrypoints.openai.protocol import (
    CHAT_COMPLETIONS_URL,
    COMPLETIONS_URL,
    EMBEDDINGS_URL,
    REQUEST_TYPES,
    ChatCompletionRequest,
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

log = logging.getLogger("conveyor.worker")


# -- jobs and results ------------------------------------------------------------

class Job(msgspec.Struct):
    """One stream entry, read and decoded."""

    entry_id: str             # the entry's id in the jobs stream
    job_id: str               # the producer's id (the entry id when it gave none)
    url: str
    body: dict                # the JSON body, decoded
    fields: dict[str, str]    # every field as sent, for the dead-letter stream
    attempts: int = 1         # deliveries so far, this one included


@dataclass
class Outcome:
    """A job's end: a response (`body`), or a failure (`error`) to retry."""

    job: Job
    status_code: int = 200
    body: Any = None
    error: str | None = None     # the run failed: retry, or dead-letter
    refusal: str | None = None   # the API's answer was an error (status_code 400)


class MalformedJob(Exception):
    """The entry cannot be read as a job (retried, then dead-lettered)."""


def decode_job(entry_id: str, raw: dict[bytes, bytes], attempts: int = 1) -> Job:
    """A Job from a stream entry's fields; MalformedJob if it is not one."""
    fields = {}
    for key, value in raw.items():
        try:
            fields[key.decode()] = value.decode()
        except UnicodeDecodeError:
            raise MalformedJob(f"field {key!r} is not UTF-8") from None
    # "custom_id" as in a batch file's lines, or plain "id".
    job_id = fields.get("custom_id") or fields.get("id") or entry_id
    url = fields.get("url")
    if not url:
        raise MalformedJob("the job has no url field")
    if url not in REQUEST_TYPES:
        raise MalformedJob(f"unsupported url {url!r}; expected one of {', '.join(REQUEST_TYPES)}")
    if "body" not in fields:
        raise MalformedJob("the job has no body field")
    try:
        body = msgspec.json.decode(fields["body"])
    except msgspec.DecodeError as exc:
        raise MalformedJob(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MalformedJob(f"body is a JSON {type(body).__name__}, not an object")
    return Job(entry_id, job_id, url, body, fields, attempts)


# -- handlers: one per kind of job -----------------------------------------------

class JobHandler(Protocol):
    """Runs jobs of some urls. `admit` takes a job (or answers it at once with
    a 400), `work` advances admitted jobs and returns those that ended."""

    urls: tuple[str, ...]

    def room(self) -> int: ...
    def admit(self, job: Job) -> Outcome | None: ...
    def work(self) -> list[Outcome]: ...
    def in_flight(self) -> list[Job]: ...


def _refused(job: Job, exc: Exception) -> Outcome:
    body = error_response(str(exc), code=INVALID_REQUEST)
    return Outcome(job, 400, msgspec.to_builtins(body), refusal=str(exc))


def result_record(outcome: Outcome) -> BatchOutputLine:
    """A job's result as a batch output line (engine.entrypoints.batch.batch_file's format):
    custom_id is the job id, request_id the job's entry in the stream."""
    job = outcome.job
    error = (BatchError(code=INVALID_REQUEST, message=outcome.refusal)
             if outcome.refusal is not None else None)
    return BatchOutputLine(
        id=f"queue_req_{job.entry_id}", custom_id=job.job_id, error=error,
        response=BatchResponse(status_code=outcome.status_code, request_id=job.entry_id,
                               body=outcome.body))


class EmbeddingJobs:
    """/v1/embeddings jobs: all texts admitted since the last `work` go
    through one `embed` call, which batches them under the model's token budget.

    `embed(texts)` returns an object with `.vectors` (n, dim) and
    `.num_tokens` (list), like Embedder.embed; tests may pass any such callable.
    """

    urls = (EMBEDDINGS_URL,)

    def __init__(self, embed: Callable[[list[str]], Any], *, model: str,
                 token_budget: int = 16384, max_jobs: int = 512):
        self.embed = embed
        self.model = model
        self.token_budget = token_budget
        self.max_jobs = max_jobs
        self._tokens_per_job = 32.0  # running estimate, refined from each batch
        self._admitted: list[tuple[Job, Any, list[str]]] = []

    @classmethod
    def from_embedder(cls, embedder: Any) -> EmbeddingJobs:
        """Sized to one wave of `embedder`'s batches (rows and padded tokens)."""
        streams = max(1, getattr(embedder, "num_streams", 1))
        return cls(embedder.embed, model=embedder.name or "embedding",
                   token_budget=embedder.batch_tokens * streams,
                   max_jobs=embedder.max_batch_size * streams)

    def room(self) -> int:
        # Texts are not tokenized before they are read, so the read size comes
        # from the tokens per job seen so far (a job may carry many texts).
        fits = int(self.token_budget // max(self._tokens_per_job, 1.0))
        return max(1, min(self.max_jobs, fits)) - len(self._admitted)

    def admit(self, job: Job) -> Outcome | None:
        try:
            request = parse_request(job.url, job.body)
            texts = embedding_texts(request)
        except RequestError as exc:
            return _refused(job, exc)
        self._admitted.append((job, request, texts))
        return None

    def in_flight(self) -> list[Job]:
        return [job for job, _, _ in self._admitted]

    def work(self) -> list[Outcome]:
        admitted = self._admitted
        if not admitted:
            return []
        try:  # the jobs count as in flight until their batch has run
            texts = [t for _, _, ts in admitted for t in ts]
            try:
                result = self.embed(texts)
            except Exception:  # noqa: BLE001 - find the job at fault by running each alone
                return [self._run_alone(job, request, ts) for job, request, ts in admitted]
        finally:
            self._admitted = []
        out, start = [], 0
        for job, request, ts in admitted:
            end = start + len(ts)
            out.append(self._respond(job, request, result.vectors[start:end],
                                     result.num_tokens[start:end]))
            start = end
        seen = sum(result.num_tokens) / len(admitted)
        self._tokens_per_job = 0.5 * self._tokens_per_job + 0.5 * seen
        return out

    def _run_alone(self, job: Job, request: Any, texts: list[str]) -> Outcome:
        try:
            result = self.embed(texts)
        except RequestError as exc:
            return _refused(job, exc)
        except Exception as exc:  # noqa: BLE001 - the job fails; it will be retried
            return Outcome(job, error=f"{type(exc).__name__}: {exc}")
        return self._respond(job, request, result.vectors, result.num_tokens)

    def _respond(self, job: Job, request: Any, vectors: Any, num_tokens: Sequence[int],
                 ) -> Outcome:
        try:
            body = embedding_response(request, vectors, num_tokens,
                                      model=request.model or self.model)
        except RequestError as exc:
            return _refused(job, exc)
        return Outcome(job, 200, msgspec.to_builtins(body))


class GenerationJobs:
    """/v1/completions and /v1/chat/completions jobs on a continuous-batching
    engine: jobs join the running batch as sequence slots free up.

    `engine` is an LLMEngine, or a callable returning one (loaded on the first
    generation job, so a worker fed only embeddings never loads it)."""

    urls = (COMPLETIONS_URL, CHAT_COMPLETIONS_URL)

    def __init__(self, engine: Any, *, model: str):
        self._engine = engine if not callable(engine) else None
        self._load = engine if callable(engine) else None
        self.model = model
        # job entry id -> (job, request, engine request ids in choice order)
        self._jobs: dict[str, tuple[Job, Any, list[str]]] = {}
        self._owner: dict[str, str] = {}  # engine request id -> job entry id
        self._done: dict[str, Any] = {}   # finished engine request id -> its output
        self._ids = 0

    @property
    def engine(self) -> Any:
        if self._engine is None:
            log.info("loading the generation model")
            self._engine = self._load()
        return self._engine

    def room(self) -> int:
        if self._engine is None:
            return 256
        # Several choices of one job each take a slot; at least one per job.
        return self._engine.args.max_num_seqs - len(self._owner)

    def in_flight(self) -> list[Job]:
        return [job for job, _, _ in self._jobs.values()]

    def admit(self, job: Job) -> Outcome | None:
        engine = self.engine
        ids: list[str] = []
        try:
            request = parse_request(job.url, job.body)
            if isinstance(request, ChatCompletionRequest):
                inputs = chat_inputs(request, engine.tokenizer,
                                     engine.scheduler.config.max_model_len)
            else:
                inputs = completion_inputs(request)
            for item in inputs:
                self._ids += 1
                rid = f"{job.entry_id}#{self._ids}"
                engine.add_request(item.prompt, item.params, request_id=rid)
                ids.append(rid)
        except ConveyorError as exc:
            for rid in ids:
                engine.abort_request(rid)
            return _refused(job, exc)
        self._jobs[job.entry_id] = (job, request, ids)
        for rid in ids:
            self._owner[rid] = job.entry_id
        return None

    def work(self) -> list[Outcome]:
        if not self._jobs:
            return []
        engine = self.engine
        finished: dict[str, Any] = {}
        try:
            for req in engine.step():
                if req.finished:
                    finished[req.request_id] = req.output(delta=False)
        except Exception as exc:  # noqa: BLE001 - the engine aborted all its requests
            error = f"engine step failed: {type(exc).__name__}: {exc}"
            out = [Outcome(job, error=error) for job, _, _ in self._jobs.values()]
            self._jobs.clear()
            self._owner.clear()
            self._done.clear()
            return out
        self._done.update(finished)
        return [self._respond(key) for key in list(self._jobs)
                if all(rid in self._done for rid in self._jobs[key][2])]

    def _respond(self, key: str) -> Outcome:
        job, request, ids = self._jobs.pop(key)
        outputs = [self._done.pop(rid) for rid in ids]
        for rid in ids:
            self._owner.pop(rid, None)
        errors = [o.error for o in outputs if o.error]
        if errors:
            return Outcome(job, error=errors[0])
        build = chat_response if job.url == CHAT_COMPLETIONS_URL else completion_response
        try:
            body = build(request, outputs, self.engine.tokenizer,
                         model=request.model or self.model)
        except RequestError as exc:
            return _refused(job, exc)
        return Outcome(job, 200, msgspec.to_builtins(body))


# -- metrics ----------------------------------------------------------------------

@dataclass
class WorkerMetrics:
    """Counters of this worker and the group's backlog, for the log line and
    Prometheus. `pending` and lag are sampled from Redis every log interval."""

    consumer: str = ""
    ok: int = 0           # results written with status 200
    refused: int = 0      # results written with an error body (status 400)
    duplicate: int = 0    # jobs whose id already had a result: acked, not rewritten
    failed: int = 0       # attempts that failed; the job stays pending for a retry
    dead: int = 0         # jobs moved to the dead-letter stream
    claimed: int = 0      # entries taken over from idle consumers
    batches: int = 0
    in_flight: int = 0
    pending: int = 0      # the group's pending entries (all consumers)
    lag_entries: int | None = None  # entries not yet delivered (Redis >= 7 reports it)
    lag_seconds: float = 0.0        # age of the oldest entry not yet delivered
    jobs_per_second: float = 0.0
    _window_start: float = 0.0
    _window_jobs: int = 0

    @property
    def finished(self) -> int:
        return self.ok + self.refused + self.duplicate + self.dead

    def update_rate(self, now: float) -> None:
        if self._window_start:
            span = now - self._window_start
            if span > 0:
                self.jobs_per_second = (self.finished - self._window_jobs) / span
        self._window_start, self._window_jobs = now, self.finished

    def log_line(self) -> str:
        lag = "" if self.lag_entries is None else f"{self.lag_entries} entries, "
        return (f"worker {self.consumer}: {self.finished} jobs done ({self.ok} ok, "
                f"{self.refused} refused, {self.duplicate} duplicate, {self.dead} dead; "
                f"{self.failed} failed attempts), {self.jobs_per_second:.1f} jobs/s, "
                f"in flight {self.in_flight}, pending {self.pending}, "
                f"lag {lag}{self.lag_seconds:.1f} s")

    def prometheus(self) -> str:
        """The Prometheus text exposition of these metrics."""
        label = f'consumer="{self.consumer}"'
        lines = ["# HELP conveyor_worker_jobs_total Jobs ended by this worker, by outcome.",
                 "# TYPE conveyor_worker_jobs_total counter"]
        for outcome in ("ok", "refused", "duplicate", "dead"):
            lines.append(f'conveyor_worker_jobs_total{{{label},outcome="{outcome}"}} '
                         f"{getattr(self, outcome)}")
        gauges = [
            ("failed_attempts_total", "counter", "Job attempts that failed (retried later).",
             self.failed),
            ("claimed_total", "counter", "Entries claimed from idle consumers.", self.claimed),
            ("batches_total", "counter", "Batches run.", self.batches),
            ("jobs_per_second", "gauge", "Jobs ended per second over the last interval.",
             self.jobs_per_second),
            ("in_flight", "gauge", "Jobs read by this worker and not yet acked.",
             self.in_flight),
            ("pending", "gauge", "Entries pending in the consumer group.", self.pending),
            ("lag_seconds", "gauge", "Age of the oldest entry not yet delivered.",
             self.lag_seconds),
        ]
        if self.lag_entries is not None:
            gauges.append(("lag_entries", "gauge", "Entries not yet delivered to the group.",
                           self.lag_entries))
        for name, kind, text, value in gauges:
            lines += [f"# HELP conveyor_worker_{name} {text}",
                      f"# TYPE conveyor_worker_{name} {kind}",
                      f"conveyor_worker_{name}{{{label}}} {value}"]
        return "\n".join(lines) + "\n"


# -- the worker ----------------------------------------------------------------------

# KEYS: results hash, results stream, jobs stream. ARGV: group, results maxlen
# (0: untrimmed), then (entry id, job id, result JSON) per job. Returns 1 per
# job whose result was written, 0 where the job id already had one (only acked).
_COMMIT = """
local written = {}
local maxlen = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local won = redis.call('HSETNX', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  if won == 1 then
    if maxlen > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'id', ARGV[i + 1],
                 'result', ARGV[i + 2])
    else
      redis.call('XADD', KEYS[2], '*', 'id', ARGV[i + 1], 'result', ARGV[i + 2])
    end
  end
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[i])
  written[#written + 1] = won
end
return written
"""

# KEYS: jobs stream, dead-letter stream. ARGV: group, entry id, then field,
# value pairs. The dead letter is added only by the consumer whose XACK took
# the entry out of the pending list, so two workers never both add it.
_BURY = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
  return 1
end
return 0
"""


@dataclass
class WorkerConfig:
    """Where the worker reads and writes, and its retry and pacing policy."""

    stream: str = "conveyor:jobs"
    group: str = "conveyor"
    results: str = "conveyor:results"
    consumer: str = "worker-1"
    dead_letter: str | None = None     # default: <stream>:dead
    results_hash: str | None = None    # default: <results>:by-id
    results_maxlen: int = 0            # trim the results stream to about this (0: never)
    max_attempts: int = 3              # deliveries before a failing job is dead-lettered
    claim_idle_ms: int = 60_000        # a pending entry idle this long is taken over
    block_ms: int = 1000               # longest wait for new jobs when idle
    max_batch_jobs: int | None = None  # cap on one read (default: the handlers' room)
    log_interval: float = 10.0
    drain: bool = False                # exit once the stream and pending list are empty

    def __post_init__(self):
        self.dead_letter = self.dead_letter or f"{self.stream}:dead"
        self.results_hash = self.results_hash or f"{self.results}:by-id"
        if self.max_attempts < 1:
            raise ConveyorError("max_attempts must be at least 1")
        if self.claim_idle_ms < 1:
            raise ConveyorError("claim_idle_ms must be at least 1")


class QueueWorker:
    """Reads jobs from a consumer group, runs them through `handlers`, writes
    each result once and acks. `run()` returns when stopped (SIGTERM, SIGINT,
    `stop()`) after finishing and acking what it had read, or, with
    `config.drain`, once nothing is left to do."""

    def __init__(self, redis: Any, handlers: Sequence[JobHandler], config: WorkerConfig):
        self.redis = redis
        self.config = config
        self.handlers = {url: h for h in handlers for url in h.urls}
        self._all_handlers = list(handlers)
        self.metrics = WorkerMetrics(consumer=config.consumer)
        self._stopping = threading.Event()
        self._signal: tuple[int, int] | None = None  # (signal, jobs in flight) to log
        self._commit = redis.register_script(_COMMIT)
        self._bury = redis.register_script(_BURY)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._next_heartbeat = 0.0
        self._next_log = 0.0

    def stop(self) -> None:
        """Finish the jobs in flight, ack them, and return from `run()`."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def ensure_group(self) -> None:
        """Create the stream and its consumer group (from the start) if missing."""
        import redis as redis_lib

        try:
            self.redis.xgroup_create(self.config.stream, self.config.group, id="0",
                                     mkstream=True)
        except redis_lib.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self) -> int:
        """The loop; returns 0 after a clean stop."""
        restore = self._install_signal_handlers()
        try:
            self.ensure_group()
            while True:
                busy = any(h.in_flight() for h in self._all_handlers)
                if self._signal is not None:
                    log.info("signal %d with %d jobs in flight: finishing them, then "
                             "stopping", *self._signal)
                    self._signal = None
                if self.stopping and not busy:
                    break
                got = 0 if self.stopping else self._fill_or_recreate(busy)
                outcomes: list[Outcome] = []
                for handler in self._all_handlers:
                    if handler.in_flight():
                        outcomes += handler.work()
                if outcomes:
                    self.metrics.batches += 1
                    self._finish(outcomes)
                self._housekeeping()
                if (self.config.drain and not got and not busy and not outcomes
                        and self._group_pending() == 0):
                    break
        finally:
            restore()
            self.refresh_metrics(force=True)
        return 0

    # -- reading -------------------------------------------------------------
    def _room(self) -> int:
        room = min(h.room() for h in self._all_handlers) if self._all_handlers else 0
        if self.config.max_batch_jobs is not None:
            room = min(room, self.config.max_batch_jobs - self._in_flight_count())
        return room

    def _in_flight_count(self) -> int:
        return sum(len(h.in_flight()) for h in self._all_handlers)

    def _fill_or_recreate(self, busy: bool) -> int:
        import redis as redis_lib

        try:
            return self._fill(busy)
        except redis_lib.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or its group was deleted under us: start it again.
            log.warning("the stream or group is gone (%s); recreating it", exc)
            self._claim_cursor = "0-0"
            self.ensure_group()
            return 0

    def _fill(self, busy: bool) -> int:
        """Claim stale entries, then read new ones, never more than there is room
        for; block for new jobs only when nothing is in flight."""
        room = self._room()
        got = 0
        if room > 0 and time.monotonic() >= self._next_claim:
            got += self._claim(room)
            room = self._room()
        if room > 0:
            # Block only when idle, and not past the next look for stale entries.
            until_claim = int((self._next_claim - time.monotonic()) * 1000)
            block = None if (busy or got) else max(1, min(self.config.block_ms, until_claim))
            reply = self.redis.xreadgroup(self.config.group, self.config.consumer,
                                          {self.config.stream: ">"}, count=room, block=block)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    self._admit(entry_id.decode(), fields, attempts=1)
                    got += 1
        return got

    def _claim(self, room: int) -> int:
        cfg = self.config
        reply = self.redis.xautoclaim(cfg.stream, cfg.group, cfg.consumer, cfg.claim_idle_ms,
                                      start_id=self._claim_cursor, count=room)
        cursor, entries = reply[0], reply[1]
        cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        self._claim_cursor = cursor
        if cursor == "0-0":
            # A full pass over the pending list: look again in a while.
            self._next_claim = time.monotonic() + min(cfg.claim_idle_ms / 4000, 5.0)
        live = [(e.decode(), f) for e, f in entries if e is not None]
        if len(live) < len(entries):
            self._ack_deleted({e for e, _ in live})
        if not live:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in live:
            pipe.xpending_range(cfg.stream, cfg.group, min=entry_id, max=entry_id, count=1)
        counts = [rows[0]["times_delivered"] if rows else 1 for rows in pipe.execute()]
        running = {j.entry_id for h in self._all_handlers for j in h.in_flight()}
        for (entry_id, fields), attempts in zip(live, counts):
            if entry_id in running:
                continue  # our own job, still running: the claim only reset its idle time
            self.metrics.claimed += 1
            log.info("claimed %s (delivery %d)", entry_id, attempts)
            if attempts > cfg.max_attempts:
                raw = _text_fields(fields)
                job = Job(entry_id, raw.get("id", ""), raw.get("url", ""), {}, raw, attempts)
                self._dead_letter(job, f"delivered {attempts} times without finishing "
                                       "(its workers died or stalled)")
            else:
                self._admit(entry_id, fields, attempts)
        return len(live)

    def _ack_deleted(self, claimed: set[str]) -> None:
        # Redis < 7 hands over entries deleted from the stream as nil, without
        # their ids: find them among this consumer's pending ones and ack them.
        cfg = self.config
        mine = {j.entry_id for h in self._all_handlers for j in h.in_flight()} | claimed
        rows = self.redis.xpending_range(cfg.stream, cfg.group, min="-", max="+", count=10_000,
                                         consumername=cfg.consumer)
        for row in rows:
            entry_id = _text(row["message_id"])
            if entry_id not in mine and not self.redis.xrange(cfg.stream, entry_id, entry_id):
                self.redis.xack(cfg.stream, cfg.group, entry_id)

    def _admit(self, entry_id: str, fields: dict, attempts: int) -> None:
        try:
            job = decode_job(entry_id, fields, attempts)
        except MalformedJob as exc:
            raw = _text_fields(fields)
            bare = Job(entry_id, raw.get("id", ""), raw.get("url", ""), {}, raw, attempts)
            self._finish([Outcome(bare, error=f"malformed job: {exc}")])
            return
        handler = self.handlers.get(job.url)
        if handler is None:
            # Left pending for a worker that serves this url, if there is one.
            self._finish([Outcome(job, error=f"this worker does not serve {job.url}")])
            return
        outcome = handler.admit(job)
        if outcome is not None:
            self._finish([outcome])

    # -- writing -------------------------------------------------------------
    def _finish(self, outcomes: list[Outcome]) -> None:
        cfg = self.config
        args: list[Any] = [cfg.group, cfg.results_maxlen]
        answered: list[Outcome] = []
        for out in outcomes:
            if out.error is None:
                args += [out.job.entry_id, out.job.job_id,
                         msgspec.json.encode(result_record(out))]
                answered.append(out)
            elif out.job.attempts >= cfg.max_attempts:
                self._dead_letter(out.job, out.error)
            else:
                # Not acked: the entry stays pending and is claimed again once idle.
                self.metrics.failed += 1
                log.warning("job %s (entry %s) failed on attempt %d of %d: %s",
                            out.job.job_id or "?", out.job.entry_id, out.job.attempts,
                            cfg.max_attempts, out.error)
        if not answered:
            return
        written = self._commit(keys=[cfg.results_hash, cfg.results, cfg.stream], args=args)
        for out, won in zip(answered, written):
            if not won:
                self.metrics.duplicate += 1
            elif out.status_code == 200:
                self.metrics.ok += 1
            else:
                self.metrics.refused += 1

    def _dead_letter(self, job: Job, error: str) -> None:
        cfg = self.config
        fields = dict(job.fields)
        fields.update(error=error, attempts=str(job.attempts), entry=job.entry_id,
                      consumer=cfg.consumer)
        flat = [x for kv in fields.items() for x in kv]
        self._bury(keys=[cfg.stream, cfg.dead_letter], args=[cfg.group, job.entry_id, *flat])
        self.metrics.dead += 1
        log.warning("job %s (entry %s) dead-lettered after %d attempts: %s",
                    job.job_id or "?", job.entry_id, job.attempts, error)

    # -- upkeep --------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.claim_idle_ms / 3000
            self._heartbeat()
        self.refresh_metrics()

    def _heartbeat(self) -> None:
        # Jobs that stay in flight across steps (generation) would look idle to
        # other workers' XAUTOCLAIM: re-claiming them by id resets their idle
        # time (JUSTID leaves the delivery count alone).
        ids = [j.entry_id for h in self._all_handlers for j in h.in_flight()]
        if ids:
            cfg = self.config
            self.redis.xclaim(cfg.stream, cfg.group, cfg.consumer, 0, ids, justid=True)

    def _group_pending(self) -> int:
        summary = self.redis.xpending(self.config.stream, self.config.group)
        return int(summary["pending"])

    def refresh_metrics(self, force: bool = False) -> None:
        """Sample the backlog (pending, lag) and log the metrics line, at most
        once per log interval unless `force`."""
        now = time.monotonic()
        if not force and now < self._next_log:
            return
        self._next_log = now + self.config.log_interval
        m = self.metrics
        m.in_flight = self._in_flight_count()
        try:
            m.pending = self._group_pending()
            m.lag_entries, m.lag_seconds = self._lag()
        except Exception as exc:  # noqa: BLE001 - metrics must not stop the worker
            log.warning("cannot sample the backlog: %s", exc)
        m.update_rate(now)
        log.info("%s", m.log_line())

    def _lag(self) -> tuple[int | None, float]:
        cfg = self.config
        group = next((g for g in self.redis.xinfo_groups(cfg.stream)
                      if _text(g["name"]) == cfg.group), None)
        if group is None:
            return None, 0.0
        lag = group.get("lag")
        last = _text(group["last-delivered-id"])
        first = self.redis.xrange(cfg.stream, min=f"({last}", max="+", count=1)
        if not first:
            return (int(lag) if lag is not None else 0), 0.0
        millis = int(_text(first[0][0]).split("-")[0])
        return (int(lag) if lag is not None else None), max(0.0, time.time() - millis / 1000)

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, frame):
            # Only note it: the loop logs and stops at its next turn.
            self._signal = (signum, self._in_flight_count())
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _text_fields(raw: dict) -> dict[str, str]:
    # For the dead-letter stream: keep what can be kept of an undecodable entry.
    return {_text_or_repr(k): _text_or_repr(v) for k, v in raw.items()}


def _text_or_repr(value: Any) -> str:
    try:
        return _text(value)
    except UnicodeDecodeError:
        return repr(value)
