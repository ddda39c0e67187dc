"""/v1/chat/completions: messages (and tools) through the model's chat
template, n choices, chat-style logprobs, and tool calls parsed out of the
answers (engine/entrypoints/serving/tools.py)."""

from __future__ import annotations

from engine.core.outputs import Logprob, RequestOutput
from engine.entrypoints.serving.errors import bad_request
from engine.entrypoints.serving.generation import (
    GenerationServing,
    PreparedGeneration,
    token_bytes,
)
from engine.entrypoints.serving.protocol import (
    CHAT_COMPLETIONS_URL,
    ChatCompletionRequest,
    chat_messages,
)
from engine.entrypoints.serving.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
)
from engine.entrypoints.serving.tools import ToolPlan
from engine.errors import ConveyorError
from engine.loading.chat_tools import render_chat


class ChatServing(GenerationServing):
    """OpenAI's chat completions over a GenerationModel (vLLM's OpenAIServingChat)."""

    url = CHAT_COMPLETIONS_URL
    id_prefix = "chatcmpl"
    response_type = ChatCompletionResponse

    def tool_plan(self, request: ChatCompletionRequest) -> ToolPlan | None:
        return ToolPlan.of(request, self.model.tokenizer.chat_template)

    def prompts(self, request: ChatCompletionRequest, tools: ToolPlan | None = None
                ) -> list[str | list[int]]:
        tokenizer = self.model.tokenizer
        try:
            text = render_chat(tokenizer, chat_messages(request), tools.tools if tools else None,
                               add_generation_prompt=request.add_generation_prompt)
        except ConveyorError as exc:  # no template, or one that refuses these messages
            raise bad_request(str(exc), "messages") from None
        return [tokenizer.encode(text, add_special_tokens=False)]

    @staticmethod
    def requested_max_tokens(request: ChatCompletionRequest) -> int | None:
        return request.max_completion_tokens or request.max_tokens

    @staticmethod
    def num_logprobs(request: ChatCompletionRequest) -> int | None:
        return (request.top_logprobs or 0) if request.logprobs else None

    def choice(self, prepared: PreparedGeneration, index: int, output: RequestOutput,
               *, first: bool = True) -> ChatChoice:
        result = output.outputs[0]
        logprobs = None
        if prepared.request.logprobs and result.logprobs:
            logprobs = ChatLogprobs(content=[self._logprob(lp) for lp in result.logprobs])
        finish_reason = result.finish_reason
        if prepared.tools is None:
            message = AssistantMessage(content=result.text)
        else:
            content, calls = prepared.tools.parse(result.text)
            message = AssistantMessage(content=content, tool_calls=calls)
            if calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        return ChatChoice(index=index, message=message, logprobs=logprobs,
                          finish_reason=finish_reason, stop_reason=result.stop_reason)

    def _logprob(self, lp: Logprob) -> ChatTokenLogprob:
        tokenizer = self.model.tokenizer
        token = self.token_text(lp.token_id)
        top = []
        for token_id, value in lp.top or ():
            text = self.token_text(token_id)
            top.append(TopLogprob(token=text, logprob=value,
                                  bytes=token_bytes(tokenizer, token_id, text)))
        return ChatTokenLogprob(token=token, logprob=lp.logprob,
                                bytes=token_bytes(tokenizer, lp.token_id, token),
                                top_logprobs=top)
