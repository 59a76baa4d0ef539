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
    slow_stream,
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


@needs_redis
async def test_each_providers_shared_slot_is_its_own(nursery: trio.Nursery) -> None:
    """Two providers of one slot each: while the first answers slowly, the second serves."""
    ups = [FakeUpstream(slow_stream(1.0)), FakeUpstream()]
    providers = [
        {"url": await serve_app(nursery, up), "concurrency_limit": {"max_concurrent_requests": 1}}
        for up in ups
    ]
    config = {
        "targets": {"m": {"strategy": "priority", "providers": providers}},
        "shared_limits": shared_config("onwards-test-" + secrets.token_hex(4)),
    }
    _, url = await start_gateway(nursery, config)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=BODY) as held,
    ):
        second = await client.post("/v1/chat/completions", json=BODY)
        await held.aread()
    assert second.status_code == 200
    assert [len(up.requests) for up in ups] == [1, 1]


@needs_redis
async def test_a_slot_is_given_back_when_the_client_goes_away(nursery: trio.Nursery) -> None:
    """The client leaves in the middle of a slow stream; the provider's one shared slot comes
    back with it (the gateway gives it back even as the request is cancelled), so the next
    request is served well before the slot's 60 s lease would have run out."""
    up = FakeUpstream(slow_stream(0.5))
    provider = {
        "url": await serve_app(nursery, up),
        "concurrency_limit": {"max_concurrent_requests": 1},
    }
    shared = shared_config("onwards-test-" + secrets.token_hex(4), lease_secs=60)
    config = {"targets": {"m": {"providers": [provider]}}, "shared_limits": shared}
    _, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=BODY) as gone:
            async for _ in gone.aiter_raw():
                break  # the first chunk, then the client is gone
        with trio.fail_after(20):
            while (await client.post("/v1/chat/completions", json=BODY)).status_code != 200:
                await trio.sleep(0.1)  # the gateway may not have seen the client go yet
