"""The ``x-budget-*`` headers say, on every answer a budget governs and on its 402: the
budget, what is left of it after the request's own reservation, and in how many seconds the
window starts again (none for a ``total`` budget), so a client can pace itself."""

from __future__ import annotations

import time
from decimal import Decimal

import trio

from tests.proxy.test_budgets import gateway, post
from tests.proxy.test_token_limits import usage_reply
from tests.support import FakeUpstream


def off_by(reset: str) -> float:
    """Seconds between a ``x-budget-reset`` value and the next UTC midnight (across it too)."""
    to_midnight = 86_400 - time.time() % 86_400
    return abs((int(reset.removesuffix("s")) - to_midnight + 43_200) % 86_400 - 43_200)


async def test_an_answer_says_what_is_left_and_when_the_day_starts_again(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 100))  # costs 0.2 (200 tokens at 0.001)
    _, url = await gateway(nursery, up, {"amount": 10, "window": "day"})
    first, second = [await post(url, max_tokens=100) for _ in range(2)]
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-budget-limit"] == second.headers["x-budget-limit"] == "10"
    left = [Decimal(r.headers["x-budget-remaining"]) for r in (first, second)]
    # both hold the same estimate; by the second, the first was settled at its 0.2
    assert 0 < 10 - left[0] < 1
    assert left[0] - left[1] == Decimal("0.2")
    assert off_by(second.headers["x-budget-reset"]) <= 5


async def test_a_402_says_when_the_day_starts_again(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    _, url = await gateway(nursery, up, {"amount": 0.001, "window": "day"})
    r = await post(url, max_tokens=100)
    assert r.status_code == 402
    assert (r.headers["x-budget-limit"], r.headers["x-budget-remaining"]) == ("0.001", "0.001")
    assert off_by(r.headers["x-budget-reset"]) <= 5


async def test_a_total_budget_has_no_reset(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    _, url = await gateway(nursery, up, {"amount": 10, "window": "total"})
    r = await post(url, max_tokens=100)
    assert r.status_code == 200
    assert "x-budget-remaining" in r.headers and "x-budget-reset" not in r.headers


async def test_an_answer_under_a_token_limit_and_a_budget_has_both_headers(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    pool = {"token_limit": {"tokens": 100_000, "window_secs": 1e9}}
    _, url = await gateway(nursery, up, {"amount": 10, "window": "day"}, pool=pool)
    r = await post(url, max_tokens=100)
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
    assert r.headers["x-budget-limit"] == "10"
