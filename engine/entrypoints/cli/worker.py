"""`conveyor worker`: serve jobs from a Redis stream (see engine.entrypoints.queue.worker)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from engine.entrypoints.cli.common import (
    add_engine_args,
    add_limit_args,
    engine_kwargs,
    serving_limits,
)
from engine.entrypoints.queue.worker import DEFAULT_RESULTS_TTL, DEFAULT_STREAM_MAXLEN
from engine.errors import ConveyorError

_EPILOG = """\
jobs: XADD <stream> * id JOB_ID url /v1/embeddings body '{"input": "some text"}'
  url is /v1/embeddings, /v1/completions or /v1/chat/completions and body the
  JSON body that url takes over HTTP (and in batch files).
  (custom_id works for id). These are a batch file's line fields (conveyor batch).
results: the stream <results> gets one entry per job (fields id, result), and
  the key <results>:by-id:JOB_ID holds the same result JSON, a batch output
  line: {"id": "queue_req_<entry>", "custom_id": JOB_ID, "response":
  {"status_code": 200, "request_id": "<entry>", "body": {...}}, "error": null}.
  A job the API refuses gets the status and OpenAI error body the HTTP server
  would send, plus "error": {"code", "message"}: a bad field, a prompt too
  long, a url or model this worker does not serve, a body that is not JSON,
  an entry with no url or body. A job is answered once, however often it is
  delivered, while its result key lives (--results-ttl).
retention: answered entries are deleted from <stream>; the results and
  dead-letter streams are trimmed to about --results-maxlen and
  --dead-letter-maxlen entries; result keys expire after --results-ttl.
failures: a job whose run fails (an engine error) is retried, by this or
  another worker, once it has been pending for --claim-idle-ms; after
  --max-attempts deliveries it goes to the dead-letter stream (<stream>:dead).
fleets: workers that read one stream must serve the same --tasks and model;
  give other kinds of jobs their own stream.
SIGTERM/SIGINT: stop reading, finish and ack the jobs in flight, exit 0.
password: a Redis URL with a password is read from $CONVEYOR_REDIS_URL or
  --redis-url-file, never from the command line (`ps` shows it to everyone).
"""


def add_worker_parser(subparsers) -> argparse.ArgumentParser:
    """Register `worker` on the `conveyor` command's subparsers."""
    p = subparsers.add_parser(
        "worker", help="serve embedding and generation jobs from a Redis stream",
        description="Read jobs from a Redis stream with a consumer group, run them in "
        "batches and write one result per job.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q = p.add_argument_group("queue")
    q.add_argument("--redis", help="Redis URL without a password (default: "
                   "$CONVEYOR_REDIS_URL, else redis://127.0.0.1:6379/0)")
    q.add_argument("--redis-url-file", type=Path, help="read the Redis URL (password "
                   "included) from this file")
    q.add_argument("--stream", default="conveyor:jobs", help="the jobs stream")
    q.add_argument("--group", default="conveyor", help="the consumer group (made if missing)")
    q.add_argument("--results", default="conveyor:results", help="the results stream")
    q.add_argument("--consumer", help="this worker's consumer name (default: host-pid)")
    q.add_argument("--dead-letter", help="dead-letter stream (default: <stream>:dead)")
    q.add_argument("--max-attempts", type=int, default=3,
                   help="deliveries before a failing job is dead-lettered (default 3)")
    q.add_argument("--claim-idle-ms", type=int, default=60_000,
                   help="take over entries pending this long in other consumers "
                   "(default 60000)")
    q.add_argument("--block-ms", type=int, default=1000,
                   help="longest wait for new jobs when idle (default 1000)")
    q.add_argument("--max-batch-jobs", type=int,
                   help="jobs per read at most (default: what the models can batch)")
    q.add_argument("--results-maxlen", type=int, default=DEFAULT_STREAM_MAXLEN,
                   help="trim the results stream to about this many entries; 0: never "
                   "(default: %(default)s)")
    q.add_argument("--dead-letter-maxlen", type=int, default=DEFAULT_STREAM_MAXLEN,
                   help="trim the dead-letter stream to about this many entries; 0: never "
                   "(default: %(default)s)")
    q.add_argument("--results-ttl", type=int, default=DEFAULT_RESULTS_TTL,
                   help="seconds each job's result key is kept (and a re-submitted job id "
                   "is not answered again); 0: forever (default: %(default)s)")
    q.add_argument("--keep-answered", action="store_true",
                   help="leave answered entries in the jobs stream (default: delete them)")
    q.add_argument("--drain", action="store_true",
                   help="exit once the stream has no new or pending jobs")
    q.add_argument("--tasks", default="both",
                   help="job kinds to serve: embed, generate, both, or embed,generate "
                   "(default both); a job of another kind gets a 404 answer")
    q.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between metrics log lines (default 10)")
    q.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port at /metrics")
    q.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for --metrics-port (default 127.0.0.1)")
    q.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    m = p.add_argument_group("models")
    m.add_argument("--embedding-model", help="encoder for /v1/embeddings "
                   "(default: all-MiniLM-L6-v2)")
    m.add_argument("--served-model-name", help="the name generation jobs may give as "
                   "`model` (default: --model as given, or its last path part)")
    m.add_argument("--batch-tokens", type=int, help="padded tokens per embedding batch")
    m.add_argument("--max-batch-size", type=int, help="texts per embedding batch")
    add_engine_args(m, model_help="generation model, loaded on the first generation job "
                    "(default: SmolLM2-135M-Instruct)")
    add_limit_args(m)
    p.set_defaults(run=run_worker)
    return p


def run_worker(args: argparse.Namespace) -> int:
    """Connect, load the models, and run until stopped."""
    try:
        import redis
    except ImportError:
        raise ConveyorError("the worker needs the redis package (pip install redis)") from None

    from engine.entrypoints.queue import redis_url
    from engine.entrypoints.queue.worker import QueueWorker, WorkerConfig

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    tasks = parse_tasks(args.tasks)
    limits = serving_limits(args)
    url = redis_url.resolve(args.redis, args.redis_url_file)
    config = WorkerConfig(
        stream=args.stream, group=args.group, results=args.results,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        dead_letter=args.dead_letter, results_maxlen=args.results_maxlen,
        dead_letter_maxlen=args.dead_letter_maxlen, results_ttl=args.results_ttl,
        keep_answered=args.keep_answered, max_attempts=args.max_attempts,
        claim_idle_ms=args.claim_idle_ms, block_ms=args.block_ms,
        max_batch_jobs=args.max_batch_jobs, log_interval=args.log_interval, drain=args.drain)
    try:
        client = redis.Redis.from_url(url)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise ConveyorError(redis_url.scrub(f"cannot reach Redis at {url}: {exc}", url)
                            ) from None
    worker = QueueWorker(client, _handlers(args, tasks), config, limits)
    server = _serve_metrics(worker, args.metrics_host, args.metrics_port)
    try:
        return worker.run()
    except redis.ConnectionError as exc:
        # Jobs in flight stay pending and are claimed by another worker.
        raise ConveyorError(redis_url.scrub(f"lost the connection to Redis: {exc}", url)
                            ) from None
    finally:
        if server is not None:
            server.shutdown()


def parse_tasks(value: str) -> set[str]:
    """--tasks: "embed", "generate", "both", or a comma list of the first two."""
    tasks = {t.strip() for t in value.split(",") if t.strip()}
    if "both" in tasks:
        tasks = (tasks - {"both"}) | {"embed", "generate"}
    if not tasks or tasks - {"embed", "generate"}:
        raise ConveyorError(f"--tasks takes embed, generate or both, not {value!r}")
    return tasks


def _handlers(args: argparse.Namespace, tasks: set[str]) -> list:
    from engine.entrypoints.queue.handlers import EmbeddingJobs, GenerationJobs
    from engine.entrypoints.serving.models import DEFAULT_EMBEDDING_NAME, ModelNames

    handlers: list = []
    if "embed" in tasks:
        from engine.embedding.embedder import Embedder

        embedder = Embedder.load(args.embedding_model, batch_tokens=args.batch_tokens,
                                 max_batch_size=args.max_batch_size)
        names = ModelNames.of(args.embedding_model, default=DEFAULT_EMBEDDING_NAME)
        handlers.append(EmbeddingJobs.from_embedder(embedder, names))
    if "generate" in tasks:
        def load_engine():
            from engine.core.llm_engine import EngineArgs, LLMEngine

            return LLMEngine.from_args(EngineArgs(model=args.model, **engine_kwargs(args)))

        names = ModelNames.of(args.model, served=args.served_model_name)
        handlers.append(GenerationJobs(load_engine, model=names))
    return handlers


def _serve_metrics(worker, host: str, port: int | None) -> ThreadingHTTPServer | None:
    if port is None:
        return None

    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self):  # http.server calls it by this name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = worker.metrics.prometheus().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    try:
        server = ThreadingHTTPServer((host, port), MetricsHandler)
    except OSError as exc:
        raise ConveyorError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.entrypoints.cli.worker ...`: the worker without the `conveyor` command."""
    parser = argparse.ArgumentParser(prog="conveyor")
    add_worker_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["worker", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
