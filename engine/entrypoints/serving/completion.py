"""/v1/completions: prompts (text or token ids) × n choices, echo and
OpenAI's legacy logprobs."""

from __future__ import annotations

from engine.core.outputs import Logprob, RequestOutput
from engine.entrypoints.serving.generation import GenerationServing, PreparedGeneration
from engine.entrypoints.serving.protocol import (
    COMPLETIONS_URL,
    CompletionRequest,
    completion_prompts,
)
from engine.entrypoints.serving.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
)


class CompletionServing(GenerationServing):
    """OpenAI's completions over a GenerationModel (vLLM's OpenAIServingCompletion)."""

    url = COMPLETIONS_URL
    id_prefix = "cmpl"
    response_type = CompletionResponse

    def prompts(self, request: CompletionRequest, tools: None = None) -> list[str | list[int]]:
        return completion_prompts(request)

    def choice(self, prepared: PreparedGeneration, index: int, output: RequestOutput,
               *, first: bool = True) -> CompletionChoice:
        request: CompletionRequest = prepared.request
        result = output.outputs[0]
        prefix = ""
        if request.echo and first:
            prefix = self.model.tokenizer.decode(output.prompt_token_ids)
        logprobs = None
        if request.logprobs is not None and result.logprobs:
            logprobs = self._logprobs(result.logprobs, len(prefix))
        return CompletionChoice(index=index, text=prefix + result.text, logprobs=logprobs,
                                finish_reason=result.finish_reason,
                                stop_reason=result.stop_reason)

    def _logprobs(self, logprobs: list[Logprob], offset: int) -> CompletionLogprobs:
        tokens, values, tops, offsets = [], [], [], []
        for lp in logprobs:
            token = self.token_text(lp.token_id)
            offsets.append(offset)
            offset += len(token)
            tokens.append(token)
            values.append(lp.logprob)
            tops.append({self.token_text(t): v for t, v in lp.top} if lp.top else None)
        return CompletionLogprobs(text_offset=offsets, token_logprobs=values, tokens=tokens,
                                  top_logprobs=tops)
