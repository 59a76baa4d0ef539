"""A provider's own rate limit refuses with a truthful ``Retry-After``, like a pool's."""

from __future__ import annotations

import httpx
import trio

from tests.support import FakeUpstream, serve_app, start_gateway


async def test_a_provider_rate_refusal_says_when_to_retry(nursery: trio.Nursery) -> None:
    provider = {"url": await serve_app(nursery, FakeUpstream())}
    provider["rate_limit"] = {"requests_per_second": 0.01, "burst_size": 1}  # one per 100 s
    _, url = await start_gateway(nursery, {"targets": {"m": {"providers": [provider]}}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=body)
        second = await client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200 and second.status_code == 429
    assert 90 <= int(second.headers["retry-after"]) <= 100
