"""The built-in HTTP/1.1 server, over real sockets with hand-written requests."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from onwards_trio._transport import server as _server
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
            b"POST /a HTTP/1.1\r\nhost: h\r\ncontent-length: 1\r\n\r\n1"
            b"POST /b HTTP/1.1\r\nhost: h\r\ncontent-length: 1\r\n\r\n2"
        )
        buf = bytearray()
        assert (await read_response(s, buf))[1] == b"got:1"
        assert (await read_response(s, buf))[1] == b"got:2"


async def test_chunked_request_body(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: t\r\n\r\n"
        )
        _, body = await read_response(s, bytearray())
    assert body == b"got:abcde"


async def test_expect_100_continue_is_answered_before_the_body(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
        )
        with trio.fail_after(5):
            interim = await s.receive_some()
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await s.send_all(b"ok")
        _, body = await read_response(s, bytearray(interim[25:]))
    assert body == b"got:ok"


async def test_streamed_response_is_chunked(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /stream HTTP/1.1\r\nhost: h\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert b"transfer-encoding: chunked" in head and body == b"abcd"


async def test_client0_streamed_response_ends_with_the_connection(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /stream HTTP/1.0\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert b"chunked" not in head and body == b"abcd"


async def test_head_gets_no_body(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"HEAD / HTTP/1.1\r\nhost: h\r\n\r\nGET / HTTP/1.1\r\nhost: h\r\n\r\n")
        buf = bytearray()
        while buf.count(b"HTTP/1.1 200") < 2 or not buf.endswith(b"got:"):
            buf += await s.receive_some()
    assert bytes(buf).count(b"got:") == 1  # only the GET carried a body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\n folded: header\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nx-a: 1\ninjected: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nx-a: 1\x00\r\n\r\n",
        b"GET /a\x01b HTTP/1.1\r\nhost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\nbad name: 1\r\n\r\n",
        # framing and routing shapes a front proxy might read differently
        b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"CONNECT upstream:443 HTTP/1.1\r\nhost: upstream:443\r\n\r\n",
        b"GET x/y HTTP/1.1\r\nhost: h\r\n\r\n",
        b"CONNECT /v1/x HTTP/1.1\r\nhost: h\r\n\r\n",
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
        await s.send_all(b"GET /close HTTP/1.1\r\nhost: h\r\n\r\n")
        head, body = await read_response(s, bytearray())
        assert b"connection: close" in head and body == b"bye"
        assert await closed(s)


async def test_an_app_error_is_a_json_500(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET /boom HTTP/1.1\r\nhost: h\r\n\r\n")
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
    await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
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
    await busy.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
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


async def test_an_oversized_head_is_a_400_and_the_server_keeps_serving(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * 70_000)
        head, _ = await read_response(s, bytearray())
        assert head.startswith(b"http/1.1 400")
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200") and body == b"got:"


async def test_bytes_pipelined_while_the_app_runs_are_not_buffered_without_bound(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    peak = 0
    read = _server._Connection._read

    async def spy(self: Any) -> bytes:
        nonlocal peak
        data = await read(self)
        peak = max(peak, len(self.buf) + len(data))
        return data

    monkeypatch.setattr(_server._Connection, "_read", spy)
    release = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with trio.open_nursery() as watch:
            watch.start_soon(receive)  # watches for a disconnect, as the gateway does
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        with trio.move_on_after(1):
            await s.send_all(b"x" * (4 * 1024 * 1024))
        await trio.sleep(0.2)
        release.set()
        head, body = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200") and body == b"done"
    assert peak <= _server._MAX_PIPELINED + _server._READ  # the rest waits in the kernel


async def drain_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


@pytest.mark.parametrize("size", [b"-1", b"0x3", b"+3", b"1_0", b" 3", b"11111111111111111"])
async def test_chunk_sizes_are_strict_hex(nursery: trio.Nursery, size: bytes) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
            + size
            + b"\r\nabc\r\n0\r\n\r\n"
        )
        assert b"got:" not in await drain_until_closed(s)
    assert not any(r["body"] for r in seen)  # the app saw a disconnect, not a body


async def test_a_long_chunk_extension_is_refused(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
            b"1;x=" + b"y" * 8000 + b"\r\na\r\n0\r\n\r\n"
        )
        assert b"got:" not in await drain_until_closed(s)
    assert not any(r["body"] for r in seen)  # the app saw a disconnect, not a body


async def test_trailers_are_bounded_in_total(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        trailers = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 1000) for i in range(100))
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
            b"1\r\na\r\n0\r\n" + trailers + b"\r\n"
        )
        assert b"got:" not in await drain_until_closed(s)
    assert seen[0]["body"] == b"a"  # the data before the trailers, then a disconnect


async def test_receive_after_the_response_is_a_prompt_disconnect(nursery: trio.Nursery) -> None:
    """An app that answers without reading the body (Expect: 100-continue pending), then
    calls receive(): no 100 Continue after the response, no wait for the body."""
    got: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too big"})
        with trio.fail_after(2):
            got.append((await receive())["type"])

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 9\r\n\r\n"
        )
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 413") and b"100 Continue" not in data
    assert got == ["http.disconnect"]


async def test_expect_100_continue_is_ignored_for_http10(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.0\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\nok")
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200") and b"100 Continue" not in data


async def test_a_client_that_uploads_the_whole_body_first_still_gets_the_answer(
    nursery: trio.Nursery,
) -> None:
    """The app answers (as a 413 does) before the body is read; closing at once would reset
    the connection under a client still uploading, which then never reads the answer."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the first piece only
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too big"})

    port = await start(nursery, app)
    body = b"x" * (8 * 1024 * 1024)
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n\r\n" % len(body))
        with trio.fail_after(5):
            await s.send_all(body)  # like a client that reads only once it has sent
        head, answer = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 413") and answer == b"too big"


async def test_an_app_error_after_the_start_message_but_before_any_byte_is_a_500(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("app bug before the body")

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 500") and b'"code":"internal_error"' in body


@pytest.mark.parametrize(("declared", "sent"), [(b"2", b"abcdef"), (b"10", b"abc")])
async def test_a_body_that_disagrees_with_its_content_length_ends_the_connection(
    nursery: trio.Nursery, declared: bytes, sent: bytes
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", declared)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": sent})

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        data = await drain_until_closed(s)  # no bytes beyond the declared length, then EOF
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.lower().count(b"content-length") == 1
    assert body == sent[: int(declared)]


async def test_client0_keep_alive_is_acknowledged(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        buf = bytearray()
        for _ in range(2):
            await s.send_all(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            head, body = await read_response(s, buf)
            assert b"connection: keep-alive" in head and body == b"got:"


async def test_connection_close_from_the_client_is_acknowledged(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        head, _ = await read_response(s, bytearray())
        assert b"connection: close" in head
        assert await closed(s)


async def test_absolute_form_targets_keep_only_the_path(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(b"GET HTTP://Example.com/v1/models?a=1 HTTP/1.1\r\nhost: h\r\n\r\n")
        await read_response(s, bytearray())
    assert seen[0]["scope"]["path"] == "/v1/models"
    assert seen[0]["scope"]["query_string"] == b"a=1"


async def test_no_100_continue_is_written_inside_a_response(nursery: trio.Nursery) -> None:
    """An app that starts answering, then reads the body: the interim 100 must not land in
    the middle of the response it already began."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        with trio.move_on_after(0.2):
            await receive()
        await send({"type": "http.response.body", "body": b"part2"})

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
        )
        data = await drain_until_closed(s)
    assert b"100 Continue" not in data and data.startswith(b"HTTP/1.1 200")
