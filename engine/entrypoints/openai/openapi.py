"""The server's OpenAPI 3.1 document, its schemas generated from the Structs."""

from __future__ import annotations

from typing import Any

import msgspec

from engine.entrypoints.openai.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from engine.entrypoints.serving import protocol as proto
from engine.entrypoints.serving import responses as resp
from engine.entrypoints.serving import tokenization as tok
from engine.entrypoints.serving.errors import ErrorResponse


class Health(msgspec.Struct, kw_only=True):
    status: str


_ERRORS = {400: "Invalid request", 401: "Missing or wrong API key",
           403: "Host header not allowed", 404: "Unknown model",
           413: "Request body too large", 415: "Content-Type is not application/json",
           429: "Too many requests waiting"}


def openapi_json(with_auth: bool = False) -> bytes:
    types = [proto.CompletionRequest, proto.ChatCompletionRequest, proto.EmbeddingRequest,
             resp.CompletionResponse, resp.ChatCompletionResponse, resp.EmbeddingResponse,
             resp.CompletionChunk, resp.ChatCompletionChunk, resp.ModelList, resp.ModelCard,
             tok.TokenizeRequest, tok.TokenizeResponse, tok.DetokenizeRequest,
             tok.DetokenizeResponse, Health, ErrorResponse]
    (_, components) = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}")

    def ref(t: type) -> dict:
        return {"$ref": f"#/components/schemas/{t.__name__}"}

    def json_content(t: type) -> dict:
        return {"application/json": {"schema": ref(t)}}

    errors = {str(code): {"description": text, "content": json_content(ErrorResponse)}
              for code, text in _ERRORS.items()}
    security = [{"bearer": []}] if with_auth else []

    def post(body: type, result: type, chunk: type | None, summary: str) -> dict:
        ok = json_content(result)
        if chunk is not None:  # stream: true answers with server-sent events of `chunk`
            ok["text/event-stream"] = {"schema": {"type": "string"},
                                       "x-event-schema": ref(chunk)}
        return {"post": {"summary": summary, "security": security,
                         "requestBody": {"required": True, "content": json_content(body)},
                         "responses": {"200": {"description": "OK", "content": ok},
                                       **errors}}}

    def get(result: dict, summary: str, codes=(), secured: bool = True) -> dict:
        op = {"summary": summary, "responses": {"200": {"description": "OK",
                                                        "content": result},
                                                "403": errors["403"]}}
        if secured:
            op["security"] = security
            op["responses"]["401"] = errors["401"]
        for code in codes:
            op["responses"][str(code)] = errors[str(code)]
        return {"get": op}

    paths = {
        proto.COMPLETIONS_URL: post(proto.CompletionRequest, resp.CompletionResponse,
                                    resp.CompletionChunk, "Complete a prompt"),
        proto.CHAT_COMPLETIONS_URL: post(proto.ChatCompletionRequest,
                                         resp.ChatCompletionResponse,
                                         resp.ChatCompletionChunk, "Answer a conversation"),
        proto.EMBEDDINGS_URL: post(proto.EmbeddingRequest, resp.EmbeddingResponse, None,
                                   "Embed texts"),
        tok.TOKENIZE_URL: post(tok.TokenizeRequest, tok.TokenizeResponse, None,
                               "Token ids of a prompt or a conversation"),
        tok.DETOKENIZE_URL: post(tok.DetokenizeRequest, tok.DetokenizeResponse, None,
                                 "Text of token ids"),
        "/v1/models": get(json_content(resp.ModelList), "List the served models"),
        "/v1/models/{model}": {"get": {
            **get(json_content(resp.ModelCard), "One served model", codes=(404,))["get"],
            "parameters": [{"name": "model", "in": "path", "required": True,
                            # Plain names: fuzzed ids with "/" or "." would be
                            # normalised away by clients before they reach us.
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}
                           ]}},
        "/health": get(json_content(Health), "Liveness", secured=False),
        "/metrics": get({METRICS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                        "Prometheus metrics", secured=False),
    }
    paths["/health"]["get"]["responses"]["503"] = {"description": "The engine has failed",
                                                   "content": json_content(Health)}
    for path in (proto.COMPLETIONS_URL, proto.CHAT_COMPLETIONS_URL):
        paths[path]["post"]["responses"]["500"] = {
            "description": "The engine failed", "content": json_content(ErrorResponse)}
        paths[path]["post"]["responses"]["503"] = {
            "description": "The engine has failed; restart the server",
            "content": json_content(ErrorResponse)}
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Conveyor", "version": "1",
                 "description": "OpenAI-compatible API of the Conveyor engine"},
        "paths": paths,
        "components": {"schemas": components},
    }
    if with_auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                "scheme": "bearer"}}
    return msgspec.json.encode(document)
