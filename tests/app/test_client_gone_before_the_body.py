"""A client that sends a request head promising a body and leaves before a byte of it, over
raw loopback sockets on both servers: nothing reaches the upstream (an empty body is not the
body the client declared)."""

from __future__ import annotations

from functools import partial

import httpx
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.support import FakeUpstream, serve_app


@pytest.mark.parametrize("server", ["builtin", "hypercorn"])
async def test_a_client_gone_before_its_body_sends_nothing_upstream(
    nursery: trio.Nursery, server: str
) -> None:
    up = FakeUpstream()
    gateway = Gateway(parse_config({"targets": {"m": {"url": await serve_app(nursery, up)}}}))
    serve = partial(gateway.serve, "127.0.0.1", 0)
    info = await nursery.start(serve if server == "builtin" else partial(serve, server=server))
    async with await trio.open_tcp_stream("127.0.0.1", int(info.url.rsplit(":", 1)[1])) as s:
        await s.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nmodel-override: m\r\n"
            b"content-type: application/json\r\ncontent-length: 100\r\n\r\n"
        )
        await trio.testing.wait_all_tasks_blocked()  # the gateway waits for the body
    await trio.testing.wait_all_tasks_blocked()
    async with httpx.AsyncClient(base_url=info.url, timeout=30) as client:
        assert (await client.get("/v1/models")).status_code == 200  # still serving
    assert up.requests == []
