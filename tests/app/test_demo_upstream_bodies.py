"""The demo upstream (``onwards-trio demo``) over a real loopback socket: a request body that
arrives in several pieces is read whole and answered."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import trio

from onwards_trio._app.demo import demo_upstream
from tests.support import serve_app


async def test_the_demo_upstream_answers_a_chat_body_sent_in_pieces(nursery: trio.Nursery) -> None:
    url = await serve_app(nursery, demo_upstream(delay=0))
    payload = orjson.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "hello " + "x" * 3000}]}
    )

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]
            await trio.sleep(0.02)  # separate writes: separate body messages at the server

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post(
            "/v1/chat/completions", content=pieces(), headers={"content-type": "application/json"}
        )
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"
