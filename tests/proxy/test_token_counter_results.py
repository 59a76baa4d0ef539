"""What the gateway does with each kind of result of the config's ``token_counter``: an int
>= 0 (zero included) is the prompt's size; anything else falls back to the byte estimate,
with one warning naming the counter and the result's type."""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
import pytest
import trio

from tests.proxy import test_token_counter
from tests.proxy.test_limit_edges import chat_body
from tests.proxy.test_token_counter import NO_REFILL, remaining_after
from tests.support import FakeUpstream, serve_app, start_gateway

HERE = "tests.proxy.test_token_counter_results"
BODY = "x" * 4000  # the byte estimate of its request is about a thousand tokens


def zero(body: Any) -> int:
    return 0


def a_float(body: Any) -> float:
    return 7.0


def negative(body: Any) -> int:
    return -5


async def test_a_counter_that_counts_zero_reserves_no_prompt(nursery: trio.Nursery) -> None:
    assert await remaining_after(nursery, f"{HERE}:zero", BODY) == 100_000 - 0 - 10


async def test_a_result_that_is_not_an_int_falls_back_to_the_byte_estimate(
    nursery: trio.Nursery,
) -> None:
    with_default = await remaining_after(nursery, None, BODY)
    assert await remaining_after(nursery, f"{HERE}:a_float", BODY) == with_default


async def test_a_negative_count_falls_back_to_the_byte_estimate(nursery: trio.Nursery) -> None:
    with_default = await remaining_after(nursery, None, BODY)
    assert await remaining_after(nursery, f"{HERE}:negative", BODY) == with_default


async def test_an_unusable_result_is_warned_naming_the_counter_and_the_type(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await remaining_after(nursery, f"{HERE}:a_float", BODY)
    warned = [r.getMessage() for r in caplog.records if "token_counter" in r.getMessage()]
    assert warned == [
        f"token_counter {HERE}:a_float returned float, not an int >= 0: "
        "the byte estimate is used for this request"
    ]


async def test_a_raising_counter_is_warned_naming_the_counter_and_the_exception_type(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await remaining_after(nursery, "tests.proxy.test_token_counter:broken", BODY)
    warned = [r.getMessage() for r in caplog.records if "token_counter" in r.getMessage()]
    assert warned == [
        "token_counter tests.proxy.test_token_counter:broken raised ValueError: "
        "the byte estimate is used for this request"
    ]


def words(body: Any) -> int:
    return len(body["messages"][0]["content"].split())


async def test_a_large_body_is_counted_from_its_parsed_request(nursery: trio.Nursery) -> None:
    # off the event loop (from 64 KiB) the counter still sees the parsed request
    assert await remaining_after(nursery, f"{HERE}:words", "x " * 40_000) == 100_000 - 40_000 - 10


async def test_a_raising_counter_on_a_large_body_falls_back_to_the_byte_estimate(
    nursery: trio.Nursery,
) -> None:
    content = "x" * 70_000
    with_default = await remaining_after(nursery, None, content)
    broken = "tests.proxy.test_token_counter:broken"
    assert await remaining_after(nursery, broken, content) == with_default


async def test_a_body_of_exactly_the_off_loop_size_is_counted_off_the_event_loop(
    nursery: trio.Nursery,
) -> None:
    pool = {
        "providers": [{"url": await serve_app(nursery, FakeUpstream())}],
        "token_limit": NO_REFILL,
    }
    config = {"targets": {"m": pool}, "token_counter": "tests.proxy.test_token_counter:seven"}
    _, url = await start_gateway(nursery, config)
    test_token_counter.counted_in.clear()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answer = await client.post(
            "/v1/chat/completions",
            content=chat_body(64 * 1024, max_tokens=10),  # docs: off the loop from 64 KiB
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 200, answer.text
    assert test_token_counter.counted_in[0] is not threading.main_thread()


async def test_a_prompt_counted_as_zero_that_asks_for_no_output_reserves_nothing(
    nursery: trio.Nursery,
) -> None:
    pool = {
        "providers": [{"url": await serve_app(nursery, FakeUpstream())}],
        "token_limit": NO_REFILL,
    }
    _, url = await start_gateway(nursery, {"targets": {"m": pool}, "token_counter": f"{HERE}:zero"})
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answer = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-remaining-tokens"] == "100000"
