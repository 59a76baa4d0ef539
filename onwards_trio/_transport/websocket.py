"""WebSocket for the built-in server: an upgraded connection served as an ASGI ``websocket``
scope, with wsproto doing the framing (sans-I/O; hypercorn speaks the same scope itself).

The server's request parser hands over an upgrade request (:func:`is_websocket_upgrade`); the
opening handshake is answered here (the accept token is wsproto's), then one nursery per
socket runs two tasks: the reader (bytes → wsproto → ASGI ``websocket.receive`` messages on
a bounded channel, pings answered, the peer's close echoed) and the app. When the peer goes
away the app's next ``receive()`` is ``websocket.disconnect``; when the app returns, the
socket is closed and the reader cancelled. Messages are reassembled up to ``max_message``
bytes (larger ones close the socket with 1009). No extensions (no permessage-deflate).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, generate_accept_token

from onwards_trio._transport.asgi import ASGIApp
from onwards_trio._transport.asgi import Message as ASGIMessage

__all__ = ["is_websocket_upgrade", "serve_websocket"]

log = logging.getLogger("onwards_trio.server")

_READ = 64 * 1024
_INBOX = 16  # received messages waiting for the app (then the reader stops reading)
_CLOSE_TIMEOUT = 5.0  # how long a closing handshake or a last write may take


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def is_websocket_upgrade(method: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """A ``GET`` asking to upgrade to ``websocket`` (RFC 6455 §4.2.1)."""
    if method != "GET":
        return False
    upgrade = _header(headers, b"upgrade") or b""
    connection = _header(headers, b"connection") or b""
    return upgrade.lower() == b"websocket" and b"upgrade" in connection.lower()


def _handshake_error(status: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _Socket:
    def __init__(self, stream: trio.abc.Stream, max_message: int) -> None:
        self.stream = stream
        self.ws = Connection(ConnectionType.SERVER)
        self.max_message = max_message
        self.accepted = False
        self.closed = False  # our close frame (or the refusal) is out
        self.send_lock = trio.Lock()
        self.inbox_send, self.inbox = trio.open_memory_channel[ASGIMessage](_INBOX)
        self.connect_pending = True

    async def write(self, data: bytes) -> None:
        if not data:
            return
        async with self.send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.closed = True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed or self.ws.state not in (
            ConnectionState.OPEN,
            ConnectionState.REMOTE_CLOSING,
        ):
            self.closed = True
            return
        self.closed = True
        with trio.move_on_after(_CLOSE_TIMEOUT):
            await self.write(self.ws.send(CloseConnection(code=code, reason=reason)))

    async def read(self) -> None:
        """Feed received bytes to wsproto and the messages to the app, until the socket
        closes; then the app sees ``websocket.disconnect``."""
        parts: list[Any] = []
        size = 0
        code = 1006
        data = b"-"
        try:
            while True:
                for event in self.ws.events():  # first those of bytes read with the head
                    if isinstance(event, Ping):
                        await self.write(self.ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        code = event.code
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            await self.write(self.ws.send(event.response()))
                        self.closed = True
                        return
                    elif isinstance(event, Message):
                        parts.append(event.data)
                        size += len(event.data)
                        if size > self.max_message:
                            code = 1009
                            await self.close(1009, "message too big")
                            return
                        if event.message_finished:
                            await self.inbox_send.send(_received(event, parts))
                            parts, size = [], 0
                if not data:
                    return
                try:
                    data = bytes(await self.stream.receive_some(_READ))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    data = b""
                self.ws.receive_data(data or None)
        finally:
            # If the app is behind (inbox full), closing the channel still ends its receive.
            with contextlib.suppress(trio.WouldBlock):
                self.inbox_send.send_nowait({"type": "websocket.disconnect", "code": code})
            self.inbox_send.close()

    async def receive(self) -> ASGIMessage:
        if self.connect_pending:
            self.connect_pending = False
            return {"type": "websocket.connect"}
        try:
            return await self.inbox.receive()
        except trio.EndOfChannel:
            return {"type": "websocket.disconnect", "code": 1006}

    async def send(self, message: ASGIMessage, key: bytes) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            if self.accepted or self.closed:
                raise RuntimeError("websocket.accept sent twice or after close")
            self.accepted = True
            head = [
                b"HTTP/1.1 101 Switching Protocols",
                b"upgrade: websocket",
                b"connection: Upgrade",
                b"sec-websocket-accept: " + generate_accept_token(key),
            ]
            if message.get("subprotocol"):
                head.append(b"sec-websocket-protocol: " + message["subprotocol"].encode())
            head += [bytes(k) + b": " + bytes(v) for k, v in message.get("headers") or []]
            await self.write(b"\r\n".join(head) + b"\r\n\r\n")
        elif kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            if self.closed:
                return  # the peer is gone: the app learns it from receive()
            text = message.get("text")
            event: Message[Any] = (
                TextMessage(data=text) if text is not None else BytesMessage(data=message["bytes"])
            )
            try:
                data = self.ws.send(event)
            except LocalProtocolError:
                return  # closing
            await self.write(data)
        elif kind == "websocket.close":
            if not self.accepted:
                self.closed = True  # refused before the handshake: a plain 403
                await self.write(_handshake_error(b"403 Forbidden"))
                return
            await self.close(int(message.get("code") or 1000), str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a websocket")


def _received(event: Message[Any], parts: list[Any]) -> ASGIMessage:
    if isinstance(event, TextMessage):
        return {"type": "websocket.receive", "text": "".join(parts)}
    return {"type": "websocket.receive", "bytes": b"".join(bytes(p) for p in parts)}


async def serve_websocket(
    app: ASGIApp,
    stream: trio.abc.Stream,
    scope: dict[str, Any],
    buffered: bytes = b"",
    *,
    max_message: int = 16 * 1024 * 1024,
) -> None:
    """Serve one upgrade request (``scope`` is its HTTP scope) as a WebSocket until either
    side closes. ``buffered`` holds bytes read past the request head (early frames)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    key = _header(headers, b"sec-websocket-key")
    if key is None or _header(headers, b"sec-websocket-version") != b"13":
        await stream.send_all(
            b"HTTP/1.1 426 Upgrade Required\r\nsec-websocket-version: 13\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        return
    protocols = _header(headers, b"sec-websocket-protocol")
    ws_scope = {
        **scope,
        "type": "websocket",
        "scheme": "ws",
        "subprotocols": (
            [p.strip() for p in protocols.decode("latin-1").split(",")] if protocols else []
        ),
    }
    socket = _Socket(stream, max_message)
    if buffered:
        socket.ws.receive_data(buffered)

    async def send(message: ASGIMessage) -> None:
        await socket.send(message, key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(socket.read)
        try:
            await app(ws_scope, socket.receive, send)
        except Exception:
            log.exception("unhandled error in the websocket app")
            if not socket.accepted:
                await socket.write(_handshake_error(b"500 Internal Server Error"))
                socket.closed = True
            await socket.close(1011)
        finally:
            with trio.CancelScope(shield=True):
                if not socket.accepted and not socket.closed:
                    await socket.write(_handshake_error(b"403 Forbidden"))
                await socket.close()
            nursery.cancel_scope.cancel()
