"""The built-in HTTP/1.1 server, over real sockets with hand-written requests."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from onwards_trio._transport import server as _server
from onwards_trio._transport.asgi import CancelOnDisconnect, Receive, Scope, Send
from onwards_trio._transport.server import serve
from tests.transport.raw import (
    Seen,
    closed,
    connect,
    drain_until_closed,
    echo_app,
    read_response,
    start,
)


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


async def test_an_oversized_head_is_a_431_and_the_server_keeps_serving(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * 70_000)
        head, _ = await read_response(s, bytearray())
        assert head.startswith(b"http/1.1 431")
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        head, body = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200") and body == b"got:"


async def test_bytes_pipelined_while_the_app_runs_are_not_buffered_without_bound(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = 0  # bytes read from the socket while the app holds the response back
    feed = _server._Parser.feed  # every read is fed to the parser

    def spy(self: Any, data: bytes) -> None:
        nonlocal taken
        taken += len(data)
        feed(self, data)

    monkeypatch.setattr(_server._Parser, "feed", spy)
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
    assert taken <= _server._MAX_PIPELINED + 2 * _server._READ  # the rest waits in the kernel


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


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"2;\nxx\r\n51\r\n0\r\n\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",  # bare LF in an extension
        b"0\r\n\n" + SMUGGLED,  # bare LF ending the trailers
        b"3\r\nabcX\r\n0\r\n\r\n",  # data longer than the size
        b"3\r\nab\r\n0\r\n\r\n",  # shorter
        b"3\r\nabc0\r\n\r\n",  # no CRLF after the data
        b"3\nabc\n0\n\n",
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"3;a=\x00\r\nabc\r\n0\r\n\r\n",
        b'3;a="b\nc"\r\nabc\r\n0\r\n\r\n',
        b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX: \x01\r\n\r\n",
        b"3\r\nabc\r\n0\r\n folded: t\r\n\r\n",
        b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    ],
)
async def test_malformed_chunked_bodies_get_a_json_400_and_nothing_is_smuggled(
    nursery: trio.Nursery, body: bytes
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST /x HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n" + body
        )
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400 ") and b'"code":"bad_request"' in data
    assert data.count(b"HTTP/1.1") == 1
    assert [r["scope"]["path"] for r in seen if r["scope"]["path"] != "/x"] == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",  # arrives whole
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nhost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: h\r\n" + b"x: y\r\n" * 201 + b"\r\n",
    ],
)
async def test_heads_over_the_cap_get_a_431(nursery: trio.Nursery, head: bytes) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(head)
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 431 ") and b"request_header_fields_too_large" in data
    assert seen == []


@pytest.mark.parametrize(
    "length",
    [b"9" * 5000, b"18446744073709551616", b"-1", b"1 2", b"0x10", b"5\r\ncontent-length: 6"],
)
async def test_unframeable_content_lengths_get_a_400_without_a_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, length: bytes
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: " + length + b"\r\n\r\n")
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400 ") and seen == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def answering(headers: list[tuple[bytes, bytes]], status: int = 200, body: bytes = b"") -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


@pytest.mark.parametrize(
    "header",
    [
        (b"x-relayed", b"a\r\nset-cookie: injected=1"),
        (b"x-relayed", b"a\nb"),
        (b"x-relayed", b"a\rb"),
        (b"x-relayed", b"a\x00b"),
        (b"x-relayed", b"a\x1bb"),
        (b"x-bad\r\nname", b"1"),
    ],
)
async def test_control_characters_in_response_headers_are_never_written(
    nursery: trio.Nursery, header: tuple[bytes, bytes]
) -> None:
    port = await start(nursery, answering([header]))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 500 ") and b"injected" not in data and b"x-bad" not in data


async def test_a_204_never_carries_a_content_length(nursery: trio.Nursery) -> None:
    port = await start(nursery, answering([(b"content-length", b"5")], status=204))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        with trio.fail_after(5):
            data = await s.receive_some()
    assert data.startswith(b"HTTP/1.1 204 ") and b"content-length" not in data.lower()


async def test_a_client_that_stops_reading_is_disconnected_after_the_write_timeout(
    nursery: trio.Nursery,
) -> None:
    told = trio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with trio.open_nursery() as watch:

            async def watch_disconnect() -> None:
                if (await receive())["type"] == "http.disconnect":
                    told.set()
                    watch.cancel_scope.cancel()

            watch.start_soon(watch_disconnect)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            while True:  # stream forever; the client never reads
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})

    port = await start(nursery, app, write_timeout=0.5)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        with trio.fail_after(20):
            await told.wait()


async def test_an_upgrade_with_a_body_is_refused(nursery: trio.Nursery) -> None:
    """llhttp hands the bytes after an upgrade's head over unparsed: a body there would be
    neither read nor refused."""
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
            b"content-length: " + b"%d" % len(SMUGGLED) + b"\r\n\r\n" + SMUGGLED
        )
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400 ") and seen == []


async def test_a_non_websocket_upgrade_is_served_as_http_then_closed(
    nursery: trio.Nursery,
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(
            b"GET / HTTP/1.1\r\nhost: h\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n" + SMUGGLED
        )
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1") == 1
    assert [r["scope"]["path"] for r in seen] == ["/"]


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_app([]), keep_alive_timeout=0.4)
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 1\r\n\r\nx")
        assert (await read_response(s, bytearray()))[1] == b"got:x"
        assert await closed(s)  # no second request: the server hangs up


async def test_a_head_that_never_ends_is_cut_off_after_the_head_timeout(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_server, "_HEAD_TIMEOUT", 0.4)
    seen: Seen = []
    port = await start(nursery, echo_app(seen), keep_alive_timeout=30)
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\n")  # the head never ends
        assert await drain_until_closed(s) == b""
    assert seen == []


async def test_nested_cancel_on_disconnect_scopes_are_all_cancelled(nursery: trio.Nursery) -> None:
    inside = trio.Event()
    done = trio.Event()
    caught: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        async with CancelOnDisconnect(receive) as outer:
            async with CancelOnDisconnect(receive) as inner:
                inside.set()
                await trio.sleep_forever()
            caught.append(inner.cancelled_caught)
            await trio.sleep_forever()  # the client is gone already: cancelled at once
        caught.append(outer.cancelled_caught)
        done.set()

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        with trio.fail_after(5):
            await inside.wait()
    with trio.fail_after(5):
        await done.wait()
    assert caught == [True, True]
