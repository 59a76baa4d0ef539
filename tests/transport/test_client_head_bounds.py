"""The client's bounds on an upstream's answer head, at their exact edges, over a real
loopback socket: 64 KiB of header fields (each counted as name, value and four bytes of
framing), 200 fields, and the same 64 KiB for trailers. At the bound the answer is read; one
past it is a protocol error (the gateway's 502), never a head held without limit."""

from __future__ import annotations

import httpcore
import pytest

from onwards_trio._transport.client import Response
from tests.transport.origin import answered

LIMIT = 64 * 1024


def head_of(counted: int) -> bytes:
    """An answer whose header fields count ``counted`` bytes."""
    # content-length: 2 counts 14 + 1 + 4; x-big: <v> counts 5 + v + 4
    return b"HTTP/1.1 200 OK\r\nx-big: %s\r\ncontent-length: 2\r\n\r\nok" % (
        b"v" * (counted - 19 - 9)
    )


def fields(n: int) -> bytes:
    """An answer of ``n`` header fields."""
    extra = b"".join(b"x-%d: 1\r\n" % i for i in range(n - 1))
    return b"HTTP/1.1 200 OK\r\n" + extra + b"content-length: 2\r\n\r\nok"


def trailers_of(counted: int) -> bytes:
    """A chunked answer whose trailer fields count ``counted`` bytes (x-t: <v>: 3 + v + 4)."""
    return (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: %s\r\n\r\n"
        % (b"v" * (counted - 7))
    )


@pytest.mark.parametrize(
    "answer", [head_of(LIMIT), fields(200), trailers_of(LIMIT)], ids=["head", "fields", "trailers"]
)
async def test_an_answer_at_the_bound_is_read(answer: bytes) -> None:
    response, body, _ = await answered(answer)
    assert isinstance(response, Response) and body == b"ok"


@pytest.mark.parametrize(
    "answer",
    [head_of(LIMIT + 1), fields(201), trailers_of(LIMIT + 1)],
    ids=["head", "fields", "trailers"],
)
async def test_an_answer_one_past_the_bound_is_a_protocol_error(answer: bytes) -> None:
    response, _, reusable = await answered(answer)
    assert isinstance(response, httpcore.RemoteProtocolError) and not reusable
