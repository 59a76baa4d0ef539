"""``body_limit_bytes`` at its edge, over real sockets: a body of exactly the limit is
forwarded whole, however it arrives (one piece or many, chunked or with a content-length);
one byte more is a 413 and never reaches the upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from tests.support import FakeUpstream, serve_app, start_gateway

CHAT = "/v1/chat/completions"
LIMIT = 1000


def body_of(length: int) -> bytes:
    head, tail = b'{"model":"m","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * (length - len(head) - len(tail)) + tail


async def post(nursery: trio.Nursery, payload: bytes, framing: str) -> tuple[int, FakeUpstream]:
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    _, url = await start_gateway(nursery, {"targets": targets, "body_limit_bytes": LIMIT})

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 300):
            yield payload[i : i + 300]
            await trio.sleep(0.02)  # separate writes: separate body messages at the gateway

    headers = {"content-type": "application/json"}
    content: bytes | AsyncIterator[bytes] = payload
    if framing != "one piece":
        content = pieces()
        if framing == "pieces with content-length":
            headers["content-length"] = str(len(payload))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post(CHAT, content=content, headers=headers)
    return r.status_code, up


FRAMINGS = ["one piece", "chunked pieces", "pieces with content-length"]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_body_of_exactly_the_limit_is_forwarded_whole(
    nursery: trio.Nursery, framing: str
) -> None:
    payload = body_of(LIMIT)
    status, up = await post(nursery, payload, framing)
    assert status == 200
    assert [r.body for r in up.requests] == [payload]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_body_one_byte_over_the_limit_is_413(nursery: trio.Nursery, framing: str) -> None:
    status, up = await post(nursery, body_of(LIMIT + 1), framing)
    assert status == 413
    assert up.requests == []
