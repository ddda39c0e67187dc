"""The OpenAI-compatible server, tested as a real process on 127.0.0.1.

Clients are the official `openai` package and httpx; reference answers come
from the offline API (LLM.generate / LLM.embed) on the same checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import openai
import pydantic
import pytest

import engine  # noqa: F401  (preloads the BLAS before mlx)
from engine import LLM, SamplingParams
from engine.entrypoints.openai.metrics import parse_samples

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-key"
MAX_BODY = 64 << 10
MAX_MODEL_LEN = 256
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(*args: str):
    """`python -m engine.entrypoints.cli.serve ARGS` on a free port; yields its base URL."""
    port = _free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.entrypoints.cli.serve", "--port", str(port),
         "--log-level", "warning", *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read().decode()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not start in 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def minilm_dir():
    from engine.embedding.embedder import resolve_embedding_model

    return resolve_embedding_model(None)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, minilm_dir):
    """Tiny llama for generation, MiniLM for embeddings, an API key, a small
    body limit and a short context (so fuzzed requests stay fast)."""
    with _serve("--model", str(tiny_llama_dir), "--served-model-name", "tiny",
                "--embedding-model", str(minilm_dir), "--api-key", KEY,
                "--max-body-bytes", str(MAX_BODY), "--max-model-len", str(MAX_MODEL_LEN),
                "--kv-cache-bytes", str(32 << 20)) as url:
        yield url


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir):
    """One batch slot and room for one waiting request; the tiny model's full
    2048-token context, so a request can outlast a client's patience."""
    with _serve("--model", str(tiny_llama_dir), "--served-model-name", "tiny",
                "--embedding-model", "none", "--max-num-seqs", "1",
                "--max-waiting", "1") as url:
        yield url


@pytest.fixture(scope="module")
def offline(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), kv_cache_bytes=32 << 20)


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def _metrics(url: str) -> dict[str, float]:
    return parse_samples(httpx.get(url + "/metrics").text)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# -- the official client against the offline API -----------------------------------

def test_models_and_health(server, client, minilm_dir):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", str(minilm_dir)}
    assert cards["tiny"].max_model_len == MAX_MODEL_LEN
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completions_equal_offline(client, offline):
    prompts = ["Hello there", "The capital of France is", "12345"]
    want = offline.generate(prompts, _greedy(12), use_tqdm=False)
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=12,
                                    temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.outputs[0].text for w in want]
    assert [c.finish_reason for c in got.choices] == [w.outputs[0].finish_reason for w in want]
    assert got.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    assert got.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)
    # Token-id prompts, streamed, with logprobs: the same text, one logprob a token.
    ids = offline.tokenizer.encode(prompts[1])
    text, logprobs = "", []
    for chunk in client.completions.create(model="tiny", prompt=ids, max_tokens=12,
                                           temperature=0, logprobs=2, stream=True):
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs:
            logprobs += chunk.choices[0].logprobs.token_logprobs
    assert text == want[1].outputs[0].text
    assert len(logprobs) == len(want[1].outputs[0].token_ids)
    # Several prompts in one streamed body: chunks interleave, told apart by index.
    texts = ["", "", ""]
    for chunk in client.completions.create(model="tiny", prompt=prompts, max_tokens=12,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [w.outputs[0].text for w in want]


def _chat_reference(offline, messages, max_tokens):
    tok = offline.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                     add_special_tokens=False)
    return offline.generate([ids], _greedy(max_tokens), use_tqdm=False)[0]


def test_chat_equals_offline_streamed_and_not(client, offline):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a conveyor belt?"}]
    want = _chat_reference(offline, messages, 20)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)

    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.outputs[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == []  # include_usage: a last chunk with the totals only
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_embeddings_equal_offline(client, minilm_dir):
    texts = ["a conveyor belt", "continuous batching on MLX", "héllo wörld"]
    want = LLM(str(minilm_dir), task="embed").embed(texts)
    got = client.embeddings.create(model=str(minilm_dir), input=texts)  # base64 on the wire
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    floats = client.embeddings.create(model=str(minilm_dir), input=texts[0],
                                      encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[0], atol=1e-5)
    assert got.usage.prompt_tokens > 0


# -- many clients, one engine loop --------------------------------------------------

def test_64_concurrent_streaming_clients(server, offline):
    prompts = [f"request {i}: {'ab' * (i % 7)}" for i in range(64)]
    want = [o.outputs[0].text for o in offline.generate(prompts, _greedy(16, ignore_eos=True),
                                                        use_tqdm=False)]
    steps_before = _metrics(server)["conveyor_engine_steps_total"]

    async def one(c: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        text, finish = "", None
        stream = await c.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY,
                                      max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == want
    assert all(f == "length" for _, f in results)
    # Shared batches: far fewer steps than 64 requests × 16 tokens run alone.
    steps = _metrics(server)["conveyor_engine_steps_total"] - steps_before
    assert steps < 64 * 16 / 4


# -- a client that goes away --------------------------------------------------------

def test_disconnect_mid_stream_aborts_and_frees_blocks(small_server):
    server = small_server
    before = _metrics(server)
    body = {"model": "tiny", "prompt": "never ending", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server) as c, c.stream("POST", "/v1/completions",
                                                      json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept open: closing the iterator closes the connection
        for _ in range(6):      # a few tokens in: the request holds KV blocks now
            next(lines)
        during = _metrics(server)
        assert during["conveyor_kv_blocks_used"] > 0
        assert during["conveyor_requests_running"] == 1
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        after = _metrics(server)
        if after["conveyor_kv_blocks_used"] == 0:
            break
        time.sleep(0.01)
    assert after["conveyor_kv_blocks_used"] == 0
    assert after["conveyor_requests_running"] == 0
    assert after["conveyor_client_aborts_total"] == before["conveyor_client_aborts_total"] + 1
    time.sleep(0.1)  # and the engine has stopped working on it
    assert _metrics(server)["conveyor_engine_steps_total"] == after["conveyor_engine_steps_total"]
    # It stopped: nowhere near the 2000 tokens it asked for.
    made = after["conveyor_generation_tokens_total"] - before["conveyor_generation_tokens_total"]
    assert made < 1000


def test_disconnect_before_a_plain_answer_aborts(small_server):
    server = small_server
    before = _metrics(server)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        after = _metrics(server)
        if after["conveyor_client_aborts_total"] > before["conveyor_client_aborts_total"]:
            break
        time.sleep(0.01)
    assert after["conveyor_client_aborts_total"] == before["conveyor_client_aborts_total"] + 1
    assert after["conveyor_kv_blocks_used"] == 0


# -- errors ---------------------------------------------------------------------------

def _post(server, path, body=None, *, headers=AUTH, content=None):
    return httpx.post(server + path, json=body, content=content, headers=headers)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
ERROR_CASES = [
    # (name, path, body, headers, status, param, code)
    ("negative temperature", "/v1/completions", {"prompt": "a", "temperature": -1}, AUTH,
     400, "temperature", None),
    ("max_tokens beyond the context", "/v1/completions",
     {"prompt": "a", "max_tokens": MAX_MODEL_LEN}, AUTH, 400, "max_tokens", None),
    ("chat max_tokens beyond the context", "/v1/chat/completions",
     {**CHAT, "max_tokens": 10**6}, AUTH, 400, "max_tokens", None),
    ("unknown field", "/v1/chat/completions", {**CHAT, "temprature": 0}, AUTH,
     400, "temprature", None),
    ("wrong type", "/v1/completions", {"prompt": "a", "max_tokens": "many"}, AUTH,
     400, "max_tokens", None),
    ("missing field", "/v1/completions", {"max_tokens": 3}, AUTH, 400, "prompt", None),
    ("too many choices", "/v1/completions", {"prompt": "a", "n": 10**9}, AUTH,
     400, "n", None),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**6]}, AUTH,
     400, "prompt", None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, AUTH, 400, "messages", None),
    ("missing key", "/v1/completions", {"prompt": "a"}, {}, 401, None, "invalid_api_key"),
    ("wrong key", "/v1/completions", {"prompt": "a"}, {"Authorization": "Bearer nope"},
     401, None, "invalid_api_key"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, AUTH,
     404, "model", "model_not_found"),
    ("unknown chat model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, AUTH,
     404, "model", "model_not_found"),
    ("unknown embedding model", "/v1/embeddings", {"model": "tiny", "input": "a"}, AUTH,
     404, "model", "model_not_found"),
    ("oversized body", "/v1/completions", {"prompt": "x" * (MAX_BODY + 1)}, AUTH,
     413, None, "request_too_large"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,code", ERROR_CASES,
                         ids=[c[0] for c in ERROR_CASES])
def test_error_status_and_openai_body(server, name, path, body, headers, status, param, code):
    r = _post(server, path, body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert error["param"] == param
    assert error["code"] == code


def test_other_errors_are_openai_shaped(server, client):
    cases = [
        _post(server, "/v1/completions", content=b"{not json", headers=JSON_AUTH),   # 400
        httpx.get(server + "/v1/nothing-here"),                                        # 404
        httpx.get(server + "/v1/completions", headers=AUTH),                           # 405
    ]
    assert [r.status_code for r in cases] == [400, 404, 405]
    for r in cases:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    # The official client maps them to its exception classes.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="a")
    with (openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0) as bad,
          pytest.raises(openai.AuthenticationError)):
        bad.models.list()


def test_full_waiting_queue_is_429(small_server):
    url = small_server
    long = {"prompt": "a", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with (httpx.Client(base_url=url, timeout=30) as a,
          httpx.Client(base_url=url, timeout=30) as b,
          a.stream("POST", "/v1/completions", json=long) as first):
        lines = first.iter_lines()
        next(lines)                          # running: the one batch slot is taken
        with b.stream("POST", "/v1/completions", json=long) as second:
            assert second.status_code == 200  # headers go out at once
            deadline = time.monotonic() + 5  # the second waits for admission
            while _metrics(url)["conveyor_requests_waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url + "/v1/completions", json={"prompt": "a"})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    m = _metrics(url)
    assert m["conveyor_rejected_overload_total"] == 1


# -- the schema -------------------------------------------------------------------------

def test_openapi_lists_every_route_with_struct_schemas(server):
    doc = httpx.get(server + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models",
            "/health", "/metrics"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


@pytest.mark.skipif(shutil.which("st", path=os.path.dirname(sys.executable)) is None,
                    reason="schemathesis is not installed")
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, tmp_path):
    # Every check but positive_data_acceptance: a schema cannot say that
    # prompt + max_tokens must fit the context (or that `prompt` is a list of
    # strings or of token ids: msgspec allows one array type per union), so
    # some schema-valid bodies are rightly refused with a 400. Positive and
    # negative fuzzing, 30 examples per operation; the coverage phase (~700
    # boundary cases, ~20 s) passes too but is left to manual runs.
    st = os.path.join(os.path.dirname(sys.executable), "st")
    cmd = [st, "run", server + "/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", "30",
           "--seed", "7", "--phases", "examples,fuzzing", "--workers", "2",
           "--generation-database", "none", "--no-color", "-H", f"Authorization: Bearer {KEY}",
           "--report", "json", "--report-dir", str(tmp_path)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Server error" not in run.stdout


# -- pieces without a server ---------------------------------------------------------

def test_metrics_exposition():
    from engine.core.llm_engine import EngineStats
    from engine.entrypoints.openai.metrics import Histogram, ServerMetrics, TokenRate

    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1"} 3',
                            'x_bucket{le="+Inf"} 4', "x_sum 4.05", "x_count 4"]
    rate = TokenRate(window=10)
    assert rate.sample(0, now=100.0) == 0
    assert rate.sample(50, now=105.0) == 10
    assert rate.sample(250, now=125.0) == 10  # the window slides: (250 - 50) / 20
    m = ServerMetrics()
    m.count_finished("length", 0.02, 0.5)
    m.count_request("/v1/completions", 200)
    stats = EngineStats(steps=7, preemptions=2, kv_blocks_total=100, kv_blocks_used=25,
                        kv_blocks_peak=40, kv_cache_bytes=1 << 20, padding_waste=0.0,
                        prompt_tokens=11, generated_tokens=33, running=3, waiting=4)
    samples = parse_samples(m.render(stats))
    assert samples["conveyor_requests_running"] == 3
    assert samples["conveyor_requests_waiting"] == 4
    assert samples["conveyor_kv_blocks_used"] == 25
    assert samples["conveyor_kv_cache_usage_ratio"] == 0.25
    assert samples["conveyor_preemptions_total"] == 2
    assert samples["conveyor_generation_tokens_total"] == 33
    assert samples["conveyor_time_to_first_token_seconds_count"] == 1
    assert samples['conveyor_time_to_first_token_seconds_bucket{le="0.025"}'] == 1
    assert samples['conveyor_requests_finished_total{reason="length"}'] == 1
    assert samples['conveyor_http_requests_total{route="/v1/completions",status="200"}'] == 1
    # vLLM's names, so its Grafana dashboards read the same numbers.
    label = '{model_name="default"}'
    assert samples["vllm:num_requests_running" + label] == 3
    assert samples["vllm:num_requests_waiting" + label] == 4
    assert samples["vllm:gpu_cache_usage_perc" + label] == 0.25
    assert samples["vllm:kv_cache_usage_perc" + label] == 0.25
    assert samples["vllm:prompt_tokens_total" + label] == 11
    assert samples["vllm:generation_tokens_total" + label] == 33
    assert samples["vllm:num_preemptions_total" + label] == 2
    assert samples["vllm:time_to_first_token_seconds_count" + label] == 1
    assert samples['vllm:time_to_first_token_seconds_bucket{model_name="default",le="0.025"}'] == 1
    assert samples["vllm:e2e_request_latency_seconds_sum" + label] == 0.5
    assert samples['vllm:request_success_total{model_name="default",finished_reason="length"}'] == 1


def test_serve_binds_loopback_by_default_and_busy_port_is_a_user_error():
    import argparse

    from engine.entrypoints.cli.serve import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli.serve", "--port",
                str(port)],
                             check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"conveyor: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in run.stderr


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: Literal["cat", "dog", "bird"]
    age: int = pydantic.Field(ge=0, le=30)
    vaccinated: bool


def test_structured_outputs_over_http(client, server):
    """The tiny model writes noise unless constrained: whatever it writes here
    parses."""
    parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user",
                                                                    "content": "a pet"}],
                                           response_format=Pet, max_tokens=120, seed=3,
                                           temperature=1.0)
    assert isinstance(parsed.choices[0].message.parsed, Pet)
    done = client.completions.create(model="tiny", prompt="x", max_tokens=8, temperature=1.0,
                                     extra_body={"guided_regex": "[0-9]{4}"})
    assert done.choices[0].text.isdigit() and len(done.choices[0].text) == 4


def test_tool_calls_over_http(small_server):
    """(The tools' description alone outgrows the other server's short context.)"""
    client = openai.OpenAI(base_url=small_server + "/v1", api_key="unused", max_retries=0)
    tool = {"type": "function", "function": {"name": "set_mode", "parameters": {
        "type": "object", "properties": {"mode": {"enum": ["on", "off"]}},
        "required": ["mode"]}}}
    messages = [{"role": "user", "content": "switch"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, tools=[tool],
                                           tool_choice="required", max_tokens=80, temperature=0,
                                           parallel_tool_calls=False)
    call = plain.choices[0].message.tool_calls[0]
    assert plain.choices[0].finish_reason == "tool_calls" and call.function.name == "set_mode"
    streamed = list(client.chat.completions.create(
        model="tiny", messages=messages, tools=[tool], tool_choice="required", max_tokens=80,
        temperature=0, stream=True, parallel_tool_calls=False))
    pieces = [d.choices[0].delta.tool_calls for d in streamed
              if d.choices and d.choices[0].delta.tool_calls]
    assert len(pieces) == 1 and pieces[0][0].function.arguments == call.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    # OpenAI fields that change nothing here are accepted.
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, store=False,
                                   metadata={"k": "v"}, service_tier="auto", user="u",
                                   parallel_tool_calls=True, tools=[tool])


def test_tokenize_and_detokenize(server, offline):
    r = httpx.post(server + "/tokenize", headers=JSON_AUTH,
                   json={"model": "tiny", "prompt": "hello", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == offline.tokenizer.encode("hello")
    assert body["count"] == 5 and body["max_model_len"] == MAX_MODEL_LEN
    assert "".join(body["token_strs"]) == "hello"
    chat = httpx.post(server + "/tokenize", headers=JSON_AUTH, json={
        "messages": [{"role": "user", "content": "hi"}]}).json()
    text = offline.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat["tokens"] == offline.tokenizer.encode(text, add_special_tokens=False)
    back = httpx.post(server + "/detokenize", headers=JSON_AUTH,
                      json={"tokens": body["tokens"]})
    assert back.json() == {"prompt": "hello"}
    bad = httpx.post(server + "/detokenize", headers=JSON_AUTH, json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(server + "/tokenize", headers=JSON_AUTH, json={"prompt": "a",
                                                                     "messages": []})
    assert both.status_code == 400


def test_metrics_after_traffic(server, client):
    client.completions.create(model="tiny", prompt="count me", max_tokens=3, temperature=0)
    m = _metrics(server)
    assert m["conveyor_time_to_first_token_seconds_count"] >= 1
    assert m["conveyor_e2e_request_latency_seconds_count"] >= 1
    assert m["conveyor_kv_blocks_total"] > 0
    assert m["conveyor_generation_tokens_per_second"] >= 0
    assert m['conveyor_http_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m['vllm:e2e_request_latency_seconds_count{model_name="tiny"}'] >= 1
    assert m['vllm:generation_tokens_total{model_name="tiny"}'] >= 3


def test_default_models_end_to_end(smollm, minilm_dir):
    """`conveyor serve` with no model arguments: SmolLM2 and MiniLM."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = _chat_reference(smollm, messages, 24)
    with _serve("--kv-cache-bytes", str(256 << 20), "--max-model-len", "2048") as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
        assert {m.id for m in c.models.list().data} == {"SmolLM2-135M-Instruct",
                                                        "all-MiniLM-L6-v2"}
        got = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                        max_tokens=24, temperature=0)
        assert got.choices[0].message.content == want.outputs[0].text
        assert "Paris" in got.choices[0].message.content
        emb = c.embeddings.create(model="all-MiniLM-L6-v2", input=["Paris", "France"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
        # Structured outputs through the client's own parse(): a pydantic model in,
        # an instance of it out (issue 17).
        parsed = c.chat.completions.parse(
            model="SmolLM2-135M-Instruct", response_format=City, temperature=0, max_tokens=80,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}])
        city = parsed.choices[0].message.parsed
        assert isinstance(city, City) and city.country
        assert parsed.choices[0].finish_reason == "stop"


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population_millions: int = pydantic.Field(ge=0, le=100)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]
    landmarks: list[str] = pydantic.Field(max_length=3)


# -- the holes a hostile user found (issue 16) -----------------------------------------

@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_declared_json_is_a_415(server, content_type):
    # What a web page can post cross-site without a preflight: never served.
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    body = b'{"prompt": "a", "max_tokens": 1}'
    r = httpx.post(server + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(server + "/v1/completions", content=body,
                    headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_loopback_server_refuses_other_host_names(server):
    port = server.rsplit(":", 1)[1]
    # DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        r = httpx.get(server + "/v1/models", headers={**AUTH, "Host": host})
        assert r.status_code == 403, host
        assert r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(server + "/health", headers={"Host": host}).status_code == 200, host


def test_embedding_limits_and_the_over_long_policy(server, minilm_dir):
    url = server + "/v1/embeddings"
    model = str(minilm_dir)
    r = httpx.post(url, json={"model": model, "input": ["a"] * 2049}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert "at most 2048 inputs" in r.json()["error"]["message"]
    long = "conveyor belt " * 400   # well past MiniLM's 256 tokens
    r = httpx.post(url, json={"model": model, "input": ["short", long]}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("input 1 is longer than the model's maximum")
    r = httpx.post(url, json={"model": model, "input": ["short", long],
                              "truncate_prompt_tokens": -1}, headers=AUTH)
    assert r.status_code == 200
    want = LLM(model, task="embed").embed(["short", long])
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], want, atol=1e-5)


def test_over_long_prompt_is_a_400_unless_truncation_is_asked(server, client, offline):
    prompt = "conveyor " * 60   # 540 byte tokens: past the 256-token context
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens") as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
    assert info.value.body["param"] == "prompt"
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 100})
    ids = offline.tokenizer.encode(prompt)[-100:]
    want = offline.generate([ids], _greedy(4), use_tqdm=False)[0]
    assert got.choices[0].text == want.outputs[0].text
    assert got.usage.prompt_tokens == 100
    fit = client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                    extra_body={"truncate_prompt_tokens": -1})
    assert fit.usage.prompt_tokens == MAX_MODEL_LEN - 6
