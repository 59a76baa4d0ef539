"""The built-in server's WebSocket support: an upgrade served as an ASGI ``websocket`` scope
(wsproto framing), over real loopback sockets."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from onwards_trio._transport.asgi import Receive, Scope, Send
from onwards_trio._transport.server import serve
from onwards_trio._transport.websocket import serve_websocket
from tests.support import WebSocketClient


async def start(nursery: trio.Nursery, app: Any) -> str:
    urls = await nursery.start(serve, app, "127.0.0.1", 0)
    return str(urls[0])


def echo_app(seen: list[Any]) -> Any:
    """Accepts, echoes text messages upper-cased, records what it received."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(dict(scope))
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            seen.append(message)
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "bye":
                await send({"type": "websocket.close", "code": 4000})
                return
            await send({"type": "websocket.send", "text": message["text"].upper()})

    return app


async def test_text_messages_round_trip_on_a_websocket_scope(nursery: trio.Nursery) -> None:
    seen: list[Any] = []
    url = await start(nursery, echo_app(seen))
    client = await WebSocketClient.connect(url, "/chat?x=1", [(b"authorization", b"Bearer k")])
    with trio.fail_after(10):
        await client.send_text("hello")
        assert await client.receive_text() == "HELLO"
        await client.send_text("x" * 200_000)  # several frames' worth
        assert await client.receive_text() == "X" * 200_000
    scope = seen[0]
    assert scope["type"] == "websocket" and scope["path"] == "/chat"
    assert scope["query_string"] == b"x=1"
    assert (b"authorization", b"Bearer k") in scope["headers"]
    await client.aclose()


async def test_the_app_closing_sends_its_close_code(nursery: trio.Nursery) -> None:
    url = await start(nursery, echo_app([]))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(10):
        await client.send_text("bye")
        assert await client.receive_text() is None
    assert client.closed is not None and client.closed.code == 4000
    await client.aclose()


async def test_the_client_leaving_is_a_disconnect_for_the_app(nursery: trio.Nursery) -> None:
    seen: list[Any] = []
    url = await start(nursery, echo_app(seen))
    client = await WebSocketClient.connect(url)
    await client.aclose()
    with trio.fail_after(10):
        while not seen or seen[-1].get("type") != "websocket.disconnect":
            await trio.sleep(0.01)
    assert seen[-1]["code"] == 1000


async def test_an_app_refusing_before_accept_is_a_403(nursery: trio.Nursery) -> None:
    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.close", "code": 1008})

    url = await start(nursery, refuse)
    with pytest.raises(ConnectionRefusedError) as info, trio.fail_after(10):
        await WebSocketClient.connect(url)
    assert info.value.args[0] == 403


async def test_a_message_over_the_limit_closes_with_1009(nursery: trio.Nursery) -> None:
    seen: list[Any] = []

    async def handler(stream: trio.SocketStream) -> None:
        """serve_websocket with a tiny limit, behind a bare head reader."""
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
        headers = [
            (k.strip().lower(), v.strip()) for k, v in (line.split(b":", 1) for line in lines[1:])
        ]
        scope = {"type": "http", "path": "/", "query_string": b"", "headers": headers}
        await serve_websocket(echo_app(seen), stream, scope, max_message=1000)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    client = await WebSocketClient.connect(f"http://127.0.0.1:{port}")
    with trio.fail_after(10):
        await client.send_text("y" * 5000)
        assert await client.receive_text() is None
    assert client.closed is not None and client.closed.code == 1009
    assert not [m for m in seen if m.get("type") == "websocket.receive"]
    await client.aclose()


async def test_an_upgrade_without_a_key_is_426_and_plain_http_still_works(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    url = await start(nursery, app)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        b"GET / HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    with trio.fail_after(10):
        reply = await stream.receive_some(4096)
    assert reply.startswith(b"HTTP/1.1 426")
    await stream.aclose()
