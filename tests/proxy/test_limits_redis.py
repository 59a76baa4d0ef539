"""Limits and budgets shared through Redis (SPEC §3.6): two gateways on one Redis are two
replicas, and the fake upstream's accounting is the truth.

Tests marked ``needs_redis`` run against a real redis-server named by ONWARDS_TEST_REDIS_URL
(``.ci/redis.sh`` starts one) and are skipped without it; the failure-policy tests need no
Redis at all (a closed port, a server that never answers). Each test uses its own key prefix.
No ``autojump_clock`` here: Redis keeps real time.
"""

from __future__ import annotations

import gc
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import coredis
import httpx
import pytest
import trio

from onwards_trio import parse_config
from onwards_trio._config import SharedLimitsSpec
from onwards_trio._proxy.auth import key_id
from onwards_trio._proxy.budgets import Budget
from onwards_trio._proxy.limits import ConcurrencyLimit, TokenBucket, TokenLimit
from onwards_trio._proxy.shared_limits import SharedLimits, key_scope, pool_scope, provider_scope
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

REDIS_URL = os.environ.get("ONWARDS_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="set ONWARDS_TEST_REDIS_URL (see .ci/redis.sh)"
)
CHAT = "/v1/chat/completions"

# coredis 6.9 leaves a connection's anyio memory streams unclosed when the TCP connect itself
# fails (Redis down); they only warn when collected. Not ours to fix, and harmless.
_COREDIS_LEAK = "ignore:Unclosed <MemoryObject:ResourceWarning"
pytestmark = pytest.mark.filterwarnings(_COREDIS_LEAK)


@pytest.fixture(autouse=True)
def _collect_coredis_leaks() -> Iterator[None]:
    """Collect the leaked streams here, under the filter, not during some later test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def body(model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def slow_stream(delay: float = 0.3) -> Reply:
    return Reply(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=sse({"choices": []}, {"choices": []}),
        chunk_delay=delay,
    )


@pytest.fixture
def prefix() -> str:
    return "onwards-test-" + secrets.token_hex(4)


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    """A plain client for looking at what the gateways wrote."""
    assert REDIS_URL is not None
    client: Any = coredis.Redis.from_url(REDIS_URL, decode_responses=True)
    async with client:
        yield client


def shared_config(prefix: str, url: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "redis_url": url or REDIS_URL,
        "key_prefix": prefix,
        "timeout_ms": 500,  # a loaded CI machine must not turn into a flaky fallback
        **extra,
    }


async def replicas(
    nursery: trio.Nursery, config: dict[str, Any], count: int = 2
) -> list[httpx.AsyncClient]:
    clients = []
    for _ in range(count):
        _, url = await start_gateway(nursery, config)
        clients.append(httpx.AsyncClient(base_url=url, timeout=10))
    return clients


@pytest.fixture
async def limits(nursery: trio.Nursery, prefix: str) -> SharedLimits:
    """A SharedLimits with an open client (its run task lives in the test's nursery)."""
    shared = SharedLimits(SharedLimitsSpec(**shared_config(prefix, lease_secs=30)))
    await nursery.start(shared.run)
    return shared


# -- the Lua scripts -----------------------------------------------------------------------------


@needs_redis
async def test_rate_bucket_starts_full_and_admits_a_burst(limits: SharedLimits) -> None:
    got = [await limits.acquire_rate("s", 0.01, 3) for _ in range(4)]
    assert got[:3] == [None, None, None]
    assert got[3] is not None and 99 <= got[3] <= 100  # one token every 100 s


@needs_redis
async def test_rate_retry_after_is_truthful(limits: SharedLimits) -> None:
    assert await limits.acquire_rate("s", 10.0, 1) is None
    wait = await limits.acquire_rate("s", 10.0, 1)
    assert wait is not None and 0.05 < wait <= 0.1
    await trio.sleep(wait)
    assert await limits.acquire_rate("s", 10.0, 1) is None


@needs_redis
async def test_rate_refill_never_exceeds_the_burst(limits: SharedLimits) -> None:
    # A slow rate, so the three calls below (Redis round trips on a loaded machine) cannot
    # refill a token between them: one comes back only every 0.5 s.
    assert await limits.acquire_rate("s", 2.0, 2) is None
    await trio.sleep(1.5)  # 3 tokens' worth of time, but the bucket holds 2
    got = [await limits.acquire_rate("s", 2.0, 2) for _ in range(3)]
    assert got[:2] == [None, None] and got[2] is not None


@needs_redis
async def test_slots_admit_up_to_the_limit_and_release_frees_one(limits: SharedLimits) -> None:
    first = await limits.acquire_slot("s", 2)
    second = await limits.acquire_slot("s", 2)
    assert first is not None and second is not None
    assert await limits.acquire_slot("s", 2) is None
    await first.release()
    await first.release()  # idempotent: a second release must not free another slot
    third = await limits.acquire_slot("s", 2)
    assert third is not None
    assert await limits.acquire_slot("s", 2) is None


@needs_redis
async def test_an_admission_is_all_or_nothing_for_slots(limits: SharedLimits) -> None:
    pool, key = ConcurrencyLimit(5), ConcurrencyLimit(1)
    assert await limits.acquire_slot("key", 1) is not None  # the key is full elsewhere
    refused = await limits.admit((), [("pool", pool), ("key", key)])
    assert (refused.refused, refused.index, refused.permit) == ("concurrency", 1, None)
    assert pool.active == 0 and key.active == 0  # the local permits were given back
    # the pool slot taken before the full key slot was given back in Redis too
    held = [await limits.acquire_slot("pool", 5) for _ in range(5)]
    assert all(p is not None for p in held)


@needs_redis
async def test_an_admission_names_the_rate_limit_that_refused(limits: SharedLimits) -> None:
    pool, key = TokenBucket(100.0, 5), TokenBucket(0.01, 1)
    first = await limits.admit([("pool", pool), ("key", key)], ())
    second = await limits.admit([("pool", pool), ("key", key)], ())
    assert first.refused is None
    assert second.refused == "rate" and second.index == 1
    assert second.retry_after is not None and 99 <= second.retry_after <= 100


@needs_redis
async def test_a_zero_limit_admits_nothing(limits: SharedLimits) -> None:
    assert await limits.acquire_slot("s", 0) is None


@needs_redis
async def test_held_leases_are_renewed_past_their_lease_time(
    nursery: trio.Nursery, prefix: str
) -> None:
    shared = SharedLimits(SharedLimitsSpec(**shared_config(prefix, lease_secs=0.6)))
    await nursery.start(shared.run)
    held = await shared.acquire_slot("s", 1)
    assert held is not None
    await trio.sleep(1.5)  # more than two lease times: only renewal keeps it
    assert await shared.acquire_slot("s", 1) is None
    await held.release()


# -- two replicas over HTTP ----------------------------------------------------------------------


@needs_redis
async def test_pool_rate_limit_is_shared_across_replicas(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, up)}],
                "rate_limit": {"requests_per_second": 0.01, "burst_size": 3},
            }
        },
    }
    a, b = await replicas(nursery, config)
    async with a, b:
        answers = [await c.post(CHAT, json=body()) for c in (a, b, a, b, a, b)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429, 429]
    assert all(90 <= int(r.headers["retry-after"]) <= 100 for r in answers[3:])
    assert len(up.requests) == 3


@needs_redis
async def test_pool_concurrency_is_shared_across_replicas(
    nursery: trio.Nursery, prefix: str, redis: Any
) -> None:
    up = FakeUpstream(slow_stream())
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, up)}],
                "concurrency_limit": {"max_concurrent_requests": 1},
            }
        },
    }
    a, b = await replicas(nursery, config)
    async with a, b:
        async with a.stream("POST", CHAT, json=body(stream=True)) as held:
            assert held.status_code == 200
            refused = await b.post(CHAT, json=body())
            await held.aread()
        with trio.fail_after(2):  # replica A gives its slot back once its relay has ended
            while await redis.zcard(f"{prefix}:conc:{pool_scope('m')}"):
                await trio.sleep(0.01)
        after = await b.post(CHAT, json=body())
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert after.status_code == 200


@needs_redis
async def test_key_rate_limit_is_shared_across_replicas(nursery: trio.Nursery, prefix: str) -> None:
    up = FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {
            "key_definitions": {
                "slow": {"key": "sk-slow", "rate_limit": {"requests_per_second": 0.01}}
            }
        },
        "targets": {"m": {"url": await serve_app(nursery, up)}},
    }
    a, b = await replicas(nursery, config)
    key = {"authorization": "Bearer sk-slow"}
    async with a, b:
        first = await a.post(CHAT, json=body(), headers=key)
        second = await b.post(CHAT, json=body(), headers=key)
        anonymous = await b.post(CHAT, json=body())
    assert (first.status_code, second.status_code, anonymous.status_code) == (200, 429, 200)


@needs_redis
async def test_key_concurrency_is_shared_across_replicas(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream(slow_stream())
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {
            "key_definitions": {
                "one": {"key": "sk-one", "concurrency_limit": {"max_concurrent_requests": 1}}
            }
        },
        "targets": {"m": {"url": await serve_app(nursery, up)}},
    }
    a, b = await replicas(nursery, config)
    key = {"authorization": "Bearer sk-one"}
    async with a, b, a.stream("POST", CHAT, json=body(), headers=key) as held:
        refused = await b.post(CHAT, json=body(), headers=key)
        await held.aread()
    assert held.status_code == 200 and refused.status_code == 429


@needs_redis
async def test_provider_rate_limit_is_shared_across_replicas(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {"url": await serve_app(nursery, up), "rate_limit": {"requests_per_second": 0.01}}
        },
    }
    a, b = await replicas(nursery, config)
    async with a, b:
        first = await a.post(CHAT, json=body())
        second = await b.post(CHAT, json=body())
    assert (first.status_code, second.status_code) == (200, 429)
    assert 90 <= int(second.headers["retry-after"]) <= 100
    assert len(up.requests) == 1


@needs_redis
async def test_redis_keys_never_hold_a_client_key(
    nursery: trio.Nursery, prefix: str, redis: Any
) -> None:
    up = FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {
            "key_definitions": {
                "k": {
                    "key": "sk-secret-value",
                    "rate_limit": {"requests_per_second": 1},
                    "concurrency_limit": {"max_concurrent_requests": 5},
                }
            }
        },
        "targets": {"m": {"url": await serve_app(nursery, up)}},
    }
    (a,) = await replicas(nursery, config, count=1)
    async with a:
        r = await a.post(CHAT, json=body(), headers={"authorization": "Bearer sk-secret-value"})
    assert r.status_code == 200
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:*")]
    assert f"{prefix}:rate:{key_scope(key_id('sk-secret-value'))}" in keys
    assert not any("sk-secret" in k for k in keys)


@needs_redis
async def test_provider_concurrency_is_shared_and_a_full_provider_is_skipped(
    nursery: trio.Nursery, prefix: str
) -> None:
    busy, free = FakeUpstream(slow_stream()), FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "strategy": "priority",
                "providers": [
                    {
                        "url": await serve_app(nursery, busy),
                        "concurrency_limit": {"max_concurrent_requests": 1},
                    },
                    {"url": await serve_app(nursery, free)},
                ],
            }
        },
    }
    a, b = await replicas(nursery, config)
    async with a, b, a.stream("POST", CHAT, json=body()) as held:
        # replica B's own count for the busy provider is 0: only Redis knows it is full
        r = await b.post(CHAT, json=body())
        await held.aread()
    assert r.status_code == 200
    assert len(busy.requests) == 1 and len(free.requests) == 1


@needs_redis
async def test_past_a_full_provider_priority_still_picks_in_order(
    nursery: trio.Nursery, prefix: str
) -> None:
    """The first of three providers is full across replicas: every request replica B sends
    goes to the second, as ``priority`` says, never to the third."""
    busy, second, third = FakeUpstream(slow_stream(3.0)), FakeUpstream(), FakeUpstream()
    first = {
        "url": await serve_app(nursery, busy),
        "concurrency_limit": {"max_concurrent_requests": 1},
    }
    others = [{"url": await serve_app(nursery, up)} for up in (second, third)]
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {"m": {"strategy": "priority", "providers": [first, *others]}},
    }
    a, b = await replicas(nursery, config)
    async with a, b, a.stream("POST", CHAT, json=body()) as held:
        codes = [(await b.post(CHAT, json=body())).status_code for _ in range(8)]
        await held.aread()
    assert codes == [200] * 8
    assert (len(second.requests), len(third.requests)) == (8, 0)


@needs_redis
async def test_a_stream_under_shared_rate_limits_only_is_sent_as_asked(
    nursery: trio.Nursery, prefix: str
) -> None:
    """Nothing reserves tokens, so nothing needs the stream's usage: the upstream is sent the
    client's body, without ``stream_options`` added."""
    up = FakeUpstream(slow_stream(0.0))
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, up)}],
                "rate_limit": {"requests_per_second": 100, "burst_size": 100},
            }
        },
    }
    (a,) = await replicas(nursery, config, count=1)
    async with a:
        r = await a.post(CHAT, json=body(stream=True))
    assert r.status_code == 200
    assert b"stream_options" not in up.requests[0].body


@needs_redis
async def test_a_full_provider_without_alternatives_answers_429(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream(slow_stream())
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "providers": [
                    {
                        "url": await serve_app(nursery, up),
                        "concurrency_limit": {"max_concurrent_requests": 1},
                    }
                ],
            }
        },
    }
    a, b = await replicas(nursery, config)
    async with a, b, a.stream("POST", CHAT, json=body()) as held:
        refused = await b.post(CHAT, json=body())
        await held.aread()
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert len(up.requests) == 1


@needs_redis
async def test_a_crashed_replicas_slot_expires_after_its_lease(
    nursery: trio.Nursery, prefix: str
) -> None:
    # The "crashed" replica takes the only slot and stops without releasing it.
    crashed = SharedLimits(SharedLimitsSpec(**shared_config(prefix, lease_secs=1)))
    async with trio.open_nursery() as inner:
        await inner.start(crashed.run)
        assert await crashed.acquire_slot(pool_scope("m"), 1) is not None
        inner.cancel_scope.cancel()  # no renewal, no release from now on
    up = FakeUpstream()
    config = {
        "shared_limits": shared_config(prefix, lease_secs=1),
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, up)}],
                "concurrency_limit": {"max_concurrent_requests": 1},
            }
        },
    }
    (b,) = await replicas(nursery, config, count=1)
    async with b:
        blocked = await b.post(CHAT, json=body())
        await trio.sleep(1.2)
        after = await b.post(CHAT, json=body())
    assert blocked.status_code == 429
    assert after.status_code == 200


# -- failure policy: fall back to in-process limits, quickly -------------------------------------


async def _closed_port() -> int:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_redis_down_falls_back_to_local_limits_quickly(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream()
    url = f"redis://127.0.0.1:{await _closed_port()}/0"
    config = {
        "shared_limits": shared_config(prefix, url, timeout_ms=50),
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, up)}],
                "rate_limit": {"requests_per_second": 0.01, "burst_size": 2},
            }
        },
    }
    gateway, base = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        started = trio.current_time()
        codes = [(await client.post(CHAT, json=body())).status_code for _ in range(3)]
        elapsed = trio.current_time() - started
    assert codes == [200, 200, 429]  # the local bucket of this replica
    assert elapsed < 1.0
    assert gateway.shared_limits is not None and gateway.shared_limits.fallbacks == 3


async def test_the_outage_warning_names_no_secret(
    nursery: trio.Nursery, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    up = FakeUpstream()
    url = f"redis://:pw-s3cret@127.0.0.1:{await _closed_port()}/0"
    config = {
        "shared_limits": shared_config(prefix, url, timeout_ms=50),
        "auth": {
            "key_definitions": {"k": {"key": "sk-hidden", "rate_limit": {"requests_per_second": 5}}}
        },
        "targets": {"m": {"url": await serve_app(nursery, up)}},
    }
    _, base = await start_gateway(nursery, config)
    caplog.set_level("DEBUG")
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        r = await client.post(CHAT, json=body(), headers={"authorization": "Bearer sk-hidden"})
    assert r.status_code == 200
    assert "Redis unavailable" in caplog.text
    assert "pw-s3cret" not in caplog.text and "sk-hidden" not in caplog.text


async def _black_hole(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A TCP server that accepts connections and never answers (a hung Redis)."""

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_a_hung_redis_costs_at_most_the_timeout(nursery: trio.Nursery, prefix: str) -> None:
    port = await nursery.start(_black_hole)
    spec = SharedLimitsSpec(
        redis_url=f"redis://127.0.0.1:{port}/0", key_prefix=prefix, timeout_ms=100
    )
    shared = SharedLimits(spec)
    await nursery.start(shared.run)
    bucket = TokenBucket(0.01, 1)
    local = ConcurrencyLimit(1)
    started = trio.current_time()
    first = await shared.rate(pool_scope("m"), bucket)
    second = await shared.rate(pool_scope("m"), bucket)
    admitted = await shared.admit((), [(pool_scope("m"), local)])
    refused = await shared.admit((), [(pool_scope("m"), local)])
    elapsed = trio.current_time() - started
    assert first is None and second is not None  # the local bucket decided
    assert admitted.permit is not None and refused.refused == "concurrency"  # the local limit
    # one call waits out the timeout; the others skip Redis while it is paused
    assert elapsed < 0.4
    assert shared.fallbacks == 3  # the last one the local limit refused before Redis
    await admitted.permit.release()
    assert local.active == 0


async def test_without_shared_limits_the_table_has_none(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    gateway, _ = await start_gateway(
        nursery, {"targets": {"m": {"url": await serve_app(nursery, up)}}}
    )
    assert gateway.shared_limits is None and gateway.targets.table.shared is None


async def test_a_reload_keeps_the_shared_limits(nursery: trio.Nursery, prefix: str) -> None:
    up = FakeUpstream()
    url = await serve_app(nursery, up)
    gateway, _ = await start_gateway(
        nursery,
        {
            "shared_limits": shared_config(prefix, f"redis://127.0.0.1:{await _closed_port()}/0"),
            "targets": {"m": {"url": url}},
        },
    )
    shared = gateway.shared_limits
    gateway.update_config(parse_config({"targets": {"n": {"url": url}}}))
    assert shared is not None and gateway.targets.table.shared is shared


@needs_redis
async def test_two_gateways_never_exceed_a_shared_token_limit(
    nursery: trio.Nursery, prefix: str
) -> None:
    # Each answer uses 100 tokens; each estimate is body/4 + max_tokens 100, never less than
    # that, so the two replicas together must stay within the limit to the token.
    usage = {"prompt_tokens": 0, "completion_tokens": 100, "total_tokens": 100}
    up = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    limit = {"tokens": 2000, "window_secs": 10**6}
    pool = {"providers": [{"url": await serve_app(nursery, up)}], "token_limit": limit}
    a, b = await replicas(nursery, {"shared_limits": shared_config(prefix), "targets": {"m": pool}})
    statuses: list[int] = []

    async def caller(client: httpx.AsyncClient) -> None:
        for _ in range(15):
            r = await client.post(CHAT, json=body(max_tokens=100))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["x-ratelimit-limit-tokens"] == "2000"

    async with a, b, trio.open_nursery() as callers:
        for client in (a, b, a, b):  # four concurrent callers, two on each replica
            callers.start_soon(caller, client)
    used = 100 * len(up.requests)
    assert statuses.count(200) == len(up.requests)
    assert used <= 2000  # one replica alone would have allowed 2000, together 4000
    assert used >= 1700  # settlement gave the over-estimates back (estimates alone: 16)


async def settled(limits: SharedLimits) -> None:
    with trio.fail_after(10):
        while limits.unsent_adjustments:
            await trio.sleep(0.01)


@needs_redis
async def test_shared_token_reserve_settle_refund_and_retry_after(limits: SharedLimits) -> None:
    window = TokenLimit(1000, 10**6)  # refills 0.001 tokens a second: nothing, here
    first = await limits.reserve_tokens([("t", window, 600)])
    assert isinstance(first[0], list) and first[1] == [pytest.approx(400, abs=1)]
    first[0][0].settle(100)  # 500 of the 600 come back
    await settled(limits)
    second = await limits.reserve_tokens([("t", window, 900)])
    assert isinstance(second[0], list) and second[1] == [pytest.approx(0, abs=1)]
    second[0][0].refund()
    await settled(limits)
    third = await limits.reserve_tokens([("t", window, 850)])
    assert isinstance(third[0], list)
    refused = await limits.reserve_tokens([("t", window, 100)])
    assert refused[0] == 0 and refused[1] == pytest.approx((100 - 50) / 0.001, rel=0.01)


# -- budgets, provider token limits, one round trip per request ------------------------------

PRICE = {"input": 1000, "output": 1000}  # a token costs 1000 micro-units (0.001)


async def hammer(clients: list[httpx.AsyncClient], per_caller: int, **extra: Any) -> list[int]:
    """Four concurrent callers, two on each replica; the statuses they saw."""
    statuses: list[int] = []

    async def caller(client: httpx.AsyncClient) -> None:
        for _ in range(per_caller):
            r = await client.post(
                CHAT, json=body(**extra), headers={"authorization": "Bearer sk-a"}
            )
            statuses.append(r.status_code)

    async with trio.open_nursery() as callers:
        for client in clients * 2:
            callers.start_soon(caller, client)
    return statuses


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def budget_config(prefix: str, url: str, budget: dict[str, Any], **pool: Any) -> dict[str, Any]:
    return {
        "shared_limits": shared_config(prefix),
        "auth": {"key_definitions": {"a": {"key": "sk-a", "budget": budget}}},
        "targets": {"m": {"providers": [{"url": url}], "pricing": PRICE, **pool}},
    }


@needs_redis
async def test_two_gateways_never_exceed_a_shared_budget(
    nursery: trio.Nursery, prefix: str
) -> None:
    # Each answer costs 0.1 (100 output tokens); each estimate (body/4 + max_tokens 100) is at
    # least that, so the replicas together must stay within the budget to the micro-unit.
    usage = {"prompt_tokens": 0, "completion_tokens": 100}
    up = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    config = budget_config(prefix, await serve_app(nursery, up), {"amount": 2, "window": "day"})
    a, b = await replicas(nursery, config)
    async with a, b:
        statuses = await hammer([a, b], 15, max_tokens=100)
    spent = 0.1 * len(up.requests)
    assert statuses.count(200) == len(up.requests) and 402 in statuses
    assert spent <= 2 + 1e-9  # one replica alone would have allowed 2, together 4
    assert spent >= 1.7  # settlement gave the over-estimates back (estimates alone: ~1.6)


@needs_redis
async def test_each_keys_shared_budget_is_its_own(nursery: trio.Nursery, prefix: str) -> None:
    """Key a spends its budget; key b, with a budget of its own, is still served."""
    usage = {"prompt_tokens": 0, "completion_tokens": 100}  # each answer costs 0.1
    url = await serve_app(nursery, FakeUpstream(Reply(body=chat_completion(usage=usage))))
    config = budget_config(prefix, url, {"amount": 0.15, "window": "day"})
    config["auth"]["key_definitions"]["b"] = {**config["auth"]["key_definitions"]["a"]}
    config["auth"]["key_definitions"]["b"]["key"] = "sk-b"
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        codes = [
            (await client.post(CHAT, json=body(max_tokens=100), headers=auth(key))).status_code
            for key in ("sk-a", "sk-a", "sk-b")
        ]
    assert codes == [200, 402, 200]


@needs_redis
async def test_a_shared_total_budget_keeps_what_was_spent(
    nursery: trio.Nursery, prefix: str, redis: Any
) -> None:
    """A ``total`` budget never starts again: its Redis counter has no expiry."""
    usage = {"prompt_tokens": 0, "completion_tokens": 100}
    url = await serve_app(nursery, FakeUpstream(Reply(body=chat_completion(usage=usage))))
    config = budget_config(prefix, url, {"amount": 0.15, "window": "total"})
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        codes = [
            (await client.post(CHAT, json=body(max_tokens=100), headers=auth("sk-a"))).status_code
            for _ in range(2)
        ]
    assert codes == [200, 402]
    [counter] = await redis.keys(f"{prefix}:budget:*")
    assert await redis.pttl(counter) == -1  # no expiry


@needs_redis
async def test_a_shared_budgets_counter_lives_a_day_past_its_window(
    nursery: trio.Nursery, prefix: str, redis: Any
) -> None:
    """Late settlements still find the counter: it expires a day after the month ends."""
    url = await serve_app(nursery, FakeUpstream())
    config = budget_config(prefix, url, {"amount": 10, "window": "month"})
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        r = await client.post(CHAT, json=body(max_tokens=100), headers=auth("sk-a"))
    assert r.status_code == 200
    _, reset = Budget(10, "month").current()
    assert reset is not None
    [counter] = await redis.keys(f"{prefix}:budget:*")
    assert abs(await redis.pttl(counter) - (reset * 1000 + 86_400_000)) < 5000


@needs_redis
async def test_a_zero_estimate_reserves_no_shared_tokens(
    nursery: trio.Nursery, prefix: str
) -> None:
    """A prompt the token counter counts as 0 that asks for no output holds nothing."""
    config = {
        "shared_limits": shared_config(prefix),
        "token_counter": "tests.proxy.test_token_counter_results:zero",
        "targets": {
            "m": {
                "providers": [{"url": await serve_app(nursery, FakeUpstream())}],
                "token_limit": {"tokens": 1000, "window_secs": 1e9},
            }
        },
    }
    _, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post(CHAT, json=body(max_tokens=0))
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining-tokens"] == "1000"


@needs_redis
async def test_a_free_model_is_served_from_a_shared_budget_of_zero(
    nursery: trio.Nursery, prefix: str
) -> None:
    url = await serve_app(nursery, FakeUpstream())
    config = budget_config(prefix, url, {"amount": 0, "window": "day"})
    config["targets"]["m"]["pricing"] = {"input": 0, "output": 0}
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        r = await client.post(CHAT, json=body(max_tokens=100), headers=auth("sk-a"))
    assert r.status_code == 200, r.text


@needs_redis
async def test_redis_keys_are_the_documented_ones(
    nursery: trio.Nursery, prefix: str, redis: Any
) -> None:
    """docs/shared-limits.md and docs/governance.md name each limit's Redis key; operators
    read them. Seen while a request holds its slots."""
    rate = {"requests_per_second": 100, "burst_size": 100}
    tokens = {"tokens": 100_000, "window_secs": 1e9}
    slots = {"max_concurrent_requests": 5}
    limits = {"rate_limit": rate, "token_limit": tokens, "concurrency_limit": slots}
    up = FakeUpstream(slow_stream())
    config = budget_config(prefix, await serve_app(nursery, up), {"amount": 10, "window": "day"})
    config["auth"]["key_definitions"]["a"] |= limits
    config["targets"]["m"] |= limits
    config["targets"]["m"]["providers"][0] |= limits
    _, url = await start_gateway(nursery, config)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as client,
        client.stream("POST", CHAT, json=body(stream=True), headers=auth("sk-a")) as held,
    ):
        assert held.status_code == 200
        keys = {k async for k in redis.scan_iter(match=f"{prefix}:*")}
        await held.aread()
    key = key_scope(key_id("sk-a"))
    window, _ = Budget(10, "day").current()
    scopes = [pool_scope("m"), provider_scope("m", 0), key]
    expected = {
        f"{prefix}:{kind}:{scope}" for kind in ("rate", "tokens", "conc") for scope in scopes
    }
    assert keys == expected | {f"{prefix}:budget:{key}:{window}"}


@needs_redis
@pytest.mark.parametrize("tiny", ["key", "label"])
async def test_the_shared_budget_that_refuses_is_the_one_named(
    nursery: trio.Nursery, prefix: str, tiny: str
) -> None:
    """A key's own budget and its label's: the one too small refuses, and the 402 gives its
    amount, not the other's."""
    url = await serve_app(nursery, FakeUpstream())
    roomy, small = {"amount": 10, "window": "day"}, {"amount": 0.001, "window": "day"}
    config = budget_config(prefix, url, small if tiny == "key" else roomy)
    config["auth"]["key_definitions"]["a"]["labels"] = {"team": "red"}
    label_budget = roomy if tiny == "key" else small
    config["auth"]["label_budgets"] = [{**label_budget, "match_labels": {"team": "red"}}]
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        r = await client.post(CHAT, json=body(), headers=auth("sk-a"))
    assert r.status_code == 402
    assert r.headers["x-budget-limit"] == "0.001"


@needs_redis
async def test_a_providers_refusal_beside_a_budget_says_when_to_retry(
    nursery: trio.Nursery, prefix: str
) -> None:
    """The key's budget and the provider's rate limit go to Redis in one call; the provider
    allows one request per 1000 s, so the second is refused with a long Retry-After."""
    url = await serve_app(nursery, FakeUpstream())
    config = budget_config(prefix, url, {"amount": 10, "window": "day"})
    once = {"requests_per_second": 0.001, "burst_size": 1}
    config["targets"]["m"]["providers"][0]["rate_limit"] = once
    _, gateway_url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        answers = [await client.post(CHAT, json=body(), headers=auth("sk-a")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 429]
    assert 100 < int(answers[1].headers["retry-after"]) <= 1000  # the provider's wait


@needs_redis
async def test_an_under_estimate_overshoots_by_at_most_the_requests_in_flight(
    nursery: trio.Nursery, prefix: str
) -> None:
    # Streams that cost 0.5 each while the estimate is ~0.03 (no max_tokens, a default of 10
    # output tokens): the documented bound is the under-estimate of each request in flight
    # when the budget ran out (four callers: at most 4 x 0.5 beyond the amount).
    usage = {"prompt_tokens": 0, "completion_tokens": 500}
    stream = sse(
        {"choices": [{"index": 0, "delta": {"content": "x"}}]}, {"choices": [], "usage": usage}
    )
    up = FakeUpstream(Reply(chunks=stream, headers=[(b"content-type", b"text/event-stream")]))
    budget = {"amount": 3, "window": "month", "default_output_tokens": 10}
    a, b = await replicas(nursery, budget_config(prefix, await serve_app(nursery, up), budget))
    async with a, b:
        statuses = await hammer([a, b], 6, stream=True)
    spent = 0.5 * len(up.requests)
    assert statuses.count(200) == len(up.requests) and 402 in statuses
    assert spent <= 3 + 4 * 0.5


@needs_redis
async def test_two_gateways_never_exceed_a_provider_token_limit(
    nursery: trio.Nursery, prefix: str
) -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 100}
    up = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    provider = {
        "url": await serve_app(nursery, up),
        "token_limit": {"tokens": 2000, "window_secs": 10**6},
    }
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {"key_definitions": {"a": {"key": "sk-a"}}},
        "targets": {"m": {"providers": [provider]}},
    }
    a, b = await replicas(nursery, config)
    async with a, b:
        statuses = await hammer([a, b], 15, max_tokens=100)
    used = 100 * len(up.requests)
    assert statuses.count(200) == len(up.requests) and 429 in statuses
    assert 1700 <= used <= 2000


@needs_redis
async def test_every_check_of_a_request_is_one_redis_call(
    nursery: trio.Nursery, prefix: str
) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 10}
    up = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    generous = {"requests_per_second": 1e6, "burst_size": 10**6}
    definition = {
        "key": "sk-a",
        "rate_limit": generous,
        "concurrency_limit": {"max_concurrent_requests": 100},
        "token_limit": {"tokens": 10**9},
        "budget": {"amount": 1000, "window": "day"},
        "labels": {"team": "red"},
    }
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {
            "key_definitions": {"a": definition},
            "label_budgets": [{"amount": 1000, "match_labels": {"team": "red"}}],
        },
        "targets": {
            "m": {
                "providers": [
                    {
                        "url": await serve_app(nursery, up),
                        "rate_limit": generous,
                        "token_limit": {"tokens": 10**9},
                    }
                ],
                "pricing": PRICE,
                "rate_limit": generous,
                "concurrency_limit": {"max_concurrent_requests": 100},
                "token_limit": {"tokens": 10**9},
            }
        },
    }
    gw, url = await start_gateway(nursery, config)
    shared = gw.shared_limits
    assert shared is not None
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(20):
            r = await client.post(CHAT, json=body(), headers={"authorization": "Bearer sk-a"})
            assert r.status_code == 200 and "x-budget-remaining" in r.headers
    await settled(shared)
    # rate x3, slots x2, tokens x3 (pool, key, provider), budgets x2: one call a request
    assert shared.calls["gate"] == 20
    # settlements and slot releases were sent by background tasks, never more than one each
    assert shared.calls.get("settle", 0) <= 20 and shared.calls.get("release", 0) <= 20
    assert shared.fallbacks == 0


@needs_redis
async def test_shared_budget_reserve_settle_refund_and_refusal(limits: SharedLimits) -> None:
    budget = Budget(10_000, "month")
    first = await limits.admit((), (), (), [("key:x", budget, 6000)])
    assert first.refused is None and first.budgets_used == [6000]
    first.budgets[0].settle(1000)  # 5000 of the 6000 come back
    await settled(limits)
    second = await limits.admit((), (), (), [("key:x", budget, 9001)])
    assert (second.refused, second.index, second.budgets_used) == ("budget", 0, [1000])
    third = await limits.admit((), (), (), [("key:x", budget, 9000)])
    assert third.refused is None and third.budgets_used == [10_000]
    third.budgets[0].refund()
    await settled(limits)
    fourth = await limits.admit((), (), (), [("key:x", budget, 9000)])
    assert fourth.refused is None


@needs_redis
async def test_a_budget_refusal_takes_nothing_else(limits: SharedLimits) -> None:
    slot, tokens = ConcurrencyLimit(1), TokenLimit(1000, 10**6)
    empty = Budget(0, "day")
    refused = await limits.admit(
        [("r", TokenBucket(100.0, 100))], [("s", slot)], [("t", tokens, 500)], [("b", empty, 1)]
    )
    assert refused.refused == "budget" and slot.active == 0
    admitted = await limits.admit((), [("s", slot)], [("t", tokens, 1000)])
    assert admitted.refused is None  # the slot and all 1000 tokens were still there


async def test_redis_down_leaves_budgets_and_token_limits_to_this_replica(
    nursery: trio.Nursery, prefix: str
) -> None:
    shared = SharedLimits(
        SharedLimitsSpec(**shared_config(prefix, f"redis://127.0.0.1:{await _closed_port()}/0"))
    )
    await nursery.start(shared.run)
    budget, tokens = Budget(1000, "day"), TokenLimit(500, 10**6)
    first = await shared.admit((), (), [("t", tokens, 400)], [("b", budget, 600)])
    assert first.refused is None and budget.remaining == 400 and tokens.remaining == 100
    refused = await shared.admit((), (), [("t", tokens, 50)], [("b", budget, 600)])
    assert refused.refused == "budget"
    assert tokens.remaining == 100  # the token reservation made with it was given back
    first.budgets[0].settle(100)
    assert budget.remaining == 900 and shared.fallbacks == 2


@needs_redis
async def test_a_provider_refusal_in_the_same_call_keeps_the_request_admitted(
    nursery: trio.Nursery, prefix: str
) -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 100}
    small = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    big = FakeUpstream(Reply(body=chat_completion(usage=usage)))
    config = {
        "shared_limits": shared_config(prefix),
        "targets": {
            "m": {
                "providers": [
                    {
                        "url": await serve_app(nursery, small),
                        "token_limit": {"tokens": 150, "window_secs": 10**6},
                    },
                    {"url": await serve_app(nursery, big)},
                ],
                "strategy": "priority",
                "fallback": {"enabled": True, "on_rate_limit": True},
                "token_limit": {"tokens": 10_000, "window_secs": 10**6},
            }
        },
    }
    gw, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        codes = [(await client.post(CHAT, json=body(max_tokens=100))).status_code for _ in range(3)]
    assert codes == [200] * 3 and (len(small.requests), len(big.requests)) == (1, 2)
    assert gw.shared_limits is not None
    await settled(gw.shared_limits)
    # the pool's limit was charged once per request (100 each), whichever provider answered
    reply = await gw.shared_limits.reserve_tokens([("pool:m", TokenLimit(10_000, 10**6), 0)])
    assert isinstance(reply[0], list) and reply[1] == [pytest.approx(10_000 - 300, abs=1)]


@needs_redis
async def test_with_no_provider_free_the_budget_refusal_still_wins(
    nursery: trio.Nursery, prefix: str
) -> None:
    up = FakeUpstream()
    provider = {
        "url": await serve_app(nursery, up),
        "rate_limit": {"requests_per_second": 100},
        "concurrency_limit": {"max_concurrent_requests": 0},
    }
    config = {
        "shared_limits": shared_config(prefix),
        "auth": {"key_definitions": {"a": {"key": "sk-a", "budget": {"amount": 0}}}},
        "targets": {"m": {"providers": [provider], "pricing": PRICE}},
    }
    _, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post(CHAT, json=body(), headers={"authorization": "Bearer sk-a"})
    assert r.status_code == 402 and r.json()["error"]["code"] == "budget_exceeded"
