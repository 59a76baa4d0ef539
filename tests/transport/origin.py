"""A one-shot origin on a real loopback socket for the client's tests: it answers a request
with fixed bytes in one write and keeps its socket open (only the answer frames itself)."""

from __future__ import annotations

import trio

from onwards_trio._transport.client import Connection, Response
from tests.support import read_head, serve_raw

HEADERS = [(b"host", b"upstream")]


async def answered(
    answer: bytes, method: bytes = b"GET"
) -> tuple[Response | Exception, bytes, bool]:
    """One request on a fresh connection to an origin answering ``answer``: the response (or
    the error the client raised), its body read to the end, and whether the connection is
    reusable afterwards."""

    async def handler(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(answer)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await serve_raw(nursery, handler)
        conn = await Connection.connect(b"http", "127.0.0.1", port, 10.0, None)
        try:
            with trio.fail_after(10):
                try:
                    response = await conn.request(method, b"/", HEADERS, b"")
                    body = b"".join([chunk async for chunk in response])
                except Exception as exc:  # the client's verdict is what the tests check
                    return exc, b"", conn.reusable
            return response, body, conn.reusable
        finally:
            await conn.aclose()
            nursery.cancel_scope.cancel()  # the origin's listener closes with its task
