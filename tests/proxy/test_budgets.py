"""Budgets: reserve/settle/refund arithmetic and calendar windows on MockClock, then the
refusal over real sockets with the openai and anthropic SDKs."""

from __future__ import annotations

import calendar
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio
import trio.testing

from onwards_trio import ConfigError, parse_config
from onwards_trio._proxy.budgets import Budget, BudgetReservation, label_scope, window_of
from tests.proxy.test_token_limits import chat, usage_reply
from tests.support import FakeUpstream, Reply, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"
# 2026-11-30 23:00:00 UTC: an hour before a day's and a month's end
T0 = float(calendar.timegm((2026, 11, 30, 23, 0, 0)))


def wall() -> Callable[[], float]:
    """A wall clock driven by MockClock: T0 plus the time Trio has moved on."""
    return lambda: T0 + trio.current_time()


def reserved(budget: Budget, estimate: int) -> BudgetReservation:
    got = budget.reserve(estimate)
    assert got is not None, "refused"
    return got


# -- arithmetic (MockClock) --------------------------------------------------------------------


async def test_settle_returns_the_over_estimate(autojump_clock: trio.testing.MockClock) -> None:
    budget = Budget(10_000, "day", wall())
    reserved(budget, 6000).settle(1500)
    assert budget.remaining == 8500


async def test_settle_charges_a_cost_beyond_the_estimate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(10_000, "day", wall())
    reserved(budget, 1000).settle(4000)
    assert budget.remaining == 6000


async def test_refund_gives_everything_back_once(autojump_clock: trio.testing.MockClock) -> None:
    budget = Budget(10_000, "month", wall())
    r = reserved(budget, 7000)
    r.refund()
    r.refund()
    r.settle(9999)
    assert budget.remaining == 10_000


async def test_estimates_in_flight_count_against_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(10_000, "day", wall())
    reserved(budget, 6000)
    assert budget.reserve(4001) is None
    assert budget.reserve(4000) is not None  # exactly the amount fits


async def test_an_estimate_above_the_whole_budget_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert Budget(100, "total", wall()).reserve(101) is None


async def test_a_day_budget_starts_again_at_midnight_utc(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(10_000, "day", wall())
    reserved(budget, 10_000).settle(10_000)
    assert budget.reserve(1) is None and budget.reset == pytest.approx(3600)
    await trio.sleep(3599)
    assert budget.reserve(1) is None
    await trio.sleep(1)
    assert budget.remaining == 10_000 and budget.reset == pytest.approx(86400)


async def test_a_month_budget_starts_again_on_the_first_utc(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(10_000, "month", wall())
    reserved(budget, 10_000).settle(10_000)
    await trio.sleep(3600)  # 2026-12-01 00:00
    assert budget.remaining == 10_000
    assert budget.window_id == "2026-12"
    assert budget.reset == pytest.approx(31 * 86400)  # December has 31 days


async def test_a_total_budget_never_starts_again(autojump_clock: trio.testing.MockClock) -> None:
    budget = Budget(10_000, "total", wall())
    reserved(budget, 10_000).settle(10_000)
    await trio.sleep(400 * 86400)
    assert budget.remaining == 0 and budget.reset is None


async def test_a_request_in_flight_at_midnight_costs_the_new_day_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = Budget(10_000, "day", wall())
    late = reserved(budget, 3000)
    await trio.sleep(3600)
    late.settle(5000)  # charged to the day it was admitted in, which is over
    assert budget.remaining == 10_000


def test_window_ids_name_the_utc_calendar_window() -> None:
    dec31 = float(calendar.timegm((2026, 12, 31, 12, 0, 0)))
    assert window_of("day", dec31) == ("2026-12-31", calendar.timegm((2027, 1, 1, 0, 0, 0)))
    assert window_of("month", dec31) == ("2026-12", calendar.timegm((2027, 1, 1, 0, 0, 0)))
    assert window_of("total", dec31) == ("total", None)


def test_a_label_budgets_scope_ignores_label_order_and_hides_values() -> None:
    a = label_scope({"team": "red", "tier": "pro"})
    assert a == label_scope({"tier": "pro", "team": "red"})
    assert "red" not in a and a != label_scope({"team": "blue", "tier": "pro"})


def test_a_label_budget_needs_labels() -> None:
    with pytest.raises(ConfigError):
        parse_config(
            {"targets": {}, "auth": {"label_budgets": [{"amount": 1, "match_labels": {}}]}}
        )


# -- over real sockets ---------------------------------------------------------------------------

PRICE = {"input": 1000, "output": 1000}  # a token costs 1000 micro-units (0.001)


async def gateway(
    nursery: trio.Nursery,
    up: FakeUpstream,
    budget: dict[str, Any] | None = None,
    *,
    labels: dict[str, str] | None = None,
    label_budgets: list[dict[str, Any]] | None = None,
    extra_keys: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    **top: Any,
) -> tuple[Any, str]:
    definition: dict[str, Any] = {"key": "sk-team-a", "labels": labels or {}}
    if budget is not None:
        definition["budget"] = budget
    target = {
        "providers": [{"url": await serve_app(nursery, up)}],
        "pricing": PRICE,
        **(pool or {}),
    }
    config = {
        "auth": {
            "key_definitions": {"a": definition, **(extra_keys or {})},
            "label_budgets": label_budgets or [],
        },
        "targets": {"m": target},
        **top,
    }
    return await start_gateway(nursery, config)


async def post(url: str, key: str = "sk-team-a", **body: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await client.post(
            CHAT, json=chat(**body), headers={"authorization": f"Bearer {key}"}
        )


async def test_a_request_the_budget_cannot_cover_is_refused_before_the_upstream(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 100))  # costs 0.2
    _, url = await gateway(nursery, up, {"amount": 0.5, "window": "day"})
    # each reserves ~ (body/4 + 100) tokens = ~0.12; settles at 0.2
    codes = [(await post(url, max_tokens=100)).status_code for _ in range(4)]
    assert codes == [200, 200, 402, 402]
    assert len(up.requests) == 2


async def test_the_openai_sdk_sees_402_budget_exceeded(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    _, url = await gateway(nursery, up, {"amount": 0.001, "window": "month"})
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-team-a") as client:
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100
            )
    err = info.value
    assert err.status_code == 402
    assert isinstance(err.body, dict) and err.body["code"] == "budget_exceeded"
    assert err.body["type"] == "insufficient_quota"
    assert err.response.headers["x-budget-limit"] == "0.001"
    assert up.requests == []  # and no retry: a 402 is not retried by the SDK


async def test_the_anthropic_sdk_sees_a_billing_error(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    _, url = await gateway(
        nursery, up, {"amount": 0.001, "window": "day"}, pool={"anthropic": {"adapter": True}}
    )
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-team-a") as client:
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(
                model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            )
    err = info.value
    assert err.status_code == 402
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    assert err.body["error"]["type"] == "billing_error"
    assert "budget_exceeded" in err.body["error"]["message"]
    assert up.requests == []


async def test_the_budget_is_charged_the_reported_cost_exactly(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(123, 45))
    gw, url = await gateway(nursery, up, {"amount": 10, "window": "total"})
    for _ in range(3):
        r = await post(url, max_tokens=100)
        assert r.status_code == 200
    [[(_, budget, _)]] = gw.targets.table.key_budgets.values()
    assert budget.remaining == 10_000_000 - 3 * 168 * 1000
    assert r.headers["x-budget-limit"] == "10"


async def test_a_streamed_answer_crossing_the_budget_is_not_cut(nursery: trio.Nursery) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 990}  # costs 1.0, estimate ~0.11
    stream = sse(
        {"choices": [{"index": 0, "delta": {"content": "long answer"}}]},
        {"choices": [], "usage": usage},
    )
    up = FakeUpstream(Reply(chunks=stream, headers=[(b"content-type", b"text/event-stream")]))
    gw, url = await gateway(nursery, up, {"amount": 0.5, "window": "day"})
    first = await post(url, max_tokens=100, stream=True)
    assert first.status_code == 200 and b"long answer" in first.content
    assert first.content.rstrip().endswith(b"data: [DONE]")
    second = await post(url, max_tokens=100, stream=True)
    assert second.status_code == 402  # the overshoot was one request's worth
    [[(_, budget, _)]] = gw.targets.table.key_budgets.values()
    assert budget.amount - budget.remaining == budget.amount  # spent in full (1.0 of 0.5)


async def test_a_failed_upstream_answer_is_refunded(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(status=500, body=b'{"error": {"message": "down"}}'))
    gw, url = await gateway(nursery, up, {"amount": 0.2, "window": "day"})
    codes = [(await post(url, max_tokens=100)).status_code for _ in range(5)]
    assert codes == [500] * 5  # each reserved ~0.11 of 0.2: refunded, or the 2nd would be 402
    [[(_, budget, _)]] = gw.targets.table.key_budgets.values()
    assert budget.remaining == budget.amount


async def test_a_label_budget_is_shared_by_every_key_with_those_labels(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 100))  # 0.2 each
    _, url = await gateway(
        nursery,
        up,
        labels={"team": "red"},
        label_budgets=[{"amount": 0.4, "window": "month", "match_labels": {"team": "red"}}],
        extra_keys={
            "b": {"key": "sk-team-b", "labels": {"team": "red"}},
            "c": {"key": "sk-blue", "labels": {"team": "blue"}},
        },
    )
    assert (await post(url, "sk-team-a", max_tokens=100)).status_code == 200
    assert (await post(url, "sk-team-b", max_tokens=100)).status_code == 200
    refused = await post(url, "sk-team-b", max_tokens=100)
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "budget_exceeded"
    assert (await post(url, "sk-team-a", max_tokens=100)).status_code == 402
    assert (await post(url, "sk-blue", max_tokens=100)).status_code == 200


async def test_an_unpriced_model_is_not_held_to_a_budget(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    definition = {"key": "sk-team-a", "budget": {"amount": 0, "window": "day"}}
    config = {
        "auth": {"key_definitions": {"a": definition}},
        "targets": {"m": {"url": await serve_app(nursery, up)}},
    }
    _, url = await start_gateway(nursery, config)
    assert (await post(url, max_tokens=100)).status_code == 200


async def test_a_reload_keeps_what_was_spent(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 100))
    gw, url = await gateway(nursery, up, {"amount": 0.3, "window": "day"})
    assert (await post(url, max_tokens=100)).status_code == 200
    gw.update_config(gw.targets.config)
    assert (await post(url, max_tokens=100)).status_code == 402


async def test_each_model_call_of_a_responses_loop_is_charged(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(400, 200))  # 0.6 a model call
    gw, url = await gateway(
        nursery,
        up,
        {"amount": 10, "window": "month"},
        pool={"open_responses": {"adapter": True}},
        store={"kind": "memory"},
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post(
            "/v1/responses",
            json={"model": "m", "input": "hi", "store": False},
            headers={"authorization": "Bearer sk-team-a"},
        )
    assert r.status_code == 200 and r.json()["status"] == "completed"
    [[(_, budget, _)]] = gw.targets.table.key_budgets.values()
    assert len(up.requests) == 1 and budget.amount - budget.remaining == 600_000
