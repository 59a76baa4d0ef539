"""Header values of an upstream's answer as the client hands them on, over a real loopback
socket: trailing spaces and tabs are dropped (they are not part of the value, RFC 9110
§5.5), every other byte is kept."""

from __future__ import annotations

from onwards_trio._transport.client import Response
from tests.transport.origin import answered


async def test_trailing_whitespace_of_a_value_is_dropped_and_the_rest_kept() -> None:
    response, _, _ = await answered(
        b"HTTP/1.1 200 OK\r\nx-a: \tsome value X \t \r\ncontent-length: 0\r\n\r\n"
    )
    assert isinstance(response, Response)
    assert (b"x-a", b"some value X") in response.headers
