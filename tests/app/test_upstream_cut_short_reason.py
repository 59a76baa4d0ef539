"""An upstream answer that breaks off after its first bytes were relayed, over raw loopback
sockets: the one warning line the gateway logs says why (the connection closed mid-body, a
malformed chunk, trailers over the bound), so an operator can tell the cases apart."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.app.test_request_limits import chat, post
from tests.support import read_head, serve_raw, start_gateway

CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("first", "rest", "reason"),
    [
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\nok",
            b"",
            "(server disconnected mid-body)",
        ),
        (CHUNKED + b"2\r\nok\r\n", b"zz\r\n", "(malformed response: "),
        (
            CHUNKED + b"2\r\nok\r\n",
            b"0\r\nx-t: " + b"v" * 70_000 + b"\r\n\r\n",
            "(response head too large)",
        ),
    ],
    ids=["closed", "malformed chunk", "trailers"],
)
async def test_the_cut_short_warning_says_why(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    first: bytes,
    rest: bytes,
    reason: str,
) -> None:
    relayed = trio.Event()  # the first bytes reached the client: the answer is committed

    async def upstream(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(first)
        await relayed.wait()
        await stream.send_all(rest)
        await stream.send_eof()

    url = f"http://127.0.0.1:{await serve_raw(nursery, upstream)}"
    _, gateway = await start_gateway(nursery, {"targets": {"m": {"url": url}}})
    with caplog.at_level(logging.WARNING):
        async with await trio.open_tcp_stream("127.0.0.1", int(gateway.rsplit(":", 1)[1])) as s:
            await s.send_all(post(chat()))
            data = b""
            with trio.fail_after(30):
                while b"ok" not in data.partition(b"\r\n\r\n")[2]:
                    data += await s.receive_some()
                relayed.set()
                while await s.receive_some():
                    pass
    cut = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert len(cut) == 1 and reason in cut[0]
