"""Whether the client keeps a connection after an answer, over a real loopback socket: only
when the server keeps it alive and nothing beyond the answer arrived (bytes after it would be
read as the next request's answer). An answer to HEAD has no body, whatever its head says."""

from __future__ import annotations

from tests.transport.origin import answered


async def test_a_head_answer_kept_alive_is_reusable() -> None:
    _, _, reusable = await answered(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", b"HEAD")
    assert reusable


async def test_a_head_answer_saying_connection_close_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    _, _, reusable = await answered(answer, b"HEAD")
    assert not reusable


async def test_a_head_answer_followed_by_body_bytes_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
    _, _, reusable = await answered(answer, b"HEAD")
    assert not reusable


async def test_an_answer_followed_by_garbage_is_kept_but_not_reused() -> None:
    _, body, reusable = await answered(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\x00garbage\r\n\r\n"
    )
    assert body == b"ok" and not reusable
