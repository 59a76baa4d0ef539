"""Whether the client keeps a connection after an answer to HEAD, over a real loopback socket:
an answer to HEAD has no body, so the connection is reusable only when the server keeps it
alive and nothing beyond the head arrived (bytes after it would be read as the next answer)."""

from __future__ import annotations

from functools import partial

import trio

from onwards_trio._transport.client import Connection


async def reusable_after_head(answer: bytes) -> bool:
    """A HEAD request on a fresh connection to a server that answers ``answer`` in one write
    and keeps its socket open; whether the connection is reusable once the answer is read."""

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        await stream.send_all(answer)
        await trio.sleep_forever()  # only the answer says whether the link stays open

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        conn = await Connection.connect(b"http", "127.0.0.1", port, 10.0, None)
        try:
            with trio.fail_after(10):
                response = await conn.request(b"HEAD", b"/", [(b"host", b"upstream")], b"")
                assert response.status == 200
                assert [chunk async for chunk in response] == []
            return conn.reusable
        finally:
            await conn.aclose()
            for listener in listeners:
                await listener.aclose()
            nursery.cancel_scope.cancel()


async def test_a_head_answer_kept_alive_is_reusable() -> None:
    assert await reusable_after_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")


async def test_a_head_answer_saying_connection_close_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    assert not await reusable_after_head(answer)


async def test_a_head_answer_followed_by_body_bytes_is_not_reused() -> None:
    assert not await reusable_after_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
