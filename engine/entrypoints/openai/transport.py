"""What HTTP adds around the serving layer: reading a JSON body within its
limit, the API key, and the guards a server on localhost needs against web
pages (a JSON Content-Type, so no page can post a "simple" cross-site
request; a Host header naming this machine, against DNS rebinding)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from engine.entrypoints.serving.errors import ServingError, too_large

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def json_response(body: msgspec.Struct, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status,
                    media_type="application/json", headers=headers)


def error_response(error: ServingError) -> Response:
    """OpenAI's error body with the error's status (and headers, e.g. Retry-After)."""
    return json_response(error.body(), error.status, error.headers)


async def read_json_body(request: Request, max_bytes: int) -> bytes:
    """The body of a JSON POST: a 415 for another Content-Type, a 413 past
    `max_bytes` (counted as it arrives, so no length header is trusted)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ServingError(415, f"Content-Type must be application/json, not "
                           f"{media_type or 'missing'}", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def check_api_key(request: Request, key: bytes | None) -> None:
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
        raise ServingError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def host_name(header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostGuard:
    """ASGI middleware: a 403 for a request whose Host header is not one of
    `allowed` names. A page on evil.example whose name is re-pointed at
    127.0.0.1 (DNS rebinding) still sends "Host: evil.example", so a server
    bound to loopback refuses it."""

    def __init__(self, app, allowed: Iterable[str]):
        self.app = app
        self.allowed = {host_name(h) for h in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(host) not in self.allowed:
                error = ServingError(403, f"the Host header {host!r} is not allowed; this "
                                     "server answers to " + ", ".join(sorted(self.allowed)),
                                     code="host_not_allowed")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
