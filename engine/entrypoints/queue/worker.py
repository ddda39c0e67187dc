"""Queue worker: jobs from a Redis stream through the engine, results back.

Redis layout (names from the command line):

    <stream>            jobs; each entry has fields id (or custom_id), url and
                        body: a batch-file line's fields, body the JSON object
                        that url takes over HTTP
    <group>             the consumer group on <stream>; each worker is a consumer
    <results>           stream of results: fields id (the job's) and result, a
                        batch output line (engine.entrypoints.batch.batch_file)
                        as JSON; trimmed to about `results_maxlen` entries
    <results>:by-id:ID  the one result of job ID (the same JSON), kept
                        `results_ttl` seconds
    <stream>:dead       dead letters: the job's own fields plus error, attempts,
                        entry (its id in <stream>) and consumer; trimmed to about
                        `dead_letter_maxlen` entries

A result is written by one Lua script (queue/scripts.py) that SETs it NX under
the job's id, XADDs it to the results stream only if that won, XACKs the entry
and deletes it from <stream>: a re-delivered or re-submitted job never gets a
second result while its result key lives, nothing is acked without its result,
and nothing answered stays behind. Entries a dead consumer left pending are
taken over with XAUTOCLAIM once idle for `claim_idle_ms`; an entry delivered
more than `max_attempts` times, or failing on its last attempt, goes to the
dead-letter stream instead.

Every body goes through the serving layer the HTTP server uses, so a job gets
the answer or the error (4xx, OpenAI's error body) the same body gets over
HTTP, at once and never retried: also a job with no url or body, or for a url
or model this worker does not serve. Only failed runs are retried.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.entrypoints.queue import scripts
from engine.entrypoints.queue.handlers import Finished, JobHandler
from engine.entrypoints.queue.jobs import (
    Job,
    Outcome,
    UnreadableJob,
    decode_job,
    result_record,
    text,
    text_fields,
)
from engine.entrypoints.queue.metrics import WorkerMetrics, group_lag
from engine.entrypoints.serving.errors import ServingError
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import EmbeddingModel, GenerationModel
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.errors import ConveyorError

log = logging.getLogger("conveyor.worker")

DEFAULT_RESULTS_TTL = 86_400        # a day
DEFAULT_STREAM_MAXLEN = 10_000


@dataclass
class WorkerConfig:
    """Where the worker reads and writes, and its retry, retention and pacing policy."""

    stream: str = "conveyor:jobs"
    group: str = "conveyor"
    results: str = "conveyor:results"
    consumer: str = "worker-1"
    dead_letter: str | None = None     # default: <stream>:dead
    results_ttl: int = DEFAULT_RESULTS_TTL  # seconds a job's result key lives (0: forever)
    results_maxlen: int = DEFAULT_STREAM_MAXLEN   # results stream, about (0: untrimmed)
    dead_letter_maxlen: int = DEFAULT_STREAM_MAXLEN  # dead-letter stream, about (0: untrimmed)
    keep_answered: bool = False        # leave answered entries in <stream> (default: deleted)
    max_attempts: int = 3              # deliveries before a failing job is dead-lettered
    claim_idle_ms: int = 60_000        # a pending entry idle this long is taken over
    block_ms: int = 1000               # longest wait for new jobs when idle
    max_batch_jobs: int | None = None  # cap on one read (default: the handlers' room)
    log_interval: float = 10.0
    drain: bool = False                # exit once the stream and pending list are empty

    def __post_init__(self):
        self.dead_letter = self.dead_letter or f"{self.stream}:dead"
        for name in ("max_attempts", "claim_idle_ms"):
            if getattr(self, name) < 1:
                raise ConveyorError(f"{name} must be at least 1")
        for name in ("results_ttl", "results_maxlen", "dead_letter_maxlen"):
            if getattr(self, name) < 0:
                raise ConveyorError(f"{name} must be 0 (off) or more")

    def result_key(self, job_id: str) -> str:
        """Where the one result of job `job_id` is kept."""
        return f"{self.results}:by-id:{job_id}"


class QueueWorker:
    """Reads jobs from a consumer group, runs them through `handlers`, writes
    each result once and acks. `run()` returns when stopped (SIGTERM, SIGINT,
    `stop()`) after finishing and acking what it had read, or, with
    `config.drain`, once nothing is left to do."""

    def __init__(self, redis: Any, handlers: Sequence[JobHandler], config: WorkerConfig,
                 limits: ServingLimits | None = None):
        self.redis = redis
        self.config = config
        self.handlers = {url: h for h in handlers for url in h.urls}
        self._all_handlers = list(handlers)
        models = [h.model for h in handlers]
        self.serving = OpenAIServing(
            next((m for m in models if isinstance(m, GenerationModel)), None),
            next((m for m in models if isinstance(m, EmbeddingModel)), None), limits)
        self.metrics = WorkerMetrics(consumer=config.consumer)
        self._stopping = threading.Event()
        self._signal: tuple[int, int] | None = None  # (signal, jobs in flight) to log
        self._commit = redis.register_script(scripts.COMMIT)
        self._bury = redis.register_script(scripts.BURY)
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
                        outcomes += [self._respond(f) for f in handler.work()]
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
                raw = text_fields(fields)
                job = Job(entry_id, raw.get("id", ""), raw.get("url", ""), b"", raw, attempts)
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
            entry_id = text(row["message_id"])
            if entry_id not in mine and not self.redis.xrange(cfg.stream, entry_id, entry_id):
                self.redis.xack(cfg.stream, cfg.group, entry_id)

    def _admit(self, entry_id: str, fields: dict, attempts: int) -> None:
        """Read, check and hand over one entry; a job the API refuses (or that
        is no job) is answered at once with its error."""
        try:
            job = decode_job(entry_id, fields, attempts)
        except UnreadableJob as exc:
            self._finish([Outcome(exc.job, refusal=exc.error)])
            return
        try:
            # Unknown url, or one whose model this worker lacks: a 404 from here.
            prepared = self.serving.prepare(job.url, job.body)
            self.handlers[job.url].admit(job, prepared)
        except ServingError as exc:
            self._finish([self._refused(job, exc)])

    @staticmethod
    def _refused(job: Job, error: ServingError) -> Outcome:
        # A 4xx is the request's fault and would repeat: answered. A 5xx is
        # ours (an engine error, a bug): retried, then dead-lettered.
        if error.status >= 500:
            return Outcome(job, error=error.message)
        return Outcome(job, refusal=error)

    def _respond(self, done: Finished) -> Outcome:
        """A handler's finished job as its outcome: the serving layer's answer
        (or refusal, e.g. a text too long to embed), or a failure to retry."""
        if done.error is not None:
            return Outcome(done.job, error=done.error)
        try:
            return Outcome(done.job, body=self.serving.respond(done.prepared, done.result))
        except ServingError as exc:
            return self._refused(done.job, exc)

    # -- writing -------------------------------------------------------------
    def _finish(self, outcomes: list[Outcome]) -> None:
        cfg = self.config
        args: list[Any] = [cfg.group, cfg.results_maxlen, cfg.results_ttl,
                           "0" if cfg.keep_answered else "1"]
        keys = [cfg.results, cfg.stream]
        answered: list[Outcome] = []
        for out in outcomes:
            if out.error is None:
                args += [out.job.entry_id, out.job.job_id,
                         msgspec.json.encode(result_record(out))]
                keys.append(cfg.result_key(out.job.job_id))
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
        written = self._commit(keys=keys, args=args)
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
        self._bury(keys=[cfg.stream, cfg.dead_letter],
                   args=[cfg.group, job.entry_id, cfg.dead_letter_maxlen,
                         "0" if cfg.keep_answered else "1", *flat])
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
            m.lag_entries, m.lag_seconds = group_lag(self.redis, self.config.stream,
                                                     self.config.group)
        except Exception as exc:  # noqa: BLE001 - metrics must not stop the worker
            log.warning("cannot sample the backlog: %s", exc)
        m.update_rate(now)
        log.info("%s", m.log_line())

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

