"""What completions and chat share: a checked request becomes engine inputs
(token ids and SamplingParams, one per choice), and finished engine outputs
become choices and usage. Subclasses say how a body becomes prompts and how
an output becomes a choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.core.outputs import RequestOutput
from engine.core.sampling_params import SamplingParams, StructuredOutputsParams
from engine.entrypoints.serving.errors import (
    ServingError,
    bad_request,
    engine_failed,
    field_named,
)
from engine.entrypoints.serving.limits import ServingLimits
from engine.entrypoints.serving.models import GenerationModel
from engine.entrypoints.serving.protocol import REQUEST_FIELDS, GenerationRequest
from engine.entrypoints.serving.responses import Usage, new_id, now
from engine.errors import RequestError
from scheduler.scheduler import RequestTooLong


class EngineInput(msgspec.Struct, frozen=True):
    """One engine request: prompt token ids and how to sample them."""

    prompt: list[int]
    params: SamplingParams


@dataclass
class PreparedGeneration:
    """A checked generation request: its engine inputs in choice order (the n
    choices of prompt 0, then of prompt 1, ... as vLLM orders them)."""

    url: str
    request: GenerationRequest
    model: str
    inputs: list[EngineInput]
    response_id: str
    created: int
    tools: Any = None   # chat's ToolPlan when tools are in play

    @property
    def n(self) -> int:
        return self.request.n


class GenerationServing:
    """Base of CompletionServing and ChatServing."""

    url = ""
    id_prefix = ""

    def __init__(self, model: GenerationModel, limits: ServingLimits):
        self.model, self.limits = model, limits

    # -- request -> engine inputs ----------------------------------------------
    def prepare(self, request: GenerationRequest) -> PreparedGeneration:
        """Check `request` and build its engine inputs. Raises ServingError.
        Tokenizes: callers on an event loop run it on a worker thread."""
        label = self.model.names.check(request.model, "generation")
        self._check_choices(request.n)  # before any work that grows with n
        tools = self.tool_plan(request)
        prompts = self.prompts(request, tools)
        self._check_choices(request.n * len(prompts))
        constraint = self.structured_outputs(request, tools)
        inputs = []
        for prompt in prompts:
            ids = self._token_ids(prompt)
            ids, max_tokens = self._fit(request, ids)
            params = self.sampling_params(request, max_tokens, constraint, tools)
            for i in range(request.n):
                # A fixed seed is shifted per choice so n > 1 gives n answers.
                seed = None if request.seed is None else request.seed + i
                inputs.append(EngineInput(ids, msgspec.structs.replace(params, seed=seed)))
        return PreparedGeneration(self.url, request, label, inputs,
                                  new_id(self.id_prefix), now(), tools)

    def _check_choices(self, total: int) -> None:
        if total > self.limits.max_choices:
            raise bad_request(f"at most {self.limits.max_choices} choices (prompts × n) per "
                              f"request; this one asks for {total}", "n")

    def prompts(self, request: GenerationRequest, tools: Any = None) -> list[str | list[int]]:
        """The request's prompts: text (tokenized later) or token ids."""
        raise NotImplementedError

    def tool_plan(self, request: GenerationRequest) -> Any:
        """How the request uses tools (chat only); None: not at all."""
        return None

    def structured_outputs(self, request: GenerationRequest, tools: Any = None
                           ) -> StructuredOutputsParams | None:
        """The request's output constraint, compiled (and cached) here, on the
        caller's thread, so the engine finds it ready; a 400 if it is invalid."""
        field, constraint = requested_constraint(request)
        if constraint is None and tools is not None:
            field, constraint = "tool_choice", tools.constraint()
        if constraint is None:
            return None
        try:
            self.model.engine.compile_grammar(SamplingParams(structured_outputs=constraint))
        except RequestError as exc:
            raise bad_request(str(exc), field) from None
        return constraint

    def encode(self, text: str) -> list[int]:
        return self.model.tokenizer.encode(text)

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        vocab = self.model.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompt

    @staticmethod
    def requested_max_tokens(request: GenerationRequest) -> int | None:
        return request.max_tokens

    def _fit(self, request: GenerationRequest, ids: list[int]) -> tuple[list[int], int]:
        """The prompt, cut as `truncate_prompt_tokens` asks, and max_tokens
        (when not given: the rest of the context, as OpenAI and vLLM do);
        a 400 if they cannot run."""
        context = self.model.max_model_len
        requested = self.requested_max_tokens(request)
        keep = request.truncate_prompt_tokens
        if keep == -1:  # as many as fit next to max_tokens
            keep = context - (requested or 1)
        if keep is not None and 0 < keep < len(ids):
            ids = ids[-keep:]
        max_tokens = requested or max(1, context - len(ids))
        try:
            self.model.check_fits(len(ids), max_tokens)
        except RequestTooLong as exc:
            prompt_alone = requested is None or len(ids) >= context or not ids
            hint = ("; set truncate_prompt_tokens to keep only the prompt's last tokens"
                    if prompt_alone and ids and keep is None else "")
            raise bad_request(f"{exc}{hint}", "prompt" if prompt_alone else "max_tokens"
                              ) from None
        return ids, max_tokens

    def sampling_params(self, request: GenerationRequest, max_tokens: int,
                        constraint: StructuredOutputsParams | None = None,
                        tools: Any = None) -> SamplingParams:
        """The SamplingParams of one choice (seed unshifted)."""
        fields: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "repetition_penalty": request.repetition_penalty,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "seed": request.seed,
            "stop": request.stop,
            "stop_token_ids": request.stop_token_ids,
            "ignore_eos": request.ignore_eos,
            "logprobs": self.num_logprobs(request),
            "skip_special_tokens": request.skip_special_tokens,
        }
        if tools is not None and tools.parser.needs_special_tokens and not tools.forced:
            fields["skip_special_tokens"] = False  # the call marker is a special token
        try:
            params = msgspec.convert({k: v for k, v in fields.items() if v is not None},
                                     SamplingParams)
        except (msgspec.ValidationError, RequestError) as exc:
            message = f"invalid sampling parameter: {exc}"
            raise bad_request(message, field_named(str(exc), REQUEST_FIELDS)) from None
        params.structured_outputs = constraint
        return params

    @staticmethod
    def num_logprobs(request: GenerationRequest) -> int | None:
        return request.logprobs

    # -- engine outputs -> response ----------------------------------------------
    response_type: type = msgspec.Struct   # the subclass's response body

    def respond(self, prepared: PreparedGeneration, outputs: Sequence[RequestOutput]):
        """The response body for the finished outputs of `prepared.inputs`, in
        the same order; a 500 ServingError if the engine failed one."""
        check_outputs(outputs)
        choices = [self.choice(prepared, i, out) for i, out in enumerate(outputs)]
        return self.response_type(id=prepared.response_id, created=prepared.created,
                                  model=prepared.model, choices=choices,
                                  usage=usage(outputs, prepared.n))

    def choice(self, prepared: PreparedGeneration, index: int, output: RequestOutput,
               *, first: bool = True):
        """The choice for `output` (whole, or a stream delta; `first`: the
        choice's first piece, which carries an echoed prompt)."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        return self.model.tokenizer.decode([token_id])


def requested_constraint(request: GenerationRequest
                         ) -> tuple[str | None, StructuredOutputsParams | None]:
    """(request field, constraint) from response_format, structured_outputs or
    a guided_* field (protocol.check_supported allows one at most)."""
    fmt = request.response_format or {}
    kind = fmt.get("type", "text")
    try:
        if kind == "json_object":
            return "response_format", StructuredOutputsParams(json_object=True)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise bad_request("response_format json_schema needs json_schema.schema",
                                  "response_format")
            return "response_format", StructuredOutputsParams(json=schema)
        if request.structured_outputs is not None:
            return "structured_outputs", StructuredOutputsParams(
                **msgspec.structs.asdict(request.structured_outputs))
        guided = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
        for name, key in guided.items():
            value = getattr(request, name)
            if value is not None:
                return name, StructuredOutputsParams(**{key: value})
    except RequestError as exc:
        if isinstance(exc, ServingError):
            raise
        raise bad_request(str(exc), "structured_outputs") from None
    return None, None


def check_outputs(outputs: Sequence[RequestOutput | None]) -> None:
    for out in outputs:
        if out is None:
            raise engine_failed("the request did not finish")
        if out.error:
            raise engine_failed(out.error)


def usage(outputs: Sequence[RequestOutput], n: int) -> Usage:
    """Token counts; the n choices of one prompt come together and share it."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs[::n])
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """A token's own bytes: a byte-level token may be part of a UTF-8
    character, whose replacement character is all its text decodes to."""
    table = tokenizer.byte_table() if hasattr(tokenizer, "byte_table") else None
    if table and 0 <= token_id < len(table):
        return list(table[token_id])
    return list(text.encode())
