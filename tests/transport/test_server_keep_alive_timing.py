"""The built-in server's read deadlines on a kept-alive connection, over real loopback
sockets on a virtual clock: an idle connection and a head still arriving are given their
time (75 s idle, 30 s for a head), a head trickled slowly is cut off 30 s after its first
byte however often bytes arrive, and a connection that has carried more than 64 KiB still
serves its next request."""

from __future__ import annotations

import trio
import trio.testing

from tests.transport.raw import connect, echo_app, read_response, start


async def test_a_connection_idle_for_a_while_is_still_served(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await trio.sleep(30)  # well inside the 75 s keep-alive timeout
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
        with trio.fail_after(10):
            head, _ = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200")


async def test_a_head_arriving_in_pieces_within_the_head_timeout_is_served(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start(nursery, echo_app([]))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\n")
        await trio.sleep(10)  # inside the 30 s head timeout
        await s.send_all(b"host: h\r\n\r\n")
        with trio.fail_after(10):
            head, _ = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200")


async def test_a_trickled_head_is_cut_off_30_s_after_its_first_byte(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    port = await start(nursery, echo_app([]))
    s = await connect(port)
    started = trio.current_time()
    closed_at: list[float] = []

    async def watch() -> None:
        try:
            while await s.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        closed_at.append(trio.current_time())

    async with trio.open_nursery() as tasks:
        tasks.start_soon(watch)
        try:
            for byte in b"GET / HTTP/1.1\r\nx-slow: abcdefgh":
                await s.send_all(bytes([byte]))
                await trio.sleep(5)  # a byte every 5 s: each one inside the head timeout
                if closed_at:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.fail_after(120):
            while not closed_at:
                await trio.sleep(1)
    await s.aclose()
    assert closed_at[0] - started < 40


async def test_a_connection_that_carried_64_kib_serves_the_next_request(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, echo_app([]))
    body = b"b" * 40_000
    request = b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    async with await connect(port) as s:
        buf = bytearray()
        for _ in range(2):
            await s.send_all(request)
            with trio.fail_after(10):
                head, answer = await read_response(s, buf)
            assert head.startswith(b"http/1.1 200") and answer == b"got:" + body
