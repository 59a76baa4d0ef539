"""The built-in server's bounds on a request head, at their exact edges, over real loopback
sockets: 64 KiB counted (the target, then each field as name, value and four bytes of
framing), 200 fields, and the same 64 KiB for trailers. At the bound the request is served;
one past it is a 431 (a 400 for trailers). The target and a field may arrive split across
reads."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.transport.raw import Seen, connect, drain_until_closed, echo_app, read_response, start

LIMIT = 64 * 1024


def target_of(counted: int) -> bytes:
    """An HTTP/1.0 request (no fields needed) whose target counts ``counted`` bytes."""
    return b"GET /" + b"t" * (counted - 1) + b" HTTP/1.0\r\n\r\n"


def fields_of(counted: int) -> bytes:
    """A request whose target and fields count ``counted`` bytes."""
    # "/" counts 1, host: h counts 4 + 1 + 4, x-big: <v> counts 5 + v + 4
    return b"GET / HTTP/1.1\r\nhost: h\r\nx-big: %s\r\n\r\n" % (b"v" * (counted - 1 - 9 - 9))


def n_fields(n: int) -> bytes:
    extra = b"".join(b"x-%d: 1\r\n" % i for i in range(n - 1))
    return b"GET / HTTP/1.1\r\nhost: h\r\n" + extra + b"\r\n"


def trailers_of(counted: int) -> bytes:
    """A chunked request whose trailer fields count ``counted`` bytes (x-t: <v>: 3 + v + 4)."""
    return (
        b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
        b"x-t: %s\r\n\r\n" % (b"v" * (counted - 7))
    )


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` (its first 64 KiB, then once the server has read them, the rest:
    what the server counts, not how the kernel splits the bytes, decides); the answer's head
    (lower-cased)."""
    async with await connect(port) as s:
        await s.send_all(request[:LIMIT])
        await trio.testing.wait_all_tasks_blocked()
        await s.send_all(request[LIMIT:])
        with trio.fail_after(10):
            head, _ = await read_response(s, bytearray())
        return head


@pytest.mark.parametrize(
    "request_",
    [target_of(LIMIT), fields_of(LIMIT), n_fields(200), trailers_of(LIMIT)],
    ids=["target", "fields", "200 fields", "trailers"],
)
async def test_a_request_at_the_bound_is_served(nursery: trio.Nursery, request_: bytes) -> None:
    port = await start(nursery, echo_app([]))
    answer = await exchange(port, request_)
    assert answer.startswith(b"http/1.1 200")


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (target_of(LIMIT + 1), b"431"),
        (fields_of(LIMIT + 1), b"431"),
        (n_fields(201), b"431"),
        (trailers_of(LIMIT + 1), b"400"),
    ],
    ids=["target", "fields", "201 fields", "trailers"],
)
async def test_a_request_one_past_the_bound_is_refused(
    nursery: trio.Nursery, request_: bytes, status: bytes
) -> None:
    port = await start(nursery, echo_app([]))
    answer = await exchange(port, request_)
    assert answer.startswith(b"http/1.1 " + status)


async def test_a_target_split_across_reads_is_served_whole(nursery: trio.Nursery) -> None:
    seen: Seen = []
    port = await start(nursery, echo_app(seen))
    async with await connect(port) as s:
        await s.send_all(b"GET /abc")
        await trio.testing.wait_all_tasks_blocked()  # the server has read the first part
        await s.send_all(b"def?q=1 HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
        assert (await drain_until_closed(s)).startswith(b"HTTP/1.1 200")
    assert seen[0]["scope"]["path"] == "/abcdef" and seen[0]["scope"]["query_string"] == b"q=1"


@pytest.mark.parametrize("late", [1, 10, 17, 64])
async def test_a_head_at_the_bound_is_served_when_its_last_bytes_arrive_late(
    nursery: trio.Nursery, late: int
) -> None:
    # The raw bytes of a head exceed what is counted (the method, the version, line ends):
    # a read that stops just short of the end must not look like an unfinished field.
    port = await start(nursery, echo_app([]))
    request = fields_of(LIMIT)
    async with await connect(port) as s:
        await s.send_all(request[:-late])
        await trio.testing.wait_all_tasks_blocked()  # the server has read all but the end
        await s.send_all(request[-late:])
        with trio.fail_after(10):
            head, _ = await read_response(s, bytearray())
    assert head.startswith(b"http/1.1 200")
