"""A concurrency permit is free by the time its client has the whole answer.

A client that waits for each answer before sending its next request must never be refused by
a concurrency limit of one, even when the next request comes on a new connection (another
process, another pooled connection): the permit is released before the answer's last bytes
leave, not some scheduler passes later.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from tests.support import FakeUpstream, serve_app, start_gateway

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ONE = {"max_concurrent_requests": 1}


def key_limited(url: str) -> dict[str, Any]:
    return {
        "auth": {"key_definitions": {"one": {"key": "sk-one", "concurrency_limit": ONE}}},
        "targets": {"m": {"url": url}},
    }


def pool_limited(url: str) -> dict[str, Any]:
    return {"targets": {"m": {"providers": [{"url": url}], "concurrency_limit": ONE}}}


def provider_limited(url: str) -> dict[str, Any]:
    return {"targets": {"m": {"providers": [{"url": url, "concurrency_limit": ONE}]}}}


@pytest.mark.parametrize("config", [key_limited, pool_limited, provider_limited])
async def test_a_client_waiting_for_each_answer_is_never_refused(
    nursery: trio.Nursery, config: Any
) -> None:
    up = FakeUpstream()
    _, url = await start_gateway(nursery, config(await serve_app(nursery, up)))
    fresh = httpx.Limits(max_keepalive_connections=0)  # every request on a new connection
    statuses = []
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=fresh) as client:
        for _ in range(40):
            reply = await client.post(CHAT, json=BODY, headers={"authorization": "Bearer sk-one"})
            statuses.append(reply.status_code)
    assert statuses == [200] * 40
