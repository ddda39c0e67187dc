"""The offline Python API, shaped like vLLM's `LLM`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import numpy as np
from tqdm import tqdm

from engine.core.llm_engine import EngineArgs, LLMEngine
from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams
from engine.errors import ConveyorError
from engine.loading.chat_tools import render_chat

# A prompt: text, token ids, or vLLM's {"prompt": text} / {"prompt_token_ids": ids}.
Prompt = str | list[int] | dict[str, Any]


class LLM:
    """Load a model once and run many requests through the continuous-batching
    engine. `model=None` is the default model (SmolLM2-135M-Instruct for
    generation, all-MiniLM-L6-v2 for `task="embed"`)."""

    def __init__(self, model: str | None = None, *, task: str = "generate", **engine_args: Any):
        if task not in ("generate", "embed"):
            raise ConveyorError(f"unknown task {task!r}; choose 'generate' or 'embed'")
        self.task = task
        self._embedder = None
        self.engine: LLMEngine | None = None
        if task == "embed":
            from engine.embedding.embedder import Embedder

            self._embedder = Embedder.load(model, **engine_args)
        else:
            try:  # convert, not the constructor: it checks every field's type
                args = msgspec.convert({"model": model, **engine_args}, EngineArgs)
            except msgspec.ValidationError as exc:
                raise ConveyorError(f"invalid engine argument: {exc}") from None
            self.engine = LLMEngine.from_args(args)

    @property
    def tokenizer(self):
        return self._require_engine().tokenizer

    def _require_engine(self) -> LLMEngine:
        if self.engine is None:
            raise ConveyorError("this LLM was created with task='embed'; use embed()")
        return self.engine

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        engine = self._require_engine()
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt(p) for p in prompts]
        params = _per_prompt(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p).request_id)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            with bar:
                while any(r is None for r in results) and engine.has_unfinished():
                    for request in engine.step():
                        if request.finished and request.request_id in order:
                            results[order[request.request_id]] = request.output(delta=False)
                            bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort_request(rid)
            raise
        return results

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, *, tools: list[dict[str, Any]] | None = None,
             add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of OpenAI-style
        messages) or to several (a list of them), through the model's chat
        template; `tools` (OpenAI tool dicts) are offered to the model as
        the template shows them (engine/loading/chat_tools.py)."""
        tokenizer = self.tokenizer
        conversations = ([messages] if messages and isinstance(messages[0], dict)
                         else list(messages))
        prompts = []
        for conversation in conversations:
            text = render_chat(tokenizer, [_text_content(m) for m in conversation], tools,
                               add_generation_prompt=add_generation_prompt,
                               **(chat_template_kwargs or {}))
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               ) -> Iterator[RequestOutput]:
        """Yield deltas (new text and token ids) as the request runs; other
        requests already queued in this engine keep running alongside it."""
        engine = self._require_engine()
        request = engine.add_request(_prompt(prompt), sampling_params)
        try:
            while not request.finished:
                for touched in engine.step():
                    if touched is request:
                        out = request.output(delta=True)
                        if out.outputs[0].text or out.outputs[0].token_ids or out.finished:
                            yield out
        finally:
            if not request.finished:
                engine.abort_request(request.request_id)

    def embed(self, texts: Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """Embeddings as a float32 array (len(texts), dim) (task='embed')."""
        if self._embedder is None:
            raise ConveyorError("embed() needs LLM(..., task='embed')")
        return self._embedder.embed(list(texts), truncate=truncate).vectors

    def stats(self):
        return self._require_engine().stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (as vLLM's LLM.reset_prefix_cache)."""
        self._require_engine().reset_prefix_cache()


def _text_content(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of text parts, with the parts joined
    (templates expect a string)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        raise ConveyorError("message content parts must be text")
    return {**message, "content": "".join(p.get("text", "") for p in content)}


def _prompt(prompt: Prompt) -> str | list[int]:
    """Text or token ids from any accepted prompt form."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ConveyorError("prompt_token_ids must be a list of token ids")
        return ids
    if isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    raise ConveyorError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ConveyorError(f"{len(params)} sampling params for {n} prompts")
    return params
