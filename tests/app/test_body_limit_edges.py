"""``body_limit_bytes`` at its edge, over real sockets: a body of exactly the limit is
forwarded whole, however it arrives (one piece or many, chunked or with a content-length);
one byte more is a 413 that names the limit and never reaches the upstream. The global body
budget is given back after every upload, and a client that leaves mid-upload sends nothing
upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.support import FakeUpstream, read_head, serve_app, start_gateway

CHAT = "/v1/chat/completions"
LIMIT = 1000


def body_of(length: int) -> bytes:
    head, tail = b'{"model":"m","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * (length - len(head) - len(tail)) + tail


async def post(
    nursery: trio.Nursery, payload: bytes, framing: str
) -> tuple[httpx.Response, FakeUpstream]:
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    _, url = await start_gateway(nursery, {"targets": targets, "body_limit_bytes": LIMIT})

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 300):
            yield payload[i : i + 300]
            await trio.sleep(0.02)  # separate writes: separate body messages at the gateway

    async def whole() -> AsyncIterator[bytes]:
        yield payload

    headers = {"content-type": "application/json"}
    content: bytes | AsyncIterator[bytes] = payload
    if framing == "chunked in one piece":
        content = whole()  # no content-length: only the body itself shows its size
    elif framing != "one piece":
        content = pieces()
        if framing == "pieces with content-length":
            headers["content-length"] = str(len(payload))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post(CHAT, content=content, headers=headers)
    return r, up


JSON = {"content-type": "application/json"}
FRAMINGS = ["one piece", "chunked in one piece", "chunked pieces", "pieces with content-length"]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_body_of_exactly_the_limit_is_forwarded_whole(
    nursery: trio.Nursery, framing: str
) -> None:
    payload = body_of(LIMIT)
    answer, up = await post(nursery, payload, framing)
    assert answer.status_code == 200
    assert [r.body for r in up.requests] == [payload]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_a_body_one_byte_over_the_limit_is_413(nursery: trio.Nursery, framing: str) -> None:
    answer, up = await post(nursery, body_of(LIMIT + 1), framing)
    assert answer.status_code == 413
    assert f"maximum allowed size is {LIMIT} bytes" in answer.json()["error"]["message"]
    assert up.requests == []


async def test_the_body_budget_is_given_back_after_each_upload(nursery: trio.Nursery) -> None:
    """Uploads one after another, each most of the global budget and read in pieces: every
    one is served (a budget not given back would refuse the second with a 503)."""
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    _, url = await start_gateway(nursery, {"targets": targets, "body_buffer_limit_bytes": 15_000})
    payload = body_of(10_000)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 2_000):
            yield payload[i : i + 2_000]
            await trio.sleep(0.02)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        statuses = [
            (await client.post(CHAT, content=pieces(), headers=JSON)).status_code for _ in range(3)
        ]
    assert statuses == [200, 200, 200]
    assert len(up.requests) == 3


@pytest.mark.parametrize("server", ["builtin", "hypercorn"])
async def test_a_client_gone_mid_upload_sends_nothing_upstream(
    nursery: trio.Nursery, server: str
) -> None:
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    gateway = Gateway(parse_config({"targets": targets, "body_limit_bytes": LIMIT}))
    serve = partial(gateway.serve, "127.0.0.1", 0)
    info = await nursery.start(serve if server == "builtin" else partial(serve, server=server))
    url = info.url
    port = int(url.rsplit(":", 1)[1])
    payload = body_of(600)  # whole JSON, but the head promises 400 more bytes (of spaces)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (len(payload) + 400)
    )
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head + payload[:300])
        await trio.sleep(0.1)
        await stream.send_all(payload[300:])
        await trio.sleep(0.1)
    # closed with 400 bytes still owed: what arrived parses, but it is not the body the client
    # declared, and must not be forwarded as if it were
    await trio.sleep(0.5)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (await client.get("/v1/models")).status_code == 200  # still serving
    assert up.requests == []


@pytest.mark.parametrize(("digits", "status"), [(20, b"200"), (21, b"413")])
async def test_a_declared_length_is_read_up_to_20_digits(
    nursery: trio.Nursery, digits: int, status: bytes
) -> None:
    # Leading zeros are valid (RFC 9110: 1*DIGIT). Twenty digits are read for their value;
    # more are refused unread, before the body, whatever they add up to.
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    _, url = await start_gateway(nursery, {"targets": targets, "body_limit_bytes": LIMIT})
    payload = body_of(100)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %s\r\n\r\n" % str(len(payload)).zfill(digits).encode()
    )
    async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as stream:
        await stream.send_all(head + payload)
        with trio.fail_after(10):
            answer = await read_head(stream)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert [r.body for r in up.requests] == ([payload] if status == b"200" else [])
