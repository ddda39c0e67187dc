"""The one error every entry point answers with: an HTTP status plus
OpenAI's error body. The server sends it as the response, the batch runner
writes it into the line's record, the queue worker into the job's result."""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from engine.errors import ConveyorError, RequestError


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


class ServingError(RequestError):
    """A request answered with an error: `status` (4xx: the client's doing,
    5xx: ours) and the fields of OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code))


_FIELD_AT = re.compile(r"at `\$\.([A-Za-z_]+)")
_FIELD_NAMED = re.compile(r"field `([A-Za-z_]+)`")


def field_named(message: str, fields: Iterable[str] = ()) -> str | None:
    """The request field an error message is about: msgspec's `$.field` or
    "field `x`", else the message's first word when it is one of `fields`."""
    match = _FIELD_AT.search(message) or _FIELD_NAMED.search(message)
    if match:
        return match.group(1)
    first = re.split(r"[\s=:,]", message, maxsplit=1)[0]
    return first if first in set(fields) else None


def bad_request(message: str, param: str | None = None, *,
                code: str | None = None) -> ServingError:
    """A 400: the request cannot be served as given."""
    return ServingError(400, message, param=param, code=code)


def model_not_found(message: str) -> ServingError:
    return ServingError(404, message, param="model", code="model_not_found")


def unknown_url(url: str, known: Iterable[str]) -> ServingError:
    return ServingError(404, f"unsupported url {url!r}; expected one of {', '.join(known)}",
                        code="unknown_url")


def too_large(limit: int) -> ServingError:
    return ServingError(413, f"request body is larger than {limit} bytes",
                        code="request_too_large")


def engine_failed(message: str) -> ServingError:
    return ServingError(500, message, type="server_error")


def as_serving_error(exc: BaseException, fields: Iterable[str] = ()) -> ServingError:
    """Any exception as the error a client gets: a ServingError as it is, a
    ConveyorError (the request's fault) as a 400, anything else as a 500
    that says nothing of our internals."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ConveyorError):
        return bad_request(str(exc), field_named(str(exc), fields))
    return ServingError(500, "internal server error", type="server_error")
