"""Header values of a request as the built-in server hands them to the app, over a real
loopback socket: trailing spaces and tabs are dropped (they are not part of the value, RFC
9110 §5.5), every other byte is kept."""

from __future__ import annotations

import trio

from tests.transport.raw import Seen, connect, echo_app, read_response, start


async def test_trailing_whitespace_of_a_value_is_dropped_and_the_rest_kept(
    nursery: trio.Nursery,
) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(b"GET / HTTP/1.1\r\nhost: h\r\nx-a: \tsome value X \t \r\n\r\n")
        with trio.fail_after(10):
            await read_response(s, bytearray())
    assert (b"x-a", b"some value X") in seen[0]["scope"]["headers"]
