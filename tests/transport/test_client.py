"""The lean HTTP/1.1 client: framing, keep-alive decisions, errors (over in-memory streams),
and the pool's retry of a request that met a closed idle connection (over real sockets)."""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import httpcore
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio import parse_config
from onwards_trio._config import HttpPool
from onwards_trio._proxy.targets import Targets
from onwards_trio._transport.client import Connection, NoResponse
from onwards_trio._transport.pool import UpstreamClient

HEADERS = [(b"host", b"upstream"), (b"content-length", b"2")]


async def exchange(
    answer: bytes, method: bytes = b"POST", pieces: int = 1
) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool, bytes]:
    """Send one request on a fresh connection whose server answers ``answer`` (cut into
    ``pieces`` writes); return status, headers, body, reusable, and what the server read."""
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)
    received = b""

    async def server() -> None:
        nonlocal received
        while b"\r\n\r\n" not in received:
            received += await server_end.receive_some()
        step = max(1, len(answer) // pieces)
        for i in range(0, len(answer), step):
            await server_end.send_all(answer[i : i + step])
        await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(method, b"/v1/x?q=1", HEADERS, b"{}")
        body = b"".join([chunk async for chunk in response])
    return response.status, response.headers, body, conn.reusable, received


async def test_request_is_written_whole_and_as_given() -> None:
    *_, received = await exchange(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert received == b"POST /v1/x?q=1 HTTP/1.1\r\nhost: upstream\r\ncontent-length: 2\r\n\r\n{}"


@pytest.mark.parametrize("pieces", [1, 3, 40])
async def test_content_length_body(pieces: int) -> None:
    status, headers, body, reusable, _ = await exchange(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
        b'{"a":"xyz"}',
        pieces=pieces,
    )
    assert status == 201 and body == b'{"a":"xyz"}' and reusable
    assert (b"Content-Type", b"application/json") in headers


@given(cut=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=30))
async def test_chunked_body_survives_any_fragmentation(cut: list[int]) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
    )
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await server_end.receive_some()
        i = 0
        for n in cut * 20:
            if i >= len(raw):
                break
            await server_end.send_all(raw[i : i + n])
            i += n
        await server_end.send_all(raw[i:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(b"POST", b"/", HEADERS, b"{}")
        body = b"".join([chunk async for chunk in response])
    assert body == b"hello world"
    assert conn.reusable


@pytest.mark.parametrize(
    ("answer", "method"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"POST"),
        (b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n", b"GET"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", b"HEAD"),
    ],
)
async def test_answers_without_a_body(answer: bytes, method: bytes) -> None:
    _, _, body, reusable, _ = await exchange(answer, method)
    assert body == b"" and reusable


async def test_body_until_close_is_not_reusable() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        await server_end.receive_some()
        await server_end.send_all(b"HTTP/1.1 200 OK\r\n\r\nall of ")
        await server_end.send_all(b"it")
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(b"GET", b"/", [(b"host", b"u")], b"")
        assert b"".join([c async for c in response]) == b"all of it"
    assert not conn.reusable


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ],
)
async def test_connection_close_and_http10_are_not_reused(answer: bytes) -> None:
    _, _, body, reusable, _ = await exchange(answer)
    assert body == b"ok" and not reusable


async def test_interim_100_continue_is_skipped() -> None:
    status, _, body, _, _ = await exchange(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    )
    assert status == 200 and body == b"ok"


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 999 High\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 2000\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.12 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-a: 1\nset-cookie: evil\r\n\r\n",
    ],
)
async def test_malformed_heads_are_protocol_errors(answer: bytes) -> None:
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(answer)


async def test_a_server_that_closes_before_answering_is_no_response() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        await server_end.receive_some()
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with pytest.raises(NoResponse):
            await conn.request(b"GET", b"/", [(b"host", b"u")], b"")


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        await server_end.receive_some()
        await server_end.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(b"GET", b"/", [(b"host", b"u")], b"")
        with pytest.raises(httpcore.RemoteProtocolError):
            async for _ in response:
                pass


async def test_an_unread_body_makes_the_connection_unusable() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        await server_end.receive_some()
        await server_end.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(b"GET", b"/", [(b"host", b"u")], b"")
        await response.__anext__()
        await response.aclose()
    assert not conn.reusable


async def test_pool_retries_once_when_a_kept_alive_connection_was_closed() -> None:
    """The server answers the first request, then drops the idle connection without a FIN
    the client could see in time; the second request must succeed on a fresh connection."""
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        if first:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1")
            data = b""
            while b"\r\n\r\n" not in data:  # read the second request, then hang up
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            await stream.aclose()
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n2")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        provider = (
            Targets(parse_config({"targets": {"m": {"url": f"http://127.0.0.1:{port}"}}}))
            .table.pools["m"]
            .providers[0]
        )
        client = UpstreamClient()
        bodies = []
        for _ in range(2):
            response = await client.send(provider, b"GET", b"/", [(b"host", b"x")], b"")
            bodies.append(b"".join([c async for c in response]))
            await response.aclose()
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert bodies == [b"1", b"2"]
    assert connections == 2


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"0_5", b" 5", b"-5"])
async def test_chunk_sizes_are_strict_hex(size: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%s\r\nhello\r\n0\r\n\r\n"
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(answer % size)


@pytest.mark.parametrize(
    "length",
    [
        b"content-length: +2",
        b"content-length: -1",
        b"content-length: 0_2",
        b"content-length: 2\r\ncontent-length: 3",
    ],
)
async def test_content_length_is_digits_and_repeats_must_agree(length: bytes) -> None:
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(b"HTTP/1.1 200 OK\r\n%s\r\n\r\nokk" % length)


async def test_content_length_beside_transfer_encoding_is_a_protocol_error() -> None:
    """A message framed both ways is how responses get desynchronised: llhttp refuses it."""
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )


async def test_a_final_coding_other_than_chunked_reads_to_the_end_of_the_connection() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    conn = Connection(client_end)

    async def server() -> None:
        await server_end.receive_some()
        await server_end.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabcd")
        await server_end.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        response = await conn.request(b"GET", b"/", [(b"host", b"u")], b"")
        assert b"".join([c async for c in response]) == b"abcd"
    assert not conn.reusable


class _CutAfter(trio.abc.Stream):
    """Delivers ``data``, then fails as a reset connection does."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.data:
            data, self.data = self.data, b""
            return data
        raise trio.BrokenResourceError("connection reset")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_reset_after_part_of_the_head_is_not_retryable() -> None:
    """Once any response byte arrived the upstream may have acted: never NoResponse."""
    conn = Connection(_CutAfter(b"HTTP/1.1 200 OK\r\n"))
    with pytest.raises(httpcore.ReadError):
        await conn.request(b"POST", b"/", HEADERS, b"{}")


async def test_a_reset_before_any_byte_is_retryable() -> None:
    conn = Connection(_CutAfter(b""))
    with pytest.raises(NoResponse):
        await conn.request(b"POST", b"/", HEADERS, b"{}")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
async def test_101_switching_protocols_is_a_protocol_error(answer: bytes) -> None:
    """The gateway never asks for an upgrade: a 101 is not relayed as if it were an answer."""
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(answer)


class _Origin:
    """A keep-alive origin on a real socket that answers ``ok`` to every request, holding
    each answer until ``gate`` is set; it counts connections opened and closed."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.open_now = 0
        self.peak = 0
        self.gate = trio.Event()
        self.gate.set()

    async def handler(self, stream: trio.SocketStream) -> None:
        self.opened += 1
        self.open_now += 1
        self.peak = max(self.peak, self.open_now)
        try:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[1]
                await self.gate.wait()
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        finally:
            self.open_now -= 1
            self.closed += 1


async def _get(client: UpstreamClient, provider: Any) -> bytes:
    response = await client.send(provider, b"GET", b"/", [(b"host", b"x")], b"")
    try:
        return b"".join([c async for c in response])
    finally:
        await response.aclose()


async def _origin(nursery: trio.Nursery, origin: _Origin) -> Any:
    listeners = await nursery.start(trio.serve_tcp, origin.handler, 0)
    port = listeners[0].socket.getsockname()[1]
    config = {"targets": {"m": {"url": f"http://127.0.0.1:{port}"}}}
    return Targets(parse_config(config)).table.pools["m"].providers[0]


async def test_max_connections_bounds_the_connections_to_an_origin() -> None:
    origin = _Origin()
    origin.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        provider = await _origin(nursery, origin)
        client = UpstreamClient(HttpPool(max_connections=2))
        bodies: list[bytes] = []

        async def one() -> None:
            bodies.append(await _get(client, provider))

        try:
            async with trio.open_nursery() as requests:
                for _ in range(5):
                    requests.start_soon(one)
                await trio.sleep(0.2)
                opened = origin.opened
                origin.gate.set()
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert opened == 2  # the other three waited for a connection
    assert bodies == [b"ok"] * 5 and origin.peak == 2


async def test_expired_idle_connections_are_closed_under_steady_traffic() -> None:
    """After a burst, steady one-at-a-time traffic reuses only the top of the idle stack;
    the expired connections beneath it must be closed, not kept open for good."""
    origin = _Origin()
    origin.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        provider = await _origin(nursery, origin)
        client = UpstreamClient(HttpPool(idle_timeout_secs=0.3))
        try:
            async with trio.open_nursery() as burst:
                for _ in range(3):
                    burst.start_soon(_get, client, provider)
                await trio.sleep(0.1)
                origin.gate.set()
            for _ in range(12):
                await _get(client, provider)
                await trio.sleep(0.05)
            await trio.sleep(0.05)
            opened, closed = origin.opened, origin.closed
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert opened == 3 and closed == 2


async def test_connect_is_never_sent() -> None:
    """A 2xx to CONNECT would turn a pooled upstream link into a tunnel."""
    conn = Connection(_CutAfter(b""))
    with pytest.raises(httpcore.UnsupportedProtocol):
        await conn.request(b"CONNECT", b"h:443", [(b"host", b"h:443")], b"")


async def test_an_unsolicited_second_answer_never_reaches_the_next_request() -> None:
    """An upstream that answers once more while the connection idles in the pool: that
    connection is discarded, and the next request gets its own answer on a fresh one."""

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):  # the client dropped the link
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some()
                    if not chunk:
                        return
                    data += chunk
                data = data[data.index(b"\r\n\r\n") + 4 :]
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nreal")
                await trio.sleep(0.02)
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        provider = (
            Targets(parse_config({"targets": {"m": {"url": f"http://127.0.0.1:{port}"}}}))
            .table.pools["m"]
            .providers[0]
        )
        client = UpstreamClient()
        bodies = []
        for _ in range(5):
            response = await client.send(provider, b"GET", b"/", [(b"host", b"x")], b"")
            bodies.append(b"".join([c async for c in response]))
            await response.aclose()
            await trio.sleep(0.2)  # the stray answer arrives while the connection idles
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert bodies == [b"real"] * 5


async def test_an_answer_in_the_same_read_as_a_stray_one_is_kept_but_not_reused() -> None:
    _, _, body, reusable, _ = await exchange(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    )
    assert body == b"ok" and not reusable


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"x: y\r\n" * 201 + b"content-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx\x01y: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\x01b\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\rb\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 600 High\r\ncontent-length: 0\r\n\r\n",
    ],
)
async def test_hostile_heads_are_protocol_errors(answer: bytes) -> None:
    """Oversized heads, unframeable lengths, names with spaces or controls, control characters
    in values, statuses we could not relay: never passed on to the client."""
    with pytest.RaisesGroup(httpcore.RemoteProtocolError):
        await exchange(answer)


async def test_a_204_has_no_body_whatever_its_content_length_says() -> None:
    _, _, body, reusable, _ = await exchange(
        b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"
    )
    assert body == b"" and reusable


@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"u"), (b"x", b"a\r\nInjected: 1")],
        [(b"host", b"u"), (b"x", b"a\nb")],
        [(b"host", b"u"), (b"x", b"a\x00b")],
        [(b"host", b"u"), (b"x\r\ny", b"1")],
    ],
)
async def test_control_characters_are_never_written_upstream(
    headers: list[tuple[bytes, bytes]],
) -> None:
    conn = Connection(_CutAfter(b""))
    with pytest.raises(httpcore.LocalProtocolError):
        await conn.request(b"GET", b"/", headers, b"")
