"""Every refusal by a limit is counted in ``onwards_limit_rejections_total`` under the limit
that refused (rate, tokens, budget) and its scope (pool, key, provider, label), in-process and
with the limits shared in Redis, scraped from a real /metrics listener: an operator reads from
it which limit turns clients away."""

from __future__ import annotations

import secrets
from functools import partial
from typing import Any

import pytest
import trio

from tests.ops.test_metrics_http import body, gateway, sample, scrape, settle
from tests.proxy.test_limits_redis import needs_redis, shared_config
from tests.support import FakeUpstream, Reply, chat_completion, serve_app

ONCE = {"requests_per_second": 0.001, "burst_size": 1}  # one request, then refused
FEW_TOKENS = {"tokens": 10, "window_secs": 1e9}  # the first request takes every token
TINY_BUDGET = {"amount": 0.001, "window": "day"}  # less than any request's estimate


# Every limit at every scope it can be set at (``config``'s ``limit`` and ``scope``).
LIMITS_AND_SCOPES = [
    ("rate", "pool"),
    ("rate", "key"),
    ("rate", "provider"),
    ("tokens", "pool"),
    ("tokens", "key"),
    ("tokens", "provider"),
    ("budget", "key"),
    ("budget", "label"),
]


def config(url: str, limit: str, scope: str) -> dict[str, Any]:
    """One pool ``m`` with one provider, one key ``sk-a`` labelled ``team: red``, and the one
    limit ``limit`` at ``scope``."""
    setting = {"rate": ("rate_limit", ONCE), "tokens": ("token_limit", FEW_TOKENS)}
    provider: dict[str, Any] = {"url": url}
    pool: dict[str, Any] = {"providers": [provider], "pricing": {"input": 1000, "output": 1000}}
    key: dict[str, Any] = {"key": "sk-a", "labels": {"team": "red"}}
    auth: dict[str, Any] = {"key_definitions": {"a": key}}
    if limit == "budget" and scope == "key":
        key["budget"] = TINY_BUDGET
    elif limit == "budget":
        auth["label_budgets"] = [{**TINY_BUDGET, "match_labels": {"team": "red"}}]
    else:
        name, value = setting[limit]
        {"pool": pool, "key": key, "provider": provider}[scope][name] = value
    return {"targets": {"m": pool}, "auth": auth}


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=needs_redis)])
@pytest.mark.parametrize(
    ("limit", "scope"),
    LIMITS_AND_SCOPES,
)
async def test_a_refusal_is_counted_under_its_limit_and_scope(
    nursery: trio.Nursery, limit: str, scope: str, shared: bool
) -> None:
    spec = config(await serve_app(nursery, FakeUpstream()), limit, scope)
    if shared:
        spec["shared_limits"] = shared_config("onwards-test-" + secrets.token_hex(4))
    client, scraper, metrics = await gateway(nursery, spec.pop("targets"), **spec)
    async with client, scraper:
        codes = await two_in_a_row(client)
        refused = sum(code in (402, 429) for code in codes)
        assert refused and all(code in (200, 402, 429) for code in codes), codes
        labels = {"alias": "m", "limit": limit, "scope": scope}
        await settle(metrics, "onwards_limit_rejections_total", labels, refused)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == refused


async def two_in_a_row(client: Any) -> list[int]:
    """Key ``sk-a``'s two requests to ``m``, one after the other: their statuses."""
    headers = {"authorization": "Bearer sk-a"}
    codes: list[int] = []
    for _ in range(2):
        reply = await client.post("/v1/chat/completions", json=body("m"), headers=headers)
        codes.append(reply.status_code)
    return codes


async def second_while_the_first_holds_its_slot(client: Any, up: FakeUpstream) -> int:
    """Key ``sk-a``'s first request to ``m`` holds the one concurrency slot (the upstream
    answers slowly) while a second is sent: the second's status."""
    headers = {"authorization": "Bearer sk-a"}
    async with trio.open_nursery() as inner:
        first = partial(client.post, "/v1/chat/completions", json=body("m"), headers=headers)
        inner.start_soon(first)
        with trio.fail_after(20):
            while not up.requests:  # the first request holds the slot
                await trio.sleep(0.01)
        second = await client.post("/v1/chat/completions", json=body("m"), headers=headers)
    status: int = second.status_code
    return status


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=needs_redis)])
@pytest.mark.parametrize("scope", ["pool", "key"])
async def test_a_concurrency_refusal_is_counted_under_its_scope(
    nursery: trio.Nursery, scope: str, shared: bool
) -> None:
    up = FakeUpstream(Reply(body=chat_completion(), delay=3.0))
    spec = config(await serve_app(nursery, up), "rate", scope)
    target = spec["targets"]["m"] if scope == "pool" else spec["auth"]["key_definitions"]["a"]
    del target["rate_limit"]
    target["concurrency_limit"] = {"max_concurrent_requests": 1}
    if shared:
        spec["shared_limits"] = shared_config("onwards-test-" + secrets.token_hex(4))
    client, scraper, metrics = await gateway(nursery, spec.pop("targets"), **spec)
    async with client, scraper:
        assert await second_while_the_first_holds_its_slot(client, up) == 429
        labels = {"alias": "m", "limit": "concurrency", "scope": scope}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == 1


PLENTY = {"requests_per_second": 1000, "burst_size": 1000}  # never refuses here


async def key_limited_shared_gateway(nursery: trio.Nursery, provider: dict[str, Any]) -> Any:
    """Pool ``m`` of the one ``provider``, key ``sk-a`` allowed one request, limits in Redis:
    the (client, scraper, metrics) of ``gateway``."""
    spec: dict[str, Any] = {
        "auth": {"key_definitions": {"a": {"key": "sk-a", "rate_limit": ONCE}}},
        "shared_limits": shared_config("onwards-test-" + secrets.token_hex(4)),
    }
    return await gateway(nursery, {"m": {"providers": [provider]}}, **spec)


@needs_redis
async def test_a_refusal_sent_with_the_providers_check_is_counted(nursery: trio.Nursery) -> None:
    """With a provider limit in the pool, the shared admission waits for the provider and goes
    to Redis with its check: the key's own refusal is still counted as the key's."""
    provider = {"url": await serve_app(nursery, FakeUpstream()), "rate_limit": PLENTY}
    client, scraper, metrics = await key_limited_shared_gateway(nursery, provider)
    async with client, scraper:
        codes = await two_in_a_row(client)
        assert codes == [200, 429]
        labels = {"alias": "m", "limit": "rate", "scope": "key"}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == 1
    assert sample(scraped, "onwards_limit_rejections_total", **{**labels, "scope": "provider"}) == 0


@needs_redis
async def test_with_no_provider_free_the_requests_own_refusal_is_counted_first(
    nursery: trio.Nursery,
) -> None:
    """No provider can take the request (capacity 0), so its pending shared admission goes to
    Redis alone: the first request passes its own limits and is refused for want of a
    provider, the second is refused by its key's rate limit, and each is counted so."""
    provider = {
        "url": await serve_app(nursery, FakeUpstream()),
        "rate_limit": PLENTY,
        "concurrency_limit": {"max_concurrent_requests": 0},
    }
    client, scraper, metrics = await key_limited_shared_gateway(nursery, provider)
    headers = {"authorization": "Bearer sk-a"}
    async with client, scraper:
        answers = [
            await client.post("/v1/chat/completions", json=body("m"), headers=headers)
            for _ in range(2)
        ]
        assert [a.status_code for a in answers] == [429, 429]
        assert "retry-after" not in answers[0].headers  # at capacity: no time to wait for
        assert int(answers[1].headers["retry-after"]) >= 1
        key = {"alias": "m", "limit": "rate", "scope": "key"}
        provider_full = {"alias": "m", "limit": "concurrency", "scope": "provider"}
        await settle(metrics, "onwards_limit_rejections_total", key, 1)
        await settle(metrics, "onwards_limit_rejections_total", provider_full, 1)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **key) == 1
    assert sample(scraped, "onwards_limit_rejections_total", **provider_full) == 1


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=needs_redis)])
async def test_a_key_concurrency_refusal_behind_pool_limits_is_counted_as_the_keys(
    nursery: trio.Nursery, shared: bool
) -> None:
    """The pool has a rate limit and a concurrency limit, both with room; the key's one slot is
    taken: the refusal is the key's, whatever limits come before it."""
    up = FakeUpstream(Reply(body=chat_completion(), delay=3.0))
    pool = {
        "providers": [{"url": await serve_app(nursery, up)}],
        "rate_limit": PLENTY,
        "concurrency_limit": {"max_concurrent_requests": 10},
    }
    key = {"key": "sk-a", "concurrency_limit": {"max_concurrent_requests": 1}}
    spec: dict[str, Any] = {"auth": {"key_definitions": {"a": key}}}
    if shared:
        spec["shared_limits"] = shared_config("onwards-test-" + secrets.token_hex(4))
    client, scraper, metrics = await gateway(nursery, {"m": pool}, **spec)
    async with client, scraper:
        assert await second_while_the_first_holds_its_slot(client, up) == 429
        labels = {"alias": "m", "limit": "concurrency", "scope": "key"}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == 1
    assert sample(scraped, "onwards_limit_rejections_total", **{**labels, "scope": "pool"}) == 0


async def test_a_keys_rate_refusal_beside_a_token_limit_is_counted(nursery: trio.Nursery) -> None:
    """In process, a request that reserves tokens still passes its key's rate and concurrency
    limits first: the second request is refused by the key's rate limit, counted so."""
    spec = config(await serve_app(nursery, FakeUpstream()), "rate", "key")
    spec["auth"]["key_definitions"]["a"]["concurrency_limit"] = {"max_concurrent_requests": 5}
    spec["targets"]["m"]["token_limit"] = {"tokens": 100_000, "window_secs": 1e9}
    client, scraper, metrics = await gateway(nursery, spec.pop("targets"), **spec)
    async with client, scraper:
        codes = await two_in_a_row(client)
        labels = {"alias": "m", "limit": "rate", "scope": "key"}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert codes == [200, 429]
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == 1
