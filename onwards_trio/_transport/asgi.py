"""Raw ASGI plumbing: typed callables, bounded body reading, responses, disconnect watching.

ASGI servers do not cancel a handler when its client goes away (sends are silently dropped),
so every handler that waits on an upstream runs its work in :class:`CancelOnDisconnect`: the
moment the client leaves, the work's cancel scope is cancelled, which closes the upstream
stream and releases every permit on the way out. Under the built-in server the connection's
reader cancels it (the server's ``receive`` offers ``cancel_on_disconnect``); under any other
ASGI server a task runs :func:`watch_disconnect` beside the work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import trio

from onwards_trio._errors import (
    HTTPError,
    bodies_over_budget,
    payload_too_large,
    request_timeout,
)

__all__ = [
    "OFF_LOOP_JSON_BYTES",
    "ASGIApp",
    "BodyBudget",
    "CancelOnDisconnect",
    "Receive",
    "Scope",
    "Send",
    "loads_off_loop",
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


class BodyBudget:
    """Bytes of request bodies being read right now, across every request of a gateway.

    The per-request limit alone lets a crowd of slow uploads, each just under it, hold memory
    together (20 connections trickling 32 MiB bodies held 683 MB): past ``limit`` in total, a
    body that needs more is refused with a 503 the client may retry.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        if self.used + n > self.limit:
            raise bodies_over_budget()
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


async def read_body(
    receive: Receive,
    limit: int,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    budget: BodyBudget | None = None,
    deadline: float | None = None,
) -> bytes:
    """Read the whole request body, refusing (413) past ``limit`` bytes.

    With ``headers``, a declared content-length over the limit is refused before a byte is read
    (so no ``100 Continue`` invites the upload). ``budget`` counts the bytes while they are read;
    ``deadline`` bounds the whole read in seconds (408 past it), so a body trickled a byte at a
    time cannot hold its buffer for ever.
    """
    if headers is not None:
        for name, value in headers:
            if name == b"content-length":
                # digits only (both servers check); int() of thousands would refuse, slowly
                if value.isdigit() and (len(value) > 20 or int(value) > limit):
                    raise payload_too_large(limit)
                break
    whole = getattr(receive, "whole_body", None)  # the built-in server's extension
    if whole is not None:
        got: bytes | None = whole()
        if got is not None:  # all of it is here
            if len(got) > limit:
                raise payload_too_large(limit)
            return got
    started = trio.current_time()
    first = await receive()
    if first["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = first.get("body", b"")
    if len(body) > limit:
        raise payload_too_large(limit)
    if not first.get("more_body", False):
        return body  # one piece (at most one socket read): the common case, no timer needed
    if deadline is None:
        return await _read_rest(receive, limit, budget, body)
    try:
        with trio.fail_at(started + deadline):
            return await _read_rest(receive, limit, budget, body)
    except trio.TooSlowError:
        raise request_timeout() from None


async def _read_rest(
    receive: Receive, limit: int, budget: BodyBudget | None, first: bytes
) -> bytes:
    parts = [first]
    size = len(first)
    held = 0
    try:
        while True:
            if budget is not None and size > held:
                budget.take(size - held)
                held = size
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
    finally:
        if budget is not None:
            budget.give(held)


# Parsing costs the event loop 20-50 ms per MB of small JSON values (the objects, and the
# collector passes they set off): data this large is parsed in a worker thread, so a long
# /v1/responses input or chat history does not hold every other request. Smaller data stays
# on the loop, where a thread hand-off would cost more than the parse.
OFF_LOOP_JSON_BYTES = 256 * 1024


async def loads_off_loop(data: bytes, parse: Callable[[bytes], Any] = orjson.loads) -> Any:
    """``parse(data)``; in a worker thread when ``data`` is :data:`OFF_LOOP_JSON_BYTES` or
    more (the bytes are immutable, so nothing is shared with the loop)."""
    if len(data) < OFF_LOOP_JSON_BYTES:
        return parse(data)
    return await trio.to_thread.run_sync(parse, data)


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


class CancelOnDisconnect:
    """``async with CancelOnDisconnect(receive) as scope:`` runs the body in a cancel scope
    that is cancelled when the client disconnects (the body must not call ``receive`` itself
    meanwhile). A disconnect ends the body quietly: the ``async with`` is left normally,
    with ``scope.cancelled_caught`` set.

    With the built-in server this costs one cancel scope: its connection already reads the
    socket and cancels the registered scope. Elsewhere it opens a nursery with a watcher task.
    """

    __slots__ = ("_manager", "_previous", "_receive", "_register", "_scope")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._register: Callable[[trio.CancelScope | None], trio.CancelScope | None] | None = (
            getattr(receive, "cancel_on_disconnect", None)
        )
        self._scope: trio.CancelScope | None = None
        self._previous: trio.CancelScope | None = None
        self._manager: Any = None  # trio's nursery manager (its type is private)

    async def __aenter__(self) -> trio.CancelScope:
        if self._register is not None:
            scope = self._scope = trio.CancelScope()
            scope.__enter__()
            self._previous = self._register(scope)
            return scope
        self._manager = trio.open_nursery()
        nursery: trio.Nursery = await self._manager.__aenter__()
        nursery.start_soon(watch_disconnect, self._receive, nursery.cancel_scope)
        self._scope = nursery.cancel_scope
        return nursery.cancel_scope

    async def __aexit__(self, *exc: Any) -> bool:
        scope = self._scope
        assert scope is not None
        if self._register is not None:
            try:
                return scope.__exit__(*exc)
            finally:  # an enclosing registration is watched again (cancelled if too late)
                self._register(self._previous)
        scope.cancel()  # the work is done: stop the watcher
        return bool(await self._manager.__aexit__(*exc))


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge ASGI lifespan startup/shutdown (hypercorn-trio crashes on a bare return)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
