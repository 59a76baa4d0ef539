"""Token limits: reserve/settle/refund arithmetic on MockClock, then over real sockets."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
import trio.testing

from onwards_trio._proxy.limits import (
    PromptCounter,
    TokenLimit,
    TokenReservation,
    requested_output,
)
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"


def reserved(limit: TokenLimit, estimate: int) -> TokenReservation:
    got = limit.reserve(estimate)
    assert isinstance(got, TokenReservation), f"refused, retry after {got}"
    return got


# -- arithmetic (MockClock) --------------------------------------------------------------------


async def test_settle_returns_the_over_estimate(autojump_clock: trio.testing.MockClock) -> None:
    limit = TokenLimit(1000, 60)
    reserved(limit, 600).settle(100)
    assert limit.remaining == 900


async def test_settle_charges_usage_beyond_the_estimate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = TokenLimit(1000, 60)
    reserved(limit, 100).settle(700)
    assert limit.remaining == 300


async def test_refund_gives_everything_back_once(autojump_clock: trio.testing.MockClock) -> None:
    limit = TokenLimit(1000, 60)
    r = reserved(limit, 400)
    r.refund()
    r.refund()
    r.settle(999)  # a settled-or-refunded reservation is done
    assert limit.remaining == 1000


async def test_a_reservation_beyond_what_is_left_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = TokenLimit(1000, 60)
    reserved(limit, 900)
    assert limit.reserve(200) == pytest.approx(100 / (1000 / 60))


async def test_retry_after_is_truthful(autojump_clock: trio.testing.MockClock) -> None:
    limit = TokenLimit(600, 60)  # 10 tokens a second
    reserved(limit, 600)
    wait = limit.reserve(50)
    assert isinstance(wait, float) and wait == pytest.approx(5.0)
    await trio.sleep(wait * 0.99)
    assert not isinstance(limit.reserve(50), TokenReservation)
    await trio.sleep(wait * 0.02)
    assert isinstance(limit.reserve(50), TokenReservation)


async def test_the_window_rolls_over_to_a_full_limit_and_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = TokenLimit(1000, 60)
    reserved(limit, 1000).settle(1000)
    await trio.sleep(60)
    assert limit.remaining == 1000 and limit.reset == 0
    await trio.sleep(600)
    assert limit.remaining == 1000


async def test_usage_over_the_limit_is_a_debt_paid_back_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = TokenLimit(600, 60)  # 10 tokens a second
    reserved(limit, 100).settle(800)  # 200 tokens in debt
    assert limit.remaining == 0
    assert limit.reserve(100) == pytest.approx(30.0)  # 200 debt + 100 needed, at 10/s


async def test_an_estimate_above_the_limit_waits_for_a_full_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = TokenLimit(100, 10)
    reserved(limit, 10)
    assert limit.reserve(5000) == pytest.approx(1.0)
    await trio.sleep(1)
    assert isinstance(limit.reserve(5000), TokenReservation)


async def test_the_default_prompt_estimate_is_body_bytes_over_four() -> None:
    assert await PromptCounter().count(b"x" * 403, {"messages": []}) == 100


def test_the_output_reserved_is_the_first_limit_the_request_names() -> None:
    assert requested_output({"max_completion_tokens": 7, "max_tokens": 50}) == 7
    assert requested_output({"max_output_tokens": 9}) == 9
    assert requested_output({"max_tokens": True}) is None
    assert requested_output({}) is None


# -- over real sockets ---------------------------------------------------------------------------


def usage_reply(prompt: int, completion: int) -> Reply:
    return Reply(
        body=chat_completion(usage={"prompt_tokens": prompt, "completion_tokens": completion})
    )


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


async def gateway(
    nursery: trio.Nursery, up: FakeUpstream, pool_limit: dict[str, Any] | None = None, **auth: Any
) -> httpx.AsyncClient:
    pool: dict[str, Any] = {"providers": [{"url": await serve_app(nursery, up)}]}
    if pool_limit is not None:
        pool["token_limit"] = pool_limit
    _, url = await start_gateway(nursery, {"auth": auth, "targets": {"m": pool}})
    return httpx.AsyncClient(base_url=url, timeout=10)


async def test_a_request_over_the_pool_token_limit_is_refused_with_headers(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(usage_reply(100, 150))  # 250 of 300 spent: 50 left, refilled at 5/s
    client = await gateway(nursery, up, {"tokens": 300, "window_secs": 60})
    async with client:
        first = await client.post(CHAT, json=chat(max_tokens=200))
        second = await client.post(CHAT, json=chat(max_tokens=200))
    assert first.status_code == 200 and second.status_code == 429
    # ~220 needed (body/4 + 200), 50 there: ~34 s at 5 tokens a second
    assert 30 <= int(second.headers["retry-after"]) <= 36
    assert second.headers["x-ratelimit-limit-tokens"] == "300"
    assert first.headers["x-ratelimit-limit-tokens"] == "300"
    assert len(up.requests) == 1


async def test_settlement_frees_what_the_upstream_did_not_use(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    client = await gateway(nursery, up, {"tokens": 300, "window_secs": 3600})
    async with client:
        codes = [(await client.post(CHAT, json=chat(max_tokens=200))).status_code for _ in range(5)]
    assert codes == [200] * 5  # each reserved ~220 but used 20


async def test_a_streamed_answer_is_settled_from_its_usage_chunk(nursery: trio.Nursery) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}
    stream = sse(
        {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {"choices": [], "usage": usage},
    )
    up = FakeUpstream(Reply(chunks=stream, headers=[(b"content-type", b"text/event-stream")]))
    client = await gateway(nursery, up, {"tokens": 300, "window_secs": 3600})
    async with client:
        codes = []
        for _ in range(4):
            r = await client.post(CHAT, json=chat(max_tokens=200, stream=True))
            codes.append(r.status_code)
            assert b'"usage"' not in r.content  # asked for by the gateway, not the client
    assert codes == [200] * 4


async def test_a_failed_upstream_answer_is_refunded(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(status=400, body=b'{"error": {"message": "bad"}}'))
    client = await gateway(nursery, up, {"tokens": 300, "window_secs": 3600})
    async with client:
        codes = [(await client.post(CHAT, json=chat(max_tokens=200))).status_code for _ in range(3)]
    assert codes == [400] * 3


async def test_a_key_token_limit_holds_for_that_key_only(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(40, 60))  # 100 used of ~117 reserved: 250 allows two
    definition = {"key": "sk-small", "token_limit": {"tokens": 250, "window_secs": 3600}}
    client = await gateway(nursery, up, key_definitions={"small": definition})
    async with client:
        small = [
            (
                await client.post(
                    CHAT, json=chat(max_tokens=100), headers={"authorization": "Bearer sk-small"}
                )
            ).status_code
            for _ in range(3)
        ]
        other = await client.post(CHAT, json=chat(max_tokens=100))
    assert small == [200, 200, 429] and other.status_code == 200


async def test_each_model_call_of_a_responses_loop_is_settled(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(400, 200))
    pool = {
        "providers": [{"url": await serve_app(nursery, up)}],
        "open_responses": {"adapter": True},
        "token_limit": {"tokens": 10_000, "window_secs": 10**6},
    }
    gw, url = await start_gateway(nursery, {"targets": {"m": pool}, "store": {"kind": "memory"}})
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post("/v1/responses", json={"model": "m", "input": "hi", "store": False})
    assert r.status_code == 200 and r.json()["status"] == "completed"
    limit = gw.targets.table.pools["m"].tokens
    assert limit is not None and limit.remaining == 10_000 - 600


# -- provider-level token limits -------------------------------------------------------------


async def provider_gateway(
    nursery: trio.Nursery, ups: list[FakeUpstream], limits: list[Any], **pool: Any
) -> tuple[Any, httpx.AsyncClient]:
    providers = []
    for up, limit in zip(ups, limits, strict=True):
        provider: dict[str, Any] = {"url": await serve_app(nursery, up)}
        if limit is not None:
            provider["token_limit"] = limit
        providers.append(provider)
    gw, url = await start_gateway(
        nursery, {"targets": {"m": {"providers": providers, "strategy": "priority", **pool}}}
    )
    return gw, httpx.AsyncClient(base_url=url, timeout=10)


async def test_a_provider_token_limit_refuses_with_its_headers(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 150))
    _, client = await provider_gateway(nursery, [up], [{"tokens": 300, "window_secs": 60}])
    async with client:
        first = await client.post(CHAT, json=chat(max_tokens=200))
        second = await client.post(CHAT, json=chat(max_tokens=200))
    assert first.status_code == 200 and second.status_code == 429
    assert second.headers["x-ratelimit-limit-tokens"] == "300"
    assert 30 <= int(second.headers["retry-after"]) <= 36
    assert len(up.requests) == 1


async def test_a_provider_out_of_tokens_falls_back_to_the_next(nursery: trio.Nursery) -> None:
    small, big = FakeUpstream(usage_reply(100, 150)), FakeUpstream(usage_reply(100, 150))
    _, client = await provider_gateway(
        nursery,
        [small, big],
        [{"tokens": 300, "window_secs": 3600}, None],
        fallback={"enabled": True, "on_rate_limit": True},
    )
    async with client:
        codes = [(await client.post(CHAT, json=chat(max_tokens=200))).status_code for _ in range(3)]
    assert codes == [200] * 3
    assert (len(small.requests), len(big.requests)) == (1, 2)


async def test_a_provider_refusal_gives_back_the_pool_reservation(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(100, 150))
    gw, client = await provider_gateway(
        nursery,
        [up],
        [{"tokens": 300, "window_secs": 3600}],
        token_limit={"tokens": 10_000, "window_secs": 10**6},
    )
    async with client:
        assert (await client.post(CHAT, json=chat(max_tokens=200))).status_code == 200
        assert (await client.post(CHAT, json=chat(max_tokens=200))).status_code == 429
    pool_limit = gw.targets.table.pools["m"].tokens
    assert pool_limit is not None and pool_limit.remaining == 10_000 - 250  # all or nothing


async def test_a_provider_token_limit_is_settled_with_the_usage(nursery: trio.Nursery) -> None:
    up = FakeUpstream(usage_reply(10, 10))
    gw, client = await provider_gateway(nursery, [up], [{"tokens": 300, "window_secs": 10**6}])
    async with client:
        codes = [(await client.post(CHAT, json=chat(max_tokens=200))).status_code for _ in range(5)]
    assert codes == [200] * 5
    limit = gw.targets.table.pools["m"].providers[0].tokens
    assert limit is not None and limit.remaining == 300 - 5 * 20


async def test_the_token_headers_say_when_the_limit_is_full_again(nursery: trio.Nursery) -> None:
    """``x-ratelimit-reset-tokens``: the seconds until what is missing refills (at 5 a second
    here), after the request's own reservation."""
    client = await gateway(nursery, FakeUpstream(), {"tokens": 3000, "window_secs": 600})
    async with client:
        r = await client.post(CHAT, json=chat(max_tokens=1000))
    assert r.status_code == 200
    missing = 3000 - int(r.headers["x-ratelimit-remaining-tokens"])  # ~1000 held
    assert 1000 <= missing < 1100
    assert abs(float(r.headers["x-ratelimit-reset-tokens"].removesuffix("s")) - missing / 5) < 1
