"""A provider's concurrency limit shared in Redis: each answer gives its slot back when it
ends, so requests one after another are all served; while Redis is unavailable the local
permit alone rules and the request is served as usual."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
import trio

from tests.proxy.test_limits_redis import (
    _COREDIS_LEAK,
    _closed_port,
    _collect_coredis_leaks,  # noqa: F401 (an autouse fixture)
    needs_redis,
    shared_config,
)
from tests.support import FakeUpstream, serve_app, start_gateway

pytestmark = pytest.mark.filterwarnings(_COREDIS_LEAK)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def codes_of_three(nursery: trio.Nursery, shared: dict[str, Any]) -> list[int]:
    provider = {
        "url": await serve_app(nursery, FakeUpstream()),
        "concurrency_limit": {"max_concurrent_requests": 1},
    }
    config = {"targets": {"m": {"providers": [provider]}}, "shared_limits": shared}
    _, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [
            (await client.post("/v1/chat/completions", json=BODY)).status_code for _ in range(3)
        ]


@needs_redis
async def test_a_providers_one_shared_slot_serves_requests_one_after_another(
    nursery: trio.Nursery,
) -> None:
    shared = shared_config("onwards-test-" + secrets.token_hex(4))
    assert await codes_of_three(nursery, shared) == [200, 200, 200]


async def test_with_redis_unavailable_a_provider_with_a_slot_limit_serves(
    nursery: trio.Nursery,
) -> None:
    url = f"redis://127.0.0.1:{await _closed_port()}/0"
    shared = shared_config("onwards-test-" + secrets.token_hex(4), url, timeout_ms=50)
    assert await codes_of_three(nursery, shared) == [200, 200, 200]
