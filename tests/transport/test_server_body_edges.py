"""The built-in server's request body as the app receives it, over real loopback sockets with
hand-written requests: a client gone mid-body is one ``http.disconnect``; ``100 Continue`` is
written once however the body arrives; a body that turns malformed is a JSON 400 before the
app's answer began, and never gets a second answer written behind one that began."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from onwards_trio._transport.asgi import Receive, Scope, Send
from tests.transport.raw import connect, drain_until_closed, echo_app, start


def recording_app(messages: list[dict[str, Any]], done: trio.Event) -> Any:
    """Receives until the body is whole or the client is gone, recording every message."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = dict(await receive())
            messages.append(message)
            if message.get("type") != "http.request" or not message.get("more_body"):
                break
        done.set()

    return app


async def test_a_client_gone_mid_body_is_one_disconnect_message(nursery: trio.Nursery) -> None:
    messages: list[dict[str, Any]] = []
    done = trio.Event()
    port = await start(nursery, recording_app(messages, done))
    s = await connect(port)
    await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 10\r\n\r\nabc")
    await trio.testing.wait_all_tasks_blocked()  # the app waits for the other 7 bytes
    await s.aclose()
    with trio.fail_after(5):
        await done.wait()
    assert messages[-1] == {"type": "http.disconnect"}
    assert b"".join(m.get("body", b"") for m in messages) == b"abc"


async def test_100_continue_is_written_once_however_the_body_arrives(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(
            b"POST / HTTP/1.1\r\nhost: h\r\nexpect: 100-continue\r\ncontent-length: 4\r\n\r\n"
        )
        with trio.fail_after(5):
            interim = await s.receive_some()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await s.send_all(b"ab")
        await trio.testing.wait_all_tasks_blocked()  # the app has "ab" and waits for more
        await s.send_all(b"cd")
        rest = await _one_answer(s)
    assert b"100 Continue" not in rest and rest.endswith(b"got:abcd")


async def test_a_body_malformed_after_the_answer_began_gets_no_second_answer(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"early", "more_body": True})
        while (await receive())["type"] == "http.request":
            pass

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the answer began; the app reads
        await s.send_all(b"zz\r\n")  # not a chunk size
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 200") and b"early" in data
    assert data.count(b"HTTP/1.1") == 1


async def test_a_body_malformed_before_the_answer_is_a_json_400(nursery: trio.Nursery) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the app waits for the body
        await s.send_all(b"zz\r\n")  # not a chunk size
        data = await drain_until_closed(s)
    assert data.startswith(b"HTTP/1.1 400") and b'"code":"bad_request"' in data


async def _one_answer(s: trio.SocketStream) -> bytes:
    """Bytes up to the end of one content-length framed answer (after any interim one)."""
    data = b""
    with trio.fail_after(5):
        while True:
            head, sep, body = data.rpartition(b"\r\n\r\n")
            if sep and b"content-length: " in head.lower():
                length = int(head.lower().split(b"content-length: ")[-1].split(b"\r\n")[0])
                if len(body) >= length:
                    return data
            chunk = await s.receive_some()
            assert chunk, f"closed before an answer: {data!r}"
            data += chunk


async def test_a_body_that_turns_malformed_is_a_disconnect_for_the_app(
    nursery: trio.Nursery,
) -> None:
    messages: list[dict[str, Any]] = []
    done = trio.Event()
    port = await start(nursery, recording_app(messages, done))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()  # the app waits for the body
        await s.send_all(b"zz\r\n")  # not a chunk size
        with trio.fail_after(5):
            await done.wait()
    assert messages == [{"type": "http.disconnect"}]


async def test_a_body_stalled_past_the_read_timeout_is_a_disconnect_for_the_app(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    messages: list[dict[str, Any]] = []
    done = trio.Event()
    port = await start(nursery, recording_app(messages, done))
    async with await connect(port) as s:
        await s.send_all(b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 10\r\n\r\nabc")
        with trio.fail_after(600):  # virtual time: the server gives up after a minute
            await done.wait()
    assert messages[-1] == {"type": "http.disconnect"}


async def test_after_the_body_receive_waits_for_the_response_to_end(
    nursery: trio.Nursery,
) -> None:
    order: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"

        async def watch() -> None:
            order.append((await receive())["type"])

        async with trio.open_nursery() as tasks:
            tasks.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()  # the watcher waits in receive()
            order.append("answered")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    port = await start(nursery, app)
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        assert (await _one_answer(s)).endswith(b"ok")
    assert order == ["answered", "http.disconnect"]
