"""Each provider's rate limit is its own, in process and shared in Redis: the same position in
another pool, or another provider of the same pool, never spends it."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
import trio

from tests.proxy.test_limits_redis import needs_redis, shared_config
from tests.support import FakeUpstream, serve_app, start_gateway

SHARED = [False, pytest.param(True, marks=needs_redis)]
ONCE = {"requests_per_second": 0.001, "burst_size": 1}  # one request, then refused
BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def gateway_url(nursery: trio.Nursery, targets: dict[str, Any], shared: bool) -> str:
    config: dict[str, Any] = {"targets": targets}
    if shared:
        config["shared_limits"] = shared_config("onwards-test-" + secrets.token_hex(4))
    _, url = await start_gateway(nursery, config)
    return url


@pytest.mark.parametrize("shared", SHARED)
async def test_the_first_provider_of_two_pools_has_two_limits(
    nursery: trio.Nursery, shared: bool
) -> None:
    a, b = FakeUpstream(), FakeUpstream()
    targets = {
        "a": {"providers": [{"url": await serve_app(nursery, a), "rate_limit": ONCE}]},
        "b": {"providers": [{"url": await serve_app(nursery, b), "rate_limit": ONCE}]},
    }
    url = await gateway_url(nursery, targets, shared)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        codes = [
            (await client.post("/v1/chat/completions", json={"model": m, **BODY})).status_code
            for m in ("a", "b", "a")
        ]
    assert codes == [200, 200, 429]  # b had its own request; a's limit holds
    assert (len(a.requests), len(b.requests)) == (1, 1)


@pytest.mark.parametrize("shared", SHARED)
async def test_a_pools_second_provider_has_its_own_limit(
    nursery: trio.Nursery, shared: bool
) -> None:
    first, second = FakeUpstream(), FakeUpstream()
    pool = {
        "providers": [
            {"url": await serve_app(nursery, first), "rate_limit": ONCE},
            {"url": await serve_app(nursery, second), "rate_limit": ONCE},
        ],
        "strategy": "priority",
        "fallback": {"enabled": True, "on_rate_limit": True},
    }
    url = await gateway_url(nursery, {"m": pool}, shared)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        codes = [
            (await client.post("/v1/chat/completions", json={"model": "m", **BODY})).status_code
            for _ in range(3)
        ]
    # the second request falls back to the second provider, whose one request is still there
    assert codes == [200, 200, 429]
    assert (len(first.requests), len(second.requests)) == (1, 1)
