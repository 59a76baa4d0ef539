"""Anthropic's error envelope ``{"type": "error", "error": {"type", "message"}}``.

On ``/v1/messages`` every error the client sees is in this shape, because the ``anthropic`` SDK
reads ``error.message`` from it; the gateway's own errors (auth, limits, timeouts) carry the
OpenAI envelope inside the pipeline and are re-wrapped here with the same status and message.
"""

from __future__ import annotations

from typing import Any

import orjson

from onwards_trio._errors import HTTPError
from onwards_trio._transport.sse import encode_event

__all__ = [
    "body",
    "error_event",
    "error_type",
    "from_http_error",
    "from_upstream",
    "http_error",
]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_GENERIC = {
    400: "Invalid request.",
    401: "Authentication failed.",
    403: "Permission denied.",
    404: "Not found.",
    429: "Rate limit exceeded.",
}
_UPSTREAM_FAILED = "The upstream model returned an error."


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status (``api_error`` for the rest)."""
    return _TYPES.get(status, "api_error")


def body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": error_type(status), "message": message}}
    )


def http_error(message: str, status: int = 400) -> HTTPError:
    """An error answer of this route (``invalid_request_error`` for a 400)."""
    return HTTPError(status, body(status, message))


def _message_of(raw: bytes) -> str | None:
    """The message of an OpenAI- or Anthropic-shaped error body, if it has one."""
    try:
        parsed: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    err = parsed.get("error") if type(parsed) is dict else None
    message = err.get("message") if type(err) is dict else None
    return message if type(message) is str and message else None


def from_http_error(exc: HTTPError) -> HTTPError:
    """A gateway error (OpenAI envelope) re-wrapped for this route, headers kept."""
    message = _message_of(exc.body) or _GENERIC.get(exc.status, _UPSTREAM_FAILED)
    return HTTPError(exc.status, body(exc.status, message), exc.headers)


def from_upstream(status: int, raw: bytes) -> bytes:
    """The client's error body for a non-2xx answer of the Chat upstream: its message (the
    proxy relays upstream errors verbatim on every route, so this reveals nothing more) in
    Anthropic's envelope."""
    return body(status, _message_of(raw) or _GENERIC.get(status, _UPSTREAM_FAILED))


def error_event(status: int, message: str) -> bytes:
    """An ``error`` SSE event: the only way the SDK notices a stream that was cut short."""
    return encode_event(body(status, message), event="error")
