"""The serving layer alone (request types, limits, engine inputs) and the HTTP
app in-process, where a test can hold a tokenizer or an embedder still."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import engine  # noqa: F401  (preloads the BLAS before mlx)
from engine.entrypoints.serving.errors import ServingError
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import (
    EmbeddingModel,
    GenerationModel,
    ModelNames,
    short_name,
)
from engine.entrypoints.serving.openai_serving import OpenAIServing
from engine.entrypoints.serving.protocol import decode_request, embedding_texts
from engine.errors import ConveyorError

C, CH, E = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir):
    from engine.core.llm_engine import EngineArgs, LLMEngine

    return LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), kv_cache_bytes=16 << 20,
                                          max_model_len=64))


class FakeEmbedder:
    dim, max_length = 4, 8


@pytest.fixture(scope="module")
def serving(tiny_engine):
    return OpenAIServing(GenerationModel(ModelNames(["tiny", "alias"]), tiny_engine),
                         EmbeddingModel(ModelNames(["emb"]), FakeEmbedder()),
                         ServingLimits(max_choices=6, max_embedding_inputs=3))


def refusal(serving, url, body: bytes | str) -> ServingError:
    with pytest.raises(ServingError) as info:
        serving.prepare(url, body)
    return info.value


def test_what_cannot_be_honoured_is_refused_not_ignored(serving):
    cases = [
        (C, '{"prompt": "x", "logit_bias": {"1": 5}}', 400, "logit_bias"),
        (CH, '{"messages": [{"role": "user", "content": "x"}], '
             '"response_format": {"type": "xml"}}', 400, "response_format"),
        (C, '{"prompt": "x", "guided_regex": "("}', 400, "guided_regex"),
        (C, '{"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}', 400, "guided_choice"),
        (CH, '{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}', 400,
         "tool_choice"),
        (CH, '{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
             '"function": {"name": "f"}}], "tool_choice": {"type": "function", '
             '"function": {"name": "g"}}}', 400, "tool_choice"),
        (CH, '{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
         "top_logprobs"),
        (C, '{"prompt": "x", "suffix": "y"}', 400, "suffix"),
        (C, '{"prompt": "x", "truncate_prompt_tokens": 0}', 400, "truncate_prompt_tokens"),
        (E, '{"input": [1, 2, 3]}', 400, "input"),
        (C, '{"prompt": "x", "temprature": 1}', 400, "temprature"),
        (C, '{"prompt": "x", "n": 7}', 400, "n"),                    # 7 > max_choices
        (C, '{"prompt": ["a", "b", "c"], "n": 3}', 400, "n"),         # 9 choices
        (E, '{"input": ["a", "b", "c", "d"]}', 400, "input"),        # 4 > 3 inputs
        (E, '{"input": "a", "dimensions": 5}', 400, "dimensions"),
        (E, '{"input": "a", "truncate_prompt_tokens": 3}', 400, "truncate_prompt_tokens"),
        (C, '{"prompt": "x", "model": "gpt-4"}', 404, "model"),
        (E, '{"input": "x", "model": "tiny"}', 404, "model"),
        (C, '{"prompt": [1, 320]}', 400, "prompt"),                  # vocab is 320
        (C, '{"prompt": "x" "y"}', 400, None),                       # not JSON
    ]
    for url, body, status, param in cases:
        error = refusal(serving, url, body)
        assert (error.status, error.param) == (status, param), (body, error.message)
        assert error.body().error.message == error.message
    assert refusal(serving, "/v1/images", "{}").status == 404
    with pytest.raises(ServingError, match="token-id input"):
        embedding_texts(decode_request(E, b'{"input": [[1, 2]]}'))


def test_choices_seeds_and_max_tokens(serving):
    prepared = serving.prepare(C, b'{"prompt": ["a", "b"], "n": 3, "seed": 10}')
    assert [i.params.seed for i in prepared.inputs] == [10, 11, 12] * 2
    encode = serving.generation.tokenizer.encode
    assert [i.prompt for i in prepared.inputs] == [encode("a")] * 3 + [encode("b")] * 3
    assert all(i.params.max_tokens == 16 for i in prepared.inputs)
    # No max_tokens: the rest of the context (64 here), as OpenAI and vLLM do.
    chat = serving.prepare(CH, b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert chat.inputs[0].params.max_tokens == 64 - len(chat.inputs[0].prompt)
    assert serving.prepare(C, b'{"prompt": "a", "model": "alias"}').model == "tiny"


def test_truncate_prompt_tokens_keeps_the_last_tokens(serving):
    ids = list(range(3, 100))  # 97 tokens: past the 64-token context
    too_long = refusal(serving, C, f'{{"prompt": {ids}, "max_tokens": 4}}')
    assert too_long.param == "prompt" and "truncate_prompt_tokens" in too_long.message
    kept = serving.prepare(C, f'{{"prompt": {ids}, "truncate_prompt_tokens": 10}}')
    assert kept.inputs[0].prompt == ids[-10:]
    fit = serving.prepare(C, f'{{"prompt": {ids}, "max_tokens": 4, "truncate_prompt_tokens": -1}}')
    assert fit.inputs[0].prompt == ids[-60:]
    error = refusal(serving, C, '{"prompt": "abc", "max_tokens": 64}')
    assert error.param == "max_tokens" and "context of 64 tokens" in error.message


def test_model_names_and_limits():
    assert ModelNames.of(None).names == ["SmolLM2-135M-Instruct"]
    assert ModelNames.of("/m/SmolLM2.Q4.gguf").names == ["/m/SmolLM2.Q4.gguf", "SmolLM2.Q4"]
    assert ModelNames.of("org/name", served="mine").names == ["mine"]
    assert short_name("/models/llama/") == "llama"
    with pytest.raises(ConveyorError, match="max_choices must be at least 1"):
        ServingLimits(max_choices=0)


# -- the HTTP app in-process ---------------------------------------------------------

@pytest.mark.parametrize("prompt_bytes", [2_000, 40_000])
def test_tokenizing_never_stalls_the_event_loop(tiny_llama_dir, monkeypatch, prompt_bytes):
    """A prompt is tokenized off the event loop, whatever its size: while
    encode() is held still, /health is answered (it releases encode)."""
    from engine.entrypoints.async_llm import AsyncLLM
    from engine.entrypoints.openai.server import build_app

    llm = AsyncLLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20)
    tokenizer = llm.engine.tokenizer
    real_encode = tokenizer.encode
    held, health_answered = threading.Event(), threading.Event()

    def slow_encode(text, *args, **kwargs):
        if len(text) >= prompt_bytes:
            held.set()
            # On the event loop, /health could not be answered: this times out.
            assert health_answered.wait(10), "/health waited for the tokenizer"
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", slow_encode)
    app = build_app(llm, model_name="tiny")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            big = asyncio.ensure_future(c.post(C, json={
                "prompt": "x" * prompt_bytes, "max_tokens": 2, "truncate_prompt_tokens": 8}))
            await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)
            health = await c.get("/health")
            health_answered.set()
            return health, await big

    try:
        health, answer = asyncio.run(main())
    finally:
        llm.close()
    assert health.status_code == 200
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == 8


def test_embedding_requests_beyond_the_queue_limit_are_429():
    from engine.entrypoints.openai.server import build_app

    release = asyncio.Event()

    class StuckEmbedder:
        name, dim, max_length = "emb", 4, 8

        async def embed(self, texts):
            await release.wait()
            raise AssertionError("released only at the end")

    app = build_app(None, StuckEmbedder(), limits=ServingLimits(max_waiting=2))
    server = app.state.server

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            waiting = [asyncio.ensure_future(c.post(E, json={"input": "a"})) for _ in range(2)]
            while server.embeddings_waiting < 2:
                await asyncio.sleep(0)
            refused = await c.post(E, json={"input": "a"})
            release.set()
            await asyncio.gather(*waiting, return_exceptions=True)
            return refused

    refused = asyncio.run(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
