"""Strict mode (``"strict_mode": true``): typed routes, validated requests, closed responses.

For gateways in front of third-party providers. Only the OpenAI routes the gateway understands
are served (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses``, ``/v1/models``, ``/models``); anything else is a JSON 404. Requests are
validated against the schemas in :mod:`._strict_schemas` before routing, with JSON errors that
name the offending field (400 malformed JSON, 415 wrong content type, 413 too large, 422 schema
errors), client-supplied ids are scrubbed, and the request is re-serialised and forwarded with
``accept-encoding`` removed.

Responses pass through :func:`strict_filter`: successes are coerced into closed schemas (unknown
fields dropped, ``model`` rewritten to the requested alias, missing non-critical fields
backfilled, ``content-length`` recomputed), upstream errors are standardised by status unless
the provider that answered is trusted, and account-class statuses from untrusted providers are
masked. Gateway-generated errors (auth, limits, timeouts) are not upstream replies and reach
the client unchanged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from onwards_trio import _errors as errors
from onwards_trio._errors import HTTPError, error_body
from onwards_trio._ops.logs import note_request
from onwards_trio._proxy.pipeline import FilterContext, ProxyRequest, ResponseFilter, UpstreamReply
from onwards_trio._proxy.sanitize import (
    FormatError,
    StreamSanitizer,
    generic_error_body,
    is_json_type,
    json_reply,
    sanitize_filter,
    sse_reply,
    stream_error_formatter,
    upstream_error,
)
from onwards_trio._proxy.strict_schemas import (
    CHAT_CHUNK,
    CHAT_COMPLETION,
    CHAT_REQUEST,
    COMPLETION,
    COMPLETION_CHUNK,
    COMPLETIONS_REQUEST,
    EMBEDDINGS,
    EMBEDDINGS_REQUEST,
    RESPONSE,
    RESPONSE_EVENT,
    RESPONSES_REQUEST,
    FallbackId,
    SchemaError,
    Validator,
    backfill_chat,
    backfill_chat_chunk,
    backfill_completion,
    backfill_completion_chunk,
    backfill_response,
    normalise_response_event,
)
from onwards_trio._transport.asgi import ClientDisconnected, Receive, Scope, Send, send_error

if TYPE_CHECKING:
    from onwards_trio._proxy.targets import Provider

__all__ = [
    "SCRUBBED_REQUEST_KEYS",
    "STRICT_ROUTES",
    "ResponsesHook",
    "check_content_type",
    "handle_strict",
    "response_filter",
    "standard_error",
    "strict_error_body",
    "strict_filter",
    "validate_request",
]

log = logging.getLogger("onwards_trio.strict")

STRICT_ROUTES: dict[str, Validator] = {
    "/v1/chat/completions": CHAT_REQUEST,
    "/v1/completions": COMPLETIONS_REQUEST,
    "/v1/embeddings": EMBEDDINGS_REQUEST,
    "/v1/responses": RESPONSES_REQUEST,
}
_MODEL_ROUTES = frozenset({"/v1/models", "/models"})

# Ids a client must not inject into the upstream request (v0.34.3): the upstream would echo
# them, and they would then pass for ids the gateway or the provider issued.
SCRUBBED_REQUEST_KEYS = ("id", "response_id", "completion_id")

_DROPPED_REQUEST_HEADERS = frozenset({b"content-type", b"accept-encoding", b"content-length"})
_JSON_CT = (b"content-type", b"application/json")

# Hook for ``POST /v1/responses`` after validation: the Open Responses adapter answers for
# aliases in adapter mode and returns the status; ``None`` means "not mine" (passthrough).
ResponsesHook = Callable[[ProxyRequest, Receive, Send], Awaitable[int | None]]


# --- errors ---------------------------------------------------------------------------------

_STANDARD: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "Authentication failed"),
    402: ("api_error", "Payment required"),
    403: ("permission_error", "Permission denied"),
    404: ("not_found_error", "Not found"),
    408: ("api_error", "Request timeout"),
    413: ("invalid_request_error", "Request too large"),
    422: ("invalid_request_error", "Unprocessable request"),
    429: ("rate_limit_error", "Rate limit exceeded"),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("api_error", "Gateway timeout"),
}
_OTHER = ("api_error", "An error occurred")


def standard_error(status: int) -> tuple[str, str]:
    """``(type, message)`` of the standard strict error for ``status``."""
    return _STANDARD.get(status, _OTHER)


def strict_error_body(status: int) -> bytes:
    """``{"error": {"message", "type", "param": null, "code": null}}`` for ``status``."""
    type_, message = standard_error(status)
    return error_body(message, type_)


def _strict_http_error(status: int) -> HTTPError:
    return HTTPError(status, strict_error_body(status))


def _bad_gateway() -> HTTPError:
    return _strict_http_error(502)


# --- request validation ---------------------------------------------------------------------


def _unprocessable(exc: SchemaError) -> HTTPError:
    path = exc.path or None
    return HTTPError(
        422,
        error_body(
            f"Invalid request: {exc.message}",
            "invalid_request_error",
            "unprocessable_request",
            path,
        ),
    )


def check_content_type(headers: list[tuple[bytes, bytes]]) -> None:
    """415 unless the request says it is JSON (``application/json`` or ``*/*+json``)."""
    if not is_json_type(headers):
        raise HTTPError(
            415,
            error_body(
                "Unsupported content type: expected 'application/json'.",
                "invalid_request_error",
                "unsupported_media_type",
            ),
        )


def validate_request(
    path: str, headers: list[tuple[bytes, bytes]], body: bytes, parsed: Any = None
) -> Any:
    """The validated, normalised request body for a strict route, or :class:`HTTPError`.

    415 when the content type is not JSON, 400 for malformed JSON, 422 (``param`` = the JSON
    path) when the body does not fit the schema. ``parsed`` is the body already parsed, if
    the caller has it (``None`` means "parse it here").
    """
    check_content_type(headers)
    try:
        data = parsed if parsed is not None else orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(
            400,
            error_body(f"Malformed JSON body: {exc}", "invalid_request_error", "bad_request"),
        ) from None
    try:
        out = STRICT_ROUTES[path](data)
    except SchemaError as exc:
        raise _unprocessable(exc) from None
    for key in SCRUBBED_REQUEST_KEYS:
        out.pop(key, None)
    if path == "/v1/responses":
        for tool in out.get("tools") or ():
            if tool.get("type") == "function":
                tool["parameters"].setdefault("additionalProperties", False)
    return out


def _method_not_allowed(path: str, allow: bytes) -> HTTPError:
    return HTTPError(
        405,
        error_body(f"Method not allowed on {path}.", "invalid_request_error", "method_not_allowed"),
        [(b"allow", allow)],
    )


async def handle_strict(
    gateway: Any,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    responses: ResponsesHook | None = None,
) -> int:
    """Serve one request in strict mode; returns the status.

    ``gateway`` is the :class:`~onwards_trio._app.gateway.Gateway` (``read_request`` and ``relay``
    are used); ``responses`` is consulted for ``POST /v1/responses`` after validation. The
    stored-responses routes under ``/v1/responses/`` are not strict mode's: the gateway routes
    them elsewhere before calling this.
    """
    path: str = scope["path"]
    method: str = scope["method"]
    try:
        if path not in STRICT_ROUTES:
            if path in _MODEL_ROUTES:
                raise _method_not_allowed(path, b"GET, HEAD")
            raise errors.not_found(path)
        if method != "POST":
            raise _method_not_allowed(path, b"POST")
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        check_content_type(headers)  # before reading a body we would refuse
        try:
            request: ProxyRequest = await gateway.read_request(scope, receive)
        except ClientDisconnected:
            return 499
        note_request(request)  # alias, provider, attempts and size on the access line
        data = validate_request(path, request.headers, request.body, request.json)
    except HTTPError as exc:
        await send_error(send, exc)
        return exc.status
    request.json = data
    request.body = orjson.dumps(data)
    request.raw_path = path.encode("ascii")  # the fixed route, never a percent-encoded twin
    request.query = b""
    request.headers = [(k, v) for k, v in request.headers if k not in _DROPPED_REQUEST_HEADERS]
    request.headers.append(_JSON_CT)
    if responses is not None and path == "/v1/responses":
        status = await responses(request, receive, send)
        if status is not None:
            return status
    result: int = await gateway.relay(request, receive, send)
    return result


# --- response filter ------------------------------------------------------------------------


def _route_kind(path: str) -> str | None:
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/responses"):
        return "responses"
    return None


class _StreamId:
    """One generated id per response or stream (``chatcmpl-…`` for every id-less chunk)."""

    __slots__ = ("_id", "_prefix")

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._id: str | None = None

    def __call__(self) -> str:
        if self._id is None:
            self._id = self._prefix + str(uuid.uuid4())
        return self._id


Coercer = Callable[[str, FallbackId], Callable[[Any], Any]]
Backfill = Callable[[dict[str, Any], str, FallbackId], None]


def _coercer(backfill: Backfill, schema: Validator) -> Coercer:
    """``(alias, fallback_id) -> coerce``: backfill a JSON object in place, fit it into the
    closed ``schema`` and rewrite ``model`` to the alias."""

    def make(alias: str, fallback_id: FallbackId) -> Callable[[Any], Any]:
        def coerce(obj: Any) -> Any:
            if type(obj) is dict:
                backfill(obj, alias, fallback_id)
            out = schema(obj)
            out["model"] = alias
            return out

        return coerce

    return make


def _set_model(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    obj["model"] = alias  # embeddings are not backfilled beyond the model


def _backfill_response_object(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    if "output" in obj:  # without it this is no Responses object: let the schema say so
        backfill_response(obj, alias, fallback_id)


chat_coercer = _coercer(backfill_chat, CHAT_COMPLETION)
chat_chunk_coercer = _coercer(backfill_chat_chunk, CHAT_CHUNK)
completion_coercer = _coercer(backfill_completion, COMPLETION)
completion_chunk_coercer = _coercer(backfill_completion_chunk, COMPLETION_CHUNK)
embeddings_coercer = _coercer(_set_model, EMBEDDINGS)
response_coercer = _coercer(_backfill_response_object, RESPONSE)


def response_event_coercer(alias: str, fallback_id: FallbackId) -> Callable[[Any], Any]:
    def coerce(obj: Any) -> Any:
        normalise_response_event(obj, alias, fallback_id)
        out = RESPONSE_EVENT(obj)
        snapshot = out.get("response")
        if snapshot is not None:
            snapshot["model"] = alias
        return out

    return coerce


_ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-", "responses": "resp_", "embeddings": ""}
_WHOLE = {
    "chat": chat_coercer,
    "completions": completion_coercer,
    "embeddings": embeddings_coercer,
    "responses": response_coercer,
}
_STREAMED = {
    "chat": chat_chunk_coercer,
    "completions": completion_chunk_coercer,
    "responses": response_event_coercer,
}


def _stream_error_body(code: int) -> bytes:
    """The standard strict error for ``code``, which stays in the body (the stream is a 200)."""
    type_, message = standard_error(code)
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def sse_error_formatter(trusted: bool) -> FormatError:
    """An error object inside a 200 stream: verbatim from a trusted provider, otherwise the
    standard strict error for its numeric ``code`` (500 when it has none), masked."""
    return stream_error_formatter(trusted, _stream_error_body)


def _wants_stream(reply: UpstreamReply, ctx: FilterContext) -> bool:
    """The upstream's content type decides; only when it says neither SSE nor JSON does the
    request's ``stream`` flag (a JSON answer to a streaming request is sanitised as JSON, not
    swallowed by the stream sanitiser, §5.3 item 15)."""
    if reply.is_sse:
        return True
    if is_json_type(reply.headers):
        return False
    return ctx.request.wants_stream


@attrs.frozen
class _StrictFilter:
    ctx: FilterContext
    kind: str | None

    async def __call__(self, reply: UpstreamReply) -> UpstreamReply:
        ctx = self.ctx
        if not 200 <= reply.status < 300:
            # A trusted provider's errors are relayed, unless the operator asked for sanitised
            # errors on it (``sanitize_response``): that wins over trust.
            sanitized = ctx.provider is not None and ctx.provider.sanitize
            trusted_body = generic_error_body if sanitized else None
            return await upstream_error(reply, ctx, strict_error_body, trusted_body)
        kind = self.kind
        if kind is None:
            # Only typed routes reach an upstream in strict mode; a success from anywhere else
            # has no schema to be coerced into, so it is refused rather than relayed raw.
            log.warning("strict mode: no schema for a reply to %s; refused", ctx.request.path)
            raise _bad_gateway()
        fallback_id = _StreamId(_ID_PREFIX[kind])
        if kind != "embeddings" and _wants_stream(reply, ctx):
            coerce = _STREAMED[kind](ctx.alias, fallback_id)
            sanitizer = StreamSanitizer(
                coerce, sse_error_formatter(ctx.trusted), max_event_size=ctx.max_event_size
            )
            return sse_reply(reply, sanitizer, _bad_gateway)
        return await json_reply(reply, _WHOLE[kind](ctx.alias, fallback_id), _bad_gateway)


def strict_filter(ctx: FilterContext) -> ResponseFilter | None:
    """Filter factory for strict mode: every upstream reply is standardised or coerced."""
    if not ctx.strict:
        return None
    return _StrictFilter(ctx, _route_kind(ctx.request.path))


class _ResponseFilter:
    """The one factory the gateway registers: strict mode, else ``sanitize_response``, else
    ``None`` (bytes relayed untouched)."""

    __slots__ = ()

    def __call__(self, ctx: FilterContext) -> ResponseFilter | None:
        return strict_filter(ctx) or sanitize_filter(ctx)

    @staticmethod
    def applies(strict: bool, provider: Provider | None) -> bool:
        """False when :meth:`__call__` would answer ``None`` for any context with these: the
        pipeline then builds none (the usual reply, from a plain target)."""
        return strict or (provider is not None and provider.sanitize)


response_filter = _ResponseFilter()
