"""Shared test helpers: real servers on loopback (port 0) and a scriptable fake upstream.

Everything that crosses HTTP in the tests goes over real sockets: the gateway is served by
hypercorn on 127.0.0.1:0 and the fake upstreams are ASGI apps served the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
import wsproto
import wsproto.events as ws_events
from hypercorn.trio import serve

from onwards_trio import Gateway, parse_config
from onwards_trio._app.gateway import hypercorn_config
from onwards_trio._transport.asgi import Receive, Scope, Send, serve_lifespan

__all__ = [
    "FakeUpstream",
    "Recorded",
    "Reply",
    "WebSocketClient",
    "chat_completion",
    "cli_gateway",
    "serve_app",
    "sse",
    "start_gateway",
]


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """What a raw test origin reads of a request: up to and including the end of its head
    (an EOF first is an error, not an endless loop)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(f"closed before the end of a head: {data!r}")
        data += chunk
    return data


async def serve_raw(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Any]) -> int:
    """A raw TCP origin on loopback, each connection served by ``handler``; its port."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def serve_app(nursery: trio.Nursery, app: Any) -> str:
    """Serve an ASGI app on 127.0.0.1 port 0; return its base URL (``http://127.0.0.1:N``)."""
    binds = await nursery.start(serve, app, hypercorn_config("127.0.0.1", 0))
    return str(binds[0])


async def start_gateway(nursery: trio.Nursery, config: Mapping[str, Any]) -> tuple[Gateway, str]:
    """Build a gateway from a config mapping and serve it on loopback."""
    gateway = Gateway(parse_config(config))
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    return gateway, info.url


@attrs.define
class CliGateway:
    """An ``onwards-trio`` process: ``url`` where it listens, ``lines`` of its stderr so far."""

    process: trio.Process
    url: str
    lines: list[str]


@contextlib.asynccontextmanager
async def cli_gateway(config: Path) -> AsyncIterator[CliGateway]:
    """Run ``onwards-trio -f config`` on 127.0.0.1 port 0 (no metrics) until it says where it
    listens; kill it on the way out if it is still running."""
    argv = [
        sys.executable, "-m", "onwards_trio", "-f", str(config), "--host", "127.0.0.1",
        "--port", "0", "--no-metrics",
    ]  # fmt: skip
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE, env=dict(os.environ))
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        with trio.fail_after(20):
            async for chunk in proc.stderr:
                lines.extend(chunk.decode(errors="replace").splitlines())
                found = re.search(r"listening on (http://\S+)", "\n".join(lines))
                if found:
                    break
        if not found:
            raise AssertionError("the gateway never said where it listens")
        yield CliGateway(proc, found.group(1), lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(10):
                await proc.wait()


@attrs.define
class Recorded:
    """One request the fake upstream received."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@attrs.define
class Reply:
    """A scripted upstream answer.

    ``chunks`` streams the body piece by piece (``chunk_delay`` seconds apart); ``fail_after``
    aborts the connection after that many chunks; ``delay`` waits before the head.
    """

    status: int = 200
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = attrs.field(
        factory=lambda: [(b"content-type", b"application/json")]
    )
    chunks: Sequence[bytes] | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    fail_after: int | None = None


def chat_completion(content: str = "hi", model: str = "upstream-model", **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        **extra,
    }
    return orjson.dumps(body)


def sse(*payloads: Any, done: bool = True) -> list[bytes]:
    """SSE chunks for the given JSON payloads (strings are sent as-is)."""
    out = [
        b"data: " + (p.encode() if isinstance(p, str) else orjson.dumps(p)) + b"\n\n"
        for p in payloads
    ]
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


class UpstreamBroke(Exception):
    """Raised inside the fake upstream to abort its connection mid-body."""


class FakeUpstream:
    """A scriptable upstream: answers with ``script`` (a Reply, a list consumed in order, or a
    callable of the recorded request) and records every request."""

    def __init__(self, script: Reply | Sequence[Reply] | Callable[[Recorded], Reply] | None = None):
        self.requests: list[Recorded] = []
        self.script = script if script is not None else Reply(body=chat_completion())
        self.active = 0
        self.max_active = 0
        self.finished = 0
        self.cancelled = 0
        self.disconnected = 0  # streams cut short because the gateway went away
        self.disconnect_seen = 0

    def _next(self, rec: Recorded) -> Reply:
        script = self.script
        if isinstance(script, Reply):
            return script
        if callable(script):
            reply: Reply = script(rec)
            return reply
        if isinstance(script, list) and len(script) > 1:
            popped: Reply = script.pop(0)
            return popped
        return script[0]

    async def _watch(self, receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnect_seen += 1
                scope.cancel()
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        header_list = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        rec = Recorded(
            method=scope["method"],
            path=scope.get("raw_path", scope["path"].encode()).decode(),
            query=scope["query_string"].decode(),
            headers=dict(header_list),
            header_list=header_list,
            body=body,
        )
        self.requests.append(rec)
        reply = self._next(rec)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if reply.delay:
                await trio.sleep(reply.delay)
            headers = list(reply.headers)
            if reply.chunks is None:
                headers.append((b"content-length", str(len(reply.body)).encode()))
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            if reply.chunks is None:
                await send({"type": "http.response.body", "body": reply.body})
                self.finished += 1
            else:
                completed = False
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, receive, nursery.cancel_scope)
                    for i, chunk in enumerate(reply.chunks):
                        if reply.fail_after is not None and i >= reply.fail_after:
                            raise UpstreamBroke
                        if reply.chunk_delay and i:
                            await trio.sleep(reply.chunk_delay)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    completed = True  # every chunk is out; the server may now report the close
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    nursery.cancel_scope.cancel()
                if completed:
                    self.finished += 1
                else:
                    self.disconnected += 1
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


class WebSocketClient:
    """A minimal WebSocket client on wsproto for the tests (one real loopback socket)."""

    def __init__(self, stream: trio.SocketStream, ws: wsproto.WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[ws_events.Event] = []
        self.closed: ws_events.CloseConnection | None = None
        self.parts: list[str] = []

    @classmethod
    async def connect(
        cls, url: str, path: str = "/v1/responses", headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> WebSocketClient:
        """Open ``path`` on ``http://host:port``; raises ``ConnectionRefusedError`` with the
        status when the server refuses the upgrade."""
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        request = ws_events.Request(host=host, target=path, extra_headers=list(headers))
        await stream.send_all(ws.send(request))
        client = cls(stream, ws)
        while True:
            event = await client._event()
            if isinstance(event, ws_events.AcceptConnection):
                return client
            if isinstance(event, ws_events.RejectConnection):
                await stream.aclose()
                raise ConnectionRefusedError(event.status_code)

    async def _event(self) -> ws_events.Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(bytes(data) if data else None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def send_json(self, message: Any) -> None:
        await self.send_text(orjson.dumps(message).decode())

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(ws_events.TextMessage(data=text)))

    async def receive_text(self) -> str | None:
        """The next whole text message, or ``None`` once the server closed (see ``closed``)."""
        while True:
            event = await self._event()
            if isinstance(event, ws_events.TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    text, self.parts = "".join(self.parts), []
                    return text
            elif isinstance(event, ws_events.CloseConnection):
                self.closed = event
                return None
            elif isinstance(event, ws_events.Ping):
                await self.stream.send_all(self.ws.send(event.response()))

    async def receive_json(self) -> Any:
        text = await self.receive_text()
        return None if text is None else orjson.loads(text)

    async def turn(self, message: Mapping[str, Any]) -> list[Any]:
        """Send one ``response.create``; every message until the terminal event or an error."""
        await self.send_json(message)
        received: list[Any] = []
        while True:
            event = await self.receive_json()
            if event is None:
                return received
            received.append(event)
            if event["type"] in ("response.completed", "response.failed", "response.incomplete"):
                return received
            if event["type"] == "error":
                return received

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            if self.ws.state is wsproto.connection.ConnectionState.OPEN:
                await self.stream.send_all(self.ws.send(ws_events.CloseConnection(code=1000)))
        await self.stream.aclose()
