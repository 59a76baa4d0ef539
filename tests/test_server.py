"""The built-in HTTP/1.1 server, over real sockets with hand-written requests."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from onwards_trio._asgi import Receive, Scope, Send
from onwards_trio._server import serve

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


async def test_keep_alive_serves_several_requests_on_one_connection(
    nursery: trio.Nursery,
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        buf = bytearray()
        for i in range(3):
            await s.send_all(b"POST /x?q=%d HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\nhi" % i)
            head, body = await read_response(s, buf)
            assert head.startswith(b"http/1.1 200") and body == b"got:hi"
    assert [r["scope"]["query_string"] for r in seen] == [b"q=0", b"q=1", b"q=2"]
    assert seen[0]["scope"]["headers"] == [(b"host", b"h"), (b"content-length", b"2")]


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(
            b"POST /a HTTP/1.1\r\ncontent-length: 1\r\n\r\n1"
            b"POST /b HTTP/1.1\r\ncontent-length: 1\r\n\r\n2"
        )
        buf = bytearray()
        assert (await read_response(s, buf))[1] == b"got:1"
        assert (await read_response(s, buf))[1] == b"got:2"


async def test_chunked_request_body(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: t\r\n\r\n"
        )
        _, body = await read_response(s, bytearray())
    assert body == b"got:abcde"


async def test_expect_100_continue_is_answered_before_the_body(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
        with trio.fail_after(5):
            interim = await s.receive_some()
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await s.send_all(b"ok")
        _, body = await read_response(s, bytearray(interim[25:]))
    assert body == b"got:ok"


async def test_streamed_response_is_chunked(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /stream HTTP/1.1\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert b"transfer-encoding: chunked" in head and body == b"abcd"


async def test_http10_streamed_response_ends_with_the_connection(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /stream HTTP/1.0\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert b"chunked" not in head and body == b"abcd"


async def test_head_gets_no_body(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        buf = bytearray()
        while buf.count(b"HTTP/1.1 200") < 2 or not buf.endswith(b"got:"):
            buf += await s.receive_some()
    assert bytes(buf).count(b"got:") == 1  # only the GET carried a body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\n folded: header\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nx-a: 1\ninjected: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nx-a: 1\x00\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad name: 1\r\n\r\n",
    ],
)
async def test_malformed_requests_get_a_json_400_and_the_connection_closes(
    nursery: trio.Nursery, request_bytes: bytes
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(request_bytes)
        head, body = await read_response(s, bytearray())
        assert head.startswith(b"http/1.1 400") and b'"code":"bad_request"' in body
        assert await closed(s)
    assert seen == []


async def test_connection_close_from_the_app_closes_the_connection(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /close HTTP/1.1\r\n\r\n")
        head, body = await read_response(s, bytearray())
        assert b"connection: close" in head and body == b"bye"
        assert await closed(s)


async def test_an_app_error_is_a_json_500(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /boom HTTP/1.1\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 500") and b'"code":"internal_error"' in body


async def test_the_app_sees_a_client_disconnect_at_once(nursery: trio.Nursery) -> None:
    told = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        if (await receive())["type"] == "http.disconnect":
            told.set()

    port = await start(nursery, app)
    s = await connect(port)
    await s.send_all(b"GET / HTTP/1.1\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked()
    await s.aclose()
    with trio.fail_after(5):
        await told.wait()


async def test_graceful_shutdown_lets_requests_in_flight_finish(nursery: trio.Nursery) -> None:
    trigger = trio.Event()
    release = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        await serve(
            app, "127.0.0.1", 0, shutdown_trigger=trigger.wait, grace=10, task_status=task_status
        )
        done.set()

    port = int((await nursery.start(run))[0].rsplit(":", 1)[1])
    busy = await connect(port)
    idle = await connect(port)
    await busy.send_all(b"GET / HTTP/1.1\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked()
    trigger.set()
    await trio.testing.wait_all_tasks_blocked()
    assert await closed(idle)  # an idle keep-alive connection is closed at once
    with pytest.raises(OSError):
        await connect(port)  # no longer accepting
    release.set()
    head, body = await read_response(busy, bytearray())
    assert body == b"done" and b"connection: close" in head
    with trio.fail_after(5):
        await done.wait()
    await busy.aclose()
    await idle.aclose()
