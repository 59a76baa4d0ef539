"""``POST /v1/messages`` and ``/v1/messages/count_tokens``: the Anthropic Messages API over
any Chat Completions upstream, for aliases whose pool or provider says ``"anthropic":
{"adapter": true}``.

A request is validated and translated (:mod:`.request`), sent as a ``/v1/chat/completions``
call through the whole proxy pipeline — auth (``x-api-key`` counts as the client key, like a
bearer token), routing rules, limits, balancing, failover, per-provider reasoning mapping,
upstream auth, filters, metrics — and the answer translated back (:mod:`.response`,
:mod:`.stream`). Errors on these routes are in Anthropic's envelope. Aliases without the
adapter pass ``/v1/messages`` through untouched (an upstream that speaks Messages itself);
strict mode serves the route for adapter aliases only, since it relays nothing it cannot
type.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from onwards_trio._errors import HTTPError
from onwards_trio._loop.items import ChatChunkAssembler
from onwards_trio._proxy.auth import bearer_token
from onwards_trio._proxy.pipeline import UPSTREAM_ERRORS, ProxyRequest, UpstreamReply
from onwards_trio._proxy.strict import check_content_type
from onwards_trio._responses.model_transport import MODEL_CALL_DROP
from onwards_trio._transport.asgi import (
    JSON_HEADERS,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    send_response,
)
from onwards_trio._transport.sse import SSEDecoder, SSEEventTooLarge

from . import errors
from .request import ChatCall, TranslationError, count_tokens, to_chat
from .response import InvalidCompletion, to_message
from .stream import CUT_SHORT, StreamTranslator, message_events

if TYPE_CHECKING:
    from onwards_trio._app.gateway import Gateway

__all__ = ["ROUTES", "AnthropicService", "client_key", "models_page", "wants_anthropic"]

ROUTES = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
_COUNT = "/v1/messages/count_tokens"
# Client headers that belong to the Messages request, not to the Chat call made for it.
_DROP = MODEL_CALL_DROP | {b"anthropic-version", b"anthropic-beta", b"x-api-key"}
_CHAT_PATH = b"/v1/chat/completions"
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_ERROR_LIMIT = 64 * 1024
_UNTRANSLATABLE = "The upstream answer could not be translated into a message."
_BROKEN = "The upstream connection failed before its answer was complete."


def client_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The client's key: ``Authorization: Bearer`` first, else ``x-api-key``."""
    token = bearer_token(headers)
    if token is not None:
        return token
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1") or None
    return None


def wants_anthropic(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A client of the Anthropic API (it always sends ``anthropic-version``)."""
    return any(name == b"anthropic-version" for name, _ in headers)


def models_page(aliases: Sequence[str], created: float) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape (one page holding every alias)."""
    stamp = datetime.datetime.fromtimestamp(int(created), datetime.UTC).isoformat()
    stamp = stamp.replace("+00:00", "Z")
    data = [
        {
            "type": "model",
            "id": alias,
            "display_name": alias,
            "created_at": stamp,
            "lifecycle": "active",
        }
        for alias in aliases
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": aliases[0] if aliases else None,
        "last_id": aliases[-1] if aliases else None,
    }


def _as_bearer(request: ProxyRequest) -> None:
    """Let ``x-api-key`` authenticate like ``Authorization: Bearer`` (the pipeline checks
    the bearer token). Neither header ever reaches an upstream."""
    if bearer_token(request.headers) is not None:
        return
    key = client_key(request.headers)
    if key is not None:
        request.headers = [(k, v) for k, v in request.headers if k != b"authorization"]
        request.headers.append((b"authorization", b"Bearer " + key.encode("latin-1")))


async def _send_error(send: Send, exc: HTTPError) -> None:
    """Send a gateway error (OpenAI envelope inside the pipeline) in Anthropic's."""
    exc = errors.from_http_error(exc)
    await send_response(send, exc.status, [*JSON_HEADERS, *exc.headers], exc.body)


async def _fail(send: Send, exc: HTTPError) -> int:
    await _send_error(send, exc)
    return exc.status


class AnthropicService:
    """The Messages routes of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> int:
        gateway = self.gateway
        path: str = scope["path"]
        try:
            if scope["method"] != "POST":
                raise HTTPError(
                    405, errors.body(405, f"Method not allowed on {path}."), [(b"allow", b"POST")]
                )
            strict = gateway.targets.table.strict_mode
            if strict:
                check_content_type(scope["headers"])  # before reading a body we would refuse
            try:
                request = await gateway.read_request(scope, receive)
            except ClientDisconnected:
                return 499
            _as_bearer(request)
            table = gateway.targets.table
            alias, pool, _ = gateway.proxy.resolve(table, request)
        except HTTPError as exc:
            return await _fail(send, exc)
        if not pool.anthropic:
            if strict:
                return await _fail(
                    send,
                    errors.http_error(
                        f"The model `{alias}` does not serve the Messages API in strict mode.",
                        404,
                    ),
                )
            # An upstream that speaks Messages: its bytes untouched, the gateway's own errors
            # (limits, timeouts) in this route's envelope.
            return await gateway.relay(request, receive, send, error=_send_error)
        try:
            if request.json is None:
                raise TranslationError("", "the request body is not valid JSON")
            call = to_chat(request.json, count_only=path == _COUNT)
        except TranslationError as exc:
            return await _fail(send, errors.http_error(str(exc)))
        if path == _COUNT:
            body = orjson.dumps({"input_tokens": count_tokens(call)})
            await send_response(send, 200, JSON_HEADERS, body)
            return 200
        chat = ProxyRequest(
            method=b"POST",
            raw_path=_CHAT_PATH,
            query=b"",
            headers=[
                *((k, v) for k, v in request.headers if k not in _DROP),
                (b"content-type", b"application/json"),
                (b"accept", b"text/event-stream" if call.stream else b"application/json"),
            ],
            body=orjson.dumps(call.body),
            json=call.body,
            reasoning_budget=call.budget,
            route="/v1/messages",
        )
        answer = _Answer(call, alias, gateway.config.sse_max_event_bytes)
        try:
            return await gateway.relay(chat, receive, send, answer=answer, error=_send_error)
        finally:  # the access line: the client's request, with where its Chat call went
            request.alias = chat.alias
            request.provider_index = chat.provider_index
            request.attempts = chat.attempts


class _Answer:
    """Translates the Chat upstream's reply to one Messages request and sends it."""

    __slots__ = ("call", "max_event_size", "message_id", "model")

    def __init__(self, call: ChatCall, model: str, max_event_size: int) -> None:
        self.call = call
        self.model = model
        self.max_event_size = max_event_size
        self.message_id = "msg_" + uuid.uuid4().hex

    async def __call__(self, reply: UpstreamReply, send: Send) -> int:
        extra = reply.provider.response_headers if reply.provider is not None else []
        if reply.is_sse and self.call.stream and 200 <= reply.status < 300:
            await self._stream(reply, send, extra)
            return 200
        try:
            if not 200 <= reply.status < 300:
                body = errors.from_upstream(reply.status, await _read(reply, _ERROR_LIMIT))
                await send_response(send, reply.status, [*JSON_HEADERS, *extra], body)
                return reply.status
            message = to_message(
                await self._completion(reply),
                message_id=self.message_id,
                model=self.model,
                stop_sequences=self.call.stop_sequences,
            )
        except UPSTREAM_ERRORS:
            return await _fail(send, errors.http_error(_BROKEN, 502))
        except (InvalidCompletion, orjson.JSONDecodeError, SSEEventTooLarge):
            return await _fail(send, errors.http_error(_UNTRANSLATABLE, 502))
        if self.call.stream:
            await send({"type": "http.response.start", "status": 200, "headers": [*_SSE, *extra]})
            await send({"type": "http.response.body", "body": message_events(message)})
        else:
            await send_response(send, 200, [*JSON_HEADERS, *extra], orjson.dumps(message))
        return 200

    async def _completion(self, reply: UpstreamReply) -> Any:
        """The whole chat completion, also from an upstream that streams unasked."""
        if not reply.is_sse:
            return orjson.loads(await _read(reply, None))
        decoder = SSEDecoder(self.max_event_size)
        assembler = ChatChunkAssembler()
        async for chunk in reply.body:
            for event in decoder.feed(chunk):
                chunk_json = orjson.loads(event.data) if event.data != "[DONE]" else None
                if type(chunk_json) is dict:
                    assembler.feed(chunk_json)
        return assembler.result()

    async def _stream(
        self, reply: UpstreamReply, send: Send, extra: list[tuple[bytes, bytes]]
    ) -> None:
        translator = StreamTranslator(
            message_id=self.message_id,
            model=self.model,
            stop_sequences=self.call.stop_sequences,
            max_event_size=self.max_event_size,
        )
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE, *extra]})
        try:
            async for chunk in reply.body:
                out = translator.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if translator.done:
                    break
            tail = translator.close()
        except UPSTREAM_ERRORS:
            tail = translator.fail(CUT_SHORT)
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _read(reply: UpstreamReply, limit: int | None) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in reply.body:
        parts.append(chunk)
        size += len(chunk)
        if limit is not None and size >= limit:
            break
    return b"".join(parts)
