"""Raw ASGI plumbing: typed callables, bounded body reading, responses, disconnect watching.

ASGI servers do not cancel a handler when its client goes away (sends are silently dropped),
so every handler that waits on an upstream runs :func:`watch_disconnect` beside its work: the
moment ``receive()`` reports ``http.disconnect`` the work's cancel scope is cancelled, which
closes the upstream stream and releases every permit on the way out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import trio

from onwards_trio._errors import HTTPError, payload_too_large

__all__ = [
    "ASGIApp",
    "Receive",
    "Scope",
    "Send",
    "read_body",
    "send_error",
    "send_json",
    "send_response",
    "serve_lifespan",
    "watch_disconnect",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientDisconnected(Exception):
    """The client went away while its request body was being read."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole request body, refusing (413) past ``limit`` bytes."""
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = first.get("body", b"")
    if not first.get("more_body", False):
        if len(body) > limit:
            raise payload_too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_response(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any) -> None:
    await send_response(send, status, JSON_HEADERS, orjson.dumps(obj))


async def send_error(send: Send, error: HTTPError) -> None:
    await send_response(send, error.status, [*JSON_HEADERS, *error.headers], error.body)


async def watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel ``scope`` when the client disconnects. Run it in the handler's nursery."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge ASGI lifespan startup/shutdown (hypercorn-trio crashes on a bare return)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
