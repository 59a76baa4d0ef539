"""An upstream's interim (1xx) answers before its final one, over raw loopback sockets: the
gateway skips them and relays the final answer whole."""

from __future__ import annotations

import pytest
import trio

from tests.app.test_request_limits import chat, exchange, post, raw_upstream
from tests.support import start_gateway

FINAL = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"a":"xyz"}'
)


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
)
async def test_interim_answers_are_skipped_and_the_final_answer_relayed(
    nursery: trio.Nursery, interim: bytes
) -> None:
    upstream = await raw_upstream(nursery, interim + FINAL)
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": upstream}}})
    status, headers, body = await exchange(int(url.rsplit(":", 1)[1]), post(chat()))
    assert status == 200 and body == b'{"a":"xyz"}'
    assert "link" not in headers
