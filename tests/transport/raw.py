"""Raw-socket helpers for the transport tests: a recording echo app, the built-in server on
port 0, and hand-rolled reading of responses (no HTTP client library in the way)."""

from __future__ import annotations

from typing import Any

import trio

from onwards_trio._transport.asgi import Receive, Scope, Send
from onwards_trio._transport.server import serve

Seen = list[dict[str, Any]]


def echo_app(seen: Seen) -> Any:
    """Reads the whole body, answers it back (streamed in two pieces when asked)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append({"scope": scope, "body": body})
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ab", "more_body": True})
            await send({"type": "http.response.body", "body": b"cd", "more_body": False})
            return
        if scope["path"] == "/close":
            headers = [(b"connection", b"close")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"bye"})
            return
        if scope["path"] == "/boom":
            raise RuntimeError("app bug")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"got:" + body})

    return app


async def start(nursery: trio.Nursery, app: Any, **kw: Any) -> int:
    urls = await nursery.start(
        lambda task_status: serve(app, "127.0.0.1", 0, task_status=task_status, **kw)
    )
    return int(urls[0].rsplit(":", 1)[1])


async def read_response(stream: trio.SocketStream, buf: bytearray) -> tuple[bytes, bytes]:
    """One response (head, body) from ``stream``; leftover bytes stay in ``buf``."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some()
        assert data, "connection closed before a response head"
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).lower()
    del buf[: end + 4]
    if b"content-length:" in head:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(buf) < length:
            buf += await stream.receive_some()
        body = bytes(buf[:length])
        del buf[:length]
        return head, body
    if b"transfer-encoding: chunked" in head:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += await stream.receive_some()
            line_end = buf.index(b"\r\n")
            size = int(bytes(buf[:line_end]), 16)
            del buf[: line_end + 2]
            while len(buf) < size + 2:
                buf += await stream.receive_some()
            body += bytes(buf[:size])
            del buf[: size + 2]
            if size == 0:
                return head, body
    while data := await stream.receive_some():  # close-delimited
        buf += data
    body = bytes(buf)
    buf.clear()
    return head, body


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def closed(stream: trio.SocketStream) -> bool:
    with trio.fail_after(5):
        try:
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True


async def drain_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data
