"""Open Responses' WebSocket mode: ``/v1/responses`` upgraded to a WebSocket.

Each ``response.create`` message is a ``POST /v1/responses`` body (without the HTTP-only
``stream``, ``stream_options`` and ``background``); the response's streaming events go back
as JSON text messages, exactly the objects an SSE stream carries. The connection's headers
(``Authorization``) authenticate every turn, as they would each HTTP request.

Per connection: one nursery. A reader task takes the socket's messages; turns run one at a
time, in order (the spec forbids multiplexing); the socket closing cancels the nursery, and
with it a turn in flight (its response is stored ``cancelled`` when it is stored at all).

Continuation: the most recent response's conversation is kept in connection-local memory, so
``previous_response_id`` works for ``store: false`` responses on the same socket (and any
stored response is found in the store, as over HTTP). A continuation turn that fails with a
4xx/5xx evicts the id it continued from. Failures are ``{"type": "error", "status", "error":
{"type", "code", "message", "param"}}`` envelopes. A connection is served for 60 minutes;
then the next turn (or an idle socket) gets ``websocket_connection_limit_reached`` and the
socket closes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
import trio

from onwards_trio._errors import HTTPError
from onwards_trio._loop.events import LoopEvent
from onwards_trio._proxy.pipeline import ProxyRequest
from onwards_trio._transport.asgi import Receive, Scope, Send

if TYPE_CHECKING:
    from onwards_trio._responses.service import ResponsesService

__all__ = ["CONNECTION_LIMIT", "serve_socket"]

log = logging.getLogger("onwards_trio.responses")

CONNECTION_LIMIT = 60 * 60.0  # seconds a WebSocket is served (the spec's 60 minutes)
_HTTP_ONLY = ("stream", "stream_options", "background")
_INBOX = 8  # response.create messages waiting behind the turn in flight


def _error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "type": "error",
        "status": status,
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": param,
        },
    }


def _http_error(exc: HTTPError) -> dict[str, Any]:
    """An :class:`HTTPError` (an OpenAI error envelope) as the WebSocket error envelope."""
    try:
        error = orjson.loads(exc.body).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {}
    return {
        "type": "error",
        "status": exc.status,
        "error": {
            "type": error.get("type") or "invalid_request_error",
            "code": error.get("code") or error.get("type") or "error",
            "message": error.get("message") or "The request failed.",
            "param": error.get("param"),
        },
    }


class _Connection:
    def __init__(self, service: ResponsesService, scope: Scope, send: Send) -> None:
        self.service = service
        self.headers: list[tuple[bytes, bytes]] = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")
        ]
        self.send = send
        # previous_response_id → that response's conversation (the most recent one only)
        self.recent: dict[str, list[dict[str, Any]]] = {}

    async def emit(self, message: dict[str, Any]) -> None:
        await self.send({"type": "websocket.send", "text": orjson.dumps(message).decode()})

    async def turn(self, text: str) -> None:
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self.emit(_error(400, "invalid_json", "The message is not valid JSON."))
            return
        if not isinstance(body, dict) or body.get("type") != "response.create":
            await self.emit(
                _error(
                    400, "invalid_request_error", "Expected a 'response.create' message.", "type"
                )
            )
            return
        body = {k: v for k, v in body.items() if k != "type"}
        previous = body.get("previous_response_id")
        try:
            for key in _HTTP_ONLY:
                if key in body:
                    raise HTTPError(
                        400,
                        orjson.dumps(
                            _error(
                                400,
                                "invalid_request_error",
                                f"'{key}' is not used on a WebSocket.",
                                key,
                            )
                        ),
                    )
            await self.respond({**body, "stream": True})
        except HTTPError as exc:
            if isinstance(previous, str):
                self.recent.pop(previous, None)
            await self.emit(_http_error(exc))

    async def respond(self, body: dict[str, Any]) -> None:
        service = self.service
        request = ProxyRequest(
            method=b"POST",
            raw_path=b"/v1/responses",
            query=b"",
            headers=[*self.headers, (b"content-type", b"application/json")],
            body=orjson.dumps(body),
            json=body,
        )
        adapted = service.adapter_alias(request)
        if adapted is None:
            raise HTTPError(
                404,
                orjson.dumps(
                    _error(
                        404,
                        "model_not_found",
                        f"The model '{body.get('model')}' is not served in WebSocket mode here.",
                        "model",
                    )
                ),
            )
        job = await service.prepare(request, *adapted, recent=self.recent)

        async def deliver(event: LoopEvent) -> None:
            await self.emit(event.wire())

        final = await service.stream_job(job, deliver)
        previous = job.request.previous_response_id
        if final.get("status") in ("failed", "cancelled"):
            if previous is not None:
                self.recent.pop(previous, None)
            return
        self.recent = {job.response_id: [*job.history, *job.request.input_items, *final["output"]]}


async def serve_socket(
    service: ResponsesService, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve one WebSocket on ``/v1/responses`` (any other path is refused before the
    handshake) until the client closes it or the connection limit is reached."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if scope["path"].rstrip("/") != "/v1/responses":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept"})
    connection = _Connection(service, scope, send)
    deadline = trio.current_time() + CONNECTION_LIMIT
    inbox_send, inbox = trio.open_memory_channel[str](_INBOX)

    async def read(nursery: trio.Nursery) -> None:
        async with inbox_send:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    nursery.cancel_scope.cancel()  # a turn in flight is cancelled with it
                    return
                if message["type"] == "websocket.receive":
                    text = message.get("text")
                    if text is None:
                        text = (message.get("bytes") or b"").decode("utf-8", "replace")
                    await inbox_send.send(text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, nursery)
        async with inbox:
            while True:
                with trio.move_on_at(deadline):
                    try:
                        text = await inbox.receive()
                    except trio.EndOfChannel:
                        break
                if trio.current_time() >= deadline:
                    await connection.emit(
                        _error(
                            400,
                            "websocket_connection_limit_reached",
                            "This WebSocket reached its 60-minute limit; open a new one.",
                        )
                    )
                    break
                await connection.turn(text)
        await send({"type": "websocket.close", "code": 1000})
        nursery.cancel_scope.cancel()
