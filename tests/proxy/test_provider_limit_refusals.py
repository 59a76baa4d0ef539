"""A provider's own limits refuse truthfully, like a pool's: a ``Retry-After`` that lets the
client in, and for a token limit the ``x-ratelimit-*-tokens`` of the limit that refused; in
process and with the limits shared in Redis."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
import trio

from tests.proxy.test_limits_redis import needs_redis, shared_config
from tests.proxy.test_token_limits import usage_reply
from tests.support import FakeUpstream, serve_app, start_gateway

SHARED = [False, pytest.param(True, marks=needs_redis)]


async def two_requests(
    nursery: trio.Nursery, limits: dict[str, Any], shared: bool
) -> tuple[httpx.Response, httpx.Response]:
    # the answer reports 200 tokens used: more than any limit below holds
    provider = {"url": await serve_app(nursery, FakeUpstream(usage_reply(100, 100))), **limits}
    config: dict[str, Any] = {"targets": {"m": {"providers": [provider]}}}
    if shared:
        config["shared_limits"] = shared_config("onwards-test-" + secrets.token_hex(4))
    _, url = await start_gateway(nursery, config)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=body)
        second = await client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    return first, second


@pytest.mark.parametrize("shared", SHARED)
async def test_a_provider_rate_refusal_says_when_to_retry(
    nursery: trio.Nursery, shared: bool
) -> None:
    one_per_100s = {"rate_limit": {"requests_per_second": 0.01, "burst_size": 1}}
    _, second = await two_requests(nursery, one_per_100s, shared)
    assert second.status_code == 429
    assert 90 <= int(second.headers["retry-after"]) <= 100


@pytest.mark.parametrize("shared", SHARED)
async def test_a_provider_token_refusal_says_when_to_retry_and_what_is_left(
    nursery: trio.Nursery, shared: bool
) -> None:
    # 30 tokens a 300 s: the first request's 200 tokens leave it in debt
    few = {"token_limit": {"tokens": 30, "window_secs": 300}}
    _, second = await two_requests(nursery, few, shared)
    assert second.status_code == 429
    assert second.headers["x-ratelimit-limit-tokens"] == "30"
    assert second.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(second.headers["retry-after"]) >= 1
