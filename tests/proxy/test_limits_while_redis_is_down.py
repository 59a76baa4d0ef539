"""While the shared limits' Redis cannot be reached, every limit still refuses as it does in
process (each replica alone): the same status, the same headers, counted under the same limit
and scope; and what an admitted request holds is settled by its usage as usual."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

import httpx
import pytest
import trio

from tests.ops.test_metrics_http import body, gateway, sample, scrape, settle
from tests.ops.test_rejection_metrics import LIMITS_AND_SCOPES, TINY_BUDGET
from tests.ops.test_rejection_metrics import config as limit_config
from tests.proxy.test_limits_redis import (
    _COREDIS_LEAK,
    _closed_port,
    _collect_coredis_leaks,  # noqa: F401 (an autouse fixture)
    shared_config,
)
from tests.proxy.test_token_limits import usage_reply
from tests.support import FakeUpstream, serve_app, start_gateway

HEADERS = {"authorization": "Bearer sk-a"}
pytestmark = pytest.mark.filterwarnings(_COREDIS_LEAK)


async def unreachable() -> dict[str, Any]:
    url = f"redis://127.0.0.1:{await _closed_port()}/0"
    return shared_config("onwards-test-" + secrets.token_hex(4), url, timeout_ms=50)


@pytest.mark.parametrize(
    ("limit", "scope"),
    LIMITS_AND_SCOPES,
)
async def test_each_limit_refuses_as_in_process(
    nursery: trio.Nursery, limit: str, scope: str
) -> None:
    spec = limit_config(await serve_app(nursery, FakeUpstream()), limit, scope)
    spec["shared_limits"] = await unreachable()
    client, scraper, metrics = await gateway(nursery, spec.pop("targets"), **spec)
    async with client, scraper:
        answers = [
            await client.post("/v1/chat/completions", json=body("m"), headers=HEADERS)
            for _ in range(2)
        ]
        refused = answers[-1]
        labels = {"alias": "m", "limit": limit, "scope": scope}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_limit_rejections_total", **labels) >= 1
    if limit == "budget":  # less than any request's estimate: both refused
        assert [a.status_code for a in answers] == [402, 402]
        assert refused.json()["error"]["code"] == "budget_exceeded"
        assert refused.headers["x-budget-limit"] == "0.001"
        assert refused.headers["x-budget-remaining"] == "0.001"  # nothing was spent
        assert "x-budget-reset" in refused.headers
        return
    assert [a.status_code for a in answers] == [200, 429]
    # one request per 1000 s (rate), ten tokens per 1e9 s (tokens): a long wait, not 1 s
    assert int(refused.headers["retry-after"]) > 100
    if limit == "tokens":
        assert refused.headers["x-ratelimit-limit-tokens"] == "10"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_a_budget_with_room_says_what_is_left(nursery: trio.Nursery) -> None:
    spec = limit_config(await serve_app(nursery, FakeUpstream()), "budget", "key")
    spec["auth"]["key_definitions"]["a"]["budget"] = {"amount": 10, "window": "day"}
    spec["shared_limits"] = await unreachable()
    _, url = await start_gateway(nursery, spec)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json=body("m"), headers=HEADERS)
    assert r.status_code == 200
    assert 8 < Decimal(r.headers["x-budget-remaining"]) < 10  # ~1.04 held (1024 out)


async def test_a_providers_token_limit_is_settled_by_the_usage(nursery: trio.Nursery) -> None:
    """The provider's limit holds 210 tokens; the first answer used 200 of them (more than its
    estimate), so the second request, whose estimate is over the 10 left, is refused."""
    up = FakeUpstream(usage_reply(100, 100))
    provider = {
        "url": await serve_app(nursery, up),
        "token_limit": {"tokens": 210, "window_secs": 1e9},
    }
    config = {"targets": {"m": {"providers": [provider]}}, "shared_limits": await unreachable()}
    _, url = await start_gateway(nursery, config)
    request = {**body("m"), "max_tokens": 10}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        codes = [
            (await client.post("/v1/chat/completions", json=request)).status_code for _ in range(2)
        ]
    assert codes == [200, 429]
    assert len(up.requests) == 1


async def test_a_keys_token_limit_gets_back_what_the_answer_did_not_use(
    nursery: trio.Nursery,
) -> None:
    """Each request holds its estimate (~1000 tokens) of the key's 1500; the first answer used
    10, so the rest of its estimate is given back and the second request fits."""
    spec = limit_config(await serve_app(nursery, FakeUpstream(usage_reply(5, 5))), "tokens", "key")
    spec["auth"]["key_definitions"]["a"]["token_limit"] = {"tokens": 1500, "window_secs": 1e9}
    spec["shared_limits"] = await unreachable()
    _, url = await start_gateway(nursery, spec)
    request = {**body("m"), "max_tokens": 1000}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        codes = [
            (await client.post("/v1/chat/completions", json=request, headers=HEADERS)).status_code
            for _ in range(2)
        ]
    assert codes == [200, 200]


@pytest.mark.parametrize("tiny", ["key", "label"])
async def test_the_budget_that_refuses_is_the_one_named(nursery: trio.Nursery, tiny: str) -> None:
    """A key with its own budget and a label's budget: the one too small to hold the estimate
    refuses, and the 402's headers and the metric name it, not the other."""
    spec = limit_config(await serve_app(nursery, FakeUpstream()), "budget", "label")
    roomy = {"amount": 10, "window": "day"}
    spec["auth"]["key_definitions"]["a"]["budget"] = TINY_BUDGET if tiny == "key" else roomy
    spec["auth"]["label_budgets"][0].update(roomy if tiny == "key" else TINY_BUDGET)
    spec["shared_limits"] = await unreachable()
    client, scraper, metrics = await gateway(nursery, spec.pop("targets"), **spec)
    async with client, scraper:
        r = await client.post("/v1/chat/completions", json=body("m"), headers=HEADERS)
        labels = {"alias": "m", "limit": "budget", "scope": tiny}
        await settle(metrics, "onwards_limit_rejections_total", labels, 1)
        scraped = await scrape(scraper)
    assert r.status_code == 402
    assert r.headers["x-budget-limit"] == "0.001"
    assert sample(scraped, "onwards_limit_rejections_total", **labels) == 1
