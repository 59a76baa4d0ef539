"""Request smuggling, over raw loopback sockets: a corpus of framing tricks sent through the
gateway to a recording upstream (none may put a second request upstream), and a differential
property test of the built-in server against h11 on mutated request streams."""

from __future__ import annotations

import logging
import re
from typing import Any

import h11
import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.support import FakeUpstream, serve_app, start_gateway
from tests.transport.raw import start

SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n\r\n"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"

# Ways to spell (or almost spell) "Transfer-Encoding: chunked". A strict parser either reads
# the header as chunked, refuses the request, or reads an unrelated header.
TE_SPELLINGS = [
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding:chunked",
    b"Transfer-Encoding: chunked ",
    b"Transfer-Encoding:\tchunked",
    b"transfer-encoding: CHUNKED",
    b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: identity, chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding:\x0bchunked",
    b"Transfer-Encoding: \x00chunked",
    b"Transfer-Encoding\x00: chunked",
    b"Transfer-Encoding: chu\rnked",
    b"X-Pad: 1\r\n Transfer-Encoding: chunked",
    b"X-Pad: 1\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: \xffchunked",
    b"Transfer-Encoding: chunked\x85",
    b"Transfer_Encoding: chunked",
    b"Transfer-Encoding: 'chunked'",
    b'Transfer-Encoding: "chunked"',
]
# Ways to spell a content-length that is not the plain one the body has.
CL_SPELLINGS = [
    b"Content-Length: +%d",
    b"Content-Length: 0x%x",
    b"Content-Length: %d, %d",
    b"Content-Length: %d\r\nContent-Length: 4",
    b"Content-Length: 4\r\nContent-Length: %d",
    b"Content-Length:\x0b%d",
    b"Content-Length: %d\x00",
    b"Content-Length: %d.0",
    b"Content-Length: -%d",
    b"Content-Length: %d_0",
    b"Content-Length: 1 %d",
    b"Content-Length: " + b"9" * 5000,
    b"Content-Length: 18446744073709551616",
    b"X-Pad: 1\r\n Content-Length: %d",
]
# Chunked bodies a lenient reader ends early, leaving SMUGGLED as the next request.
CHUNK_TRICKS = [
    b"2;\nxx\r\n51\r\n0\r\n\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",  # bare LF in an extension
    b"0\r\n\n" + SMUGGLED,  # bare LF ending the trailers
    b"0\n\n" + SMUGGLED,
    b"0\r\nX: y\n\r\n" + SMUGGLED,
    b"0\r\nX: y\r" + SMUGGLED,
    b"0 \r\n\r\n" + SMUGGLED,
    b"0\t\r\n\r\n" + SMUGGLED,
    b"0\r\n\r\r\n" + SMUGGLED,
    b"0x0\r\n\r\n" + SMUGGLED,
    b"+0\r\n\r\n" + SMUGGLED,
    b"-0\r\n\r\n" + SMUGGLED,
    b"0_0\r\n\r\n" + SMUGGLED,
    b"3\r\nabcX\r\n0\r\n\r\n" + SMUGGLED,  # chunk data longer than its size
    b"3\r\nab\r\n0\r\n\r\n" + SMUGGLED,  # shorter
    b"3\r\nabc0\r\n\r\n" + SMUGGLED,  # no CRLF after the data
    b"3\nabc\n0\n\n" + SMUGGLED,
    b"3\rabc\r0\r\r" + SMUGGLED,
    b"3;ext=\x00\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    b'3;ext="a\nb"\r\nabc\r\n0\r\n\r\n' + SMUGGLED,
    b"3 ;x\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    b"0\r\nContent-Length: 5\r\nX:\x01\r\n\r\n" + SMUGGLED,
    b"0\r\n X: folded\r\n\r\n" + SMUGGLED,
]
# Heads a lenient reader frames differently (the body under the plain reading holds SMUGGLED).
HEAD_TRICKS = [
    b"POST /v1/chat/completions HTTP/1.1\nHost: x\nmodel-override: m\nContent-Length: %d\n\n",
    b"POST /v1/chat/completions HTTP/1.1\rHost: x\rmodel-override: m\rContent-Length: %d\r\r",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nHost: y\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nmodel-override: m\r\nContent-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nmodel-override: m\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.2\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/2.0\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions\r\nHost: x\r\nmodel-override: m\r\nContent-Length: %d\r\n\r\n",
    b"POST  /v1/chat/completions  HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1 \r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions\x00 HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\nmodel-override: m\r\nContent-Length: %d\r\n\r\n",
    b"POST x:443 HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\nContent-Length: %d\r\n\r\n",
    b"post /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\nX: a\x7fb\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\n: empty-name\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nmodel-override: m\r\n"
    b"Content-Length: %d\r\nX Y: spaced\r\n\r\n",
]


def _corpus() -> list[bytes]:
    cases = []
    for te in TE_SPELLINGS:
        # CL covers everything; a reader that takes the chunked framing instead ends the body at
        # the "0" chunk and reads SMUGGLED as the next request.
        body = b"0\r\n\r\n" + SMUGGLED
        cases.append(HEAD + b"Content-Length: %d\r\n" % len(body) + te + b"\r\n\r\n" + body)
        cases.append(HEAD + te + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        # Only the TE spelling frames the body (SMUGGLED sits inside a chunk); a reader that
        # ignores it and reads no body sees SMUGGLED after the chunk-size line.
        chunk = b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"
        if te.startswith((b"Transfer-Encoding: chunked", b"Transfer-Encoding:")):
            cases.append(HEAD + te + b"\r\nContent-Length: 4\r\n\r\n" + chunk)
    for cl in CL_SPELLINGS:
        body = SMUGGLED
        n = len(body)
        head = cl % ((n,) * cl.count(b"%")) if b"%" in cl else cl
        cases.append(HEAD + head + b"\r\n\r\n" + body)
        cases.append(HEAD + head + b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + body)
    for trick in CHUNK_TRICKS:
        cases.append(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + trick)
    for head in HEAD_TRICKS:
        cases.append(head % len(SMUGGLED) + SMUGGLED)
    return cases


CORPUS = _corpus()


async def _exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data`` and return what comes back until the connection closes, or until an
    answer came and then half a second of quiet (a keep-alive connection after a valid
    request: a smuggled request would have been answered by then). ``half_close`` sends EOF
    after the data (the server then serves what it parsed and closes)."""
    out = b""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                if half_close:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # refused mid-send: the answer is still readable
            while True:
                with trio.move_on_after(0.5 if b"\r\n\r\n" in out else 15):
                    try:
                        chunk = await stream.receive_some()
                    except trio.BrokenResourceError:
                        chunk = b""
                    if not chunk:
                        return out
                    out += chunk
                    continue
                return out


def _responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each content-length framed response in ``data``."""
    found = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response: {data[:200]!r}"
        match = re.match(rb"HTTP/1\.1 (\d{3}) ", head)
        assert match, f"not a response: {head[:200]!r}"
        length = re.search(rb"(?im)^content-length: (\d+)$", head)
        assert length, f"a response without a length: {head!r}"
        n = int(length.group(1))
        found.append((int(match.group(1)), rest[:n]))
        data = rest[n:]
    return found


def test_the_corpus_holds_at_least_a_hundred_requests() -> None:
    assert len(CORPUS) >= 100
    assert all(SMUGGLED in case for case in CORPUS)


async def test_no_corpus_request_smuggles_a_second_request_upstream(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = FakeUpstream()
    config = {"targets": {"m": {"url": await serve_app(nursery, upstream)}}}
    _, url = await start_gateway(nursery, config)
    port = int(url.rsplit(":", 1)[1])
    outcomes: dict[int, int] = {}
    for case in CORPUS:
        answers = _responses(await _exchange(port, case))
        assert len(answers) <= 1, case  # never a second answer: nothing was read as a request
        for status, body in answers:
            outcomes[status] = outcomes.get(status, 0) + 1
            assert status in (200, 400, 431), case
            if status != 200:
                assert orjson.loads(body)["error"]["code"] in (
                    "bad_request",
                    "request_header_fields_too_large",
                ), case
    assert [r.path for r in upstream.requests if "smuggled" in r.path] == []
    assert not [k for r in upstream.requests for k in r.headers if "_" in k]
    assert outcomes.get(400, 0) > len(CORPUS) // 2  # most of the corpus is malformed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the differential property test ---------------------------------------------------------------

SEED = (
    b"POST /a?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;e=v\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n"
)
# Bytes that move framing around when inserted or swapped in.
INTERESTING = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b"0", b"5", b"a", b"\x00", b"\x0b", b","]
)


def _h11_requests(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """The requests h11 reads from ``data`` (method, target, body), up to its first refusal."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    found: list[tuple[bytes, bytes, bytes]] = []
    current: list[Any] = []
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                current = [bytes(event.method), bytes(event.target), b""]
            elif isinstance(event, h11.Data):
                current[2] += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                found.append((current[0], current[1], current[2]))
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
            else:  # NEED_DATA, PAUSED, ConnectionClosed: nothing more is a request
                return found
    except h11.ProtocolError:
        return found


def _recording_app(seen: list[tuple[bytes, bytes, bytes]]) -> Any:
    """Records each request whose body arrived whole (method, target, body), answers 200."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the body broke off: not a request that was accepted
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"]
        target = scope["raw_path"] + (b"?" + query if query else b"")
        seen.append((scope["method"].encode(), target, body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@given(
    edits=st.lists(st.tuples(st.integers(0, len(SEED)), st.integers(0, 3), INTERESTING), max_size=4)
)
async def test_the_server_never_splits_a_stream_differently_from_h11(
    edits: list[tuple[int, int, bytes]],
) -> None:
    """Mutate a pipelined stream (insert, replace or delete bytes at random places); where
    both the server and h11 accept a request, they must agree on where it starts and ends."""
    data = SEED
    for at, delete, insert in edits:
        data = data[:at] + insert + data[at + delete :]
    ours: list[tuple[bytes, bytes, bytes]] = []
    async with trio.open_nursery() as nursery:
        port = await start(nursery, _recording_app(ours))
        await _exchange(port, data, half_close=True)
        nursery.cancel_scope.cancel()
    theirs = _h11_requests(data)
    common = min(len(ours), len(theirs))
    assert ours[:common] == theirs[:common], data
