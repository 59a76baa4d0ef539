"""The config's ``token_counter``: an exact prompt count for token limits, seen by an openai
client in ``x-ratelimit-remaining-tokens``; a failing counter falls back to the byte estimate."""

from __future__ import annotations

import logging
import threading
from typing import Any

import openai
import pytest
import trio

from onwards_trio import ConfigError, parse_config
from tests.support import FakeUpstream, serve_app, start_gateway

HERE = "tests.proxy.test_token_counter"
# A window so long that nothing refills while a test runs: the header shows the reservation.
NO_REFILL = {"tokens": 100_000, "window_secs": 1e9}
SECRET = "the launch code is 0000"
counted_in: list[threading.Thread] = []


def seven(body: Any) -> int:
    counted_in.append(threading.current_thread())
    return 7


def broken(body: Any) -> int:
    raise ValueError(f"cannot count {body['messages'][0]['content']}")  # quotes the prompt


async def remaining_after(nursery: trio.Nursery, counter: str | None, content: str) -> int:
    up = FakeUpstream()
    pool = {"providers": [{"url": await serve_app(nursery, up)}], "token_limit": NO_REFILL}
    config: dict[str, Any] = {"targets": {"m": pool}}
    if counter is not None:
        config["token_counter"] = counter
    _, url = await start_gateway(nursery, config)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
        answer = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": content}], max_tokens=10
        )
    return int(answer.headers["x-ratelimit-remaining-tokens"])


async def test_a_configured_counter_sizes_the_prompt(nursery: trio.Nursery) -> None:
    assert await remaining_after(nursery, f"{HERE}:seven", "x" * 4000) == 100_000 - 7 - 10


async def test_a_large_body_is_counted_off_the_event_loop(nursery: trio.Nursery) -> None:
    counted_in.clear()
    assert await remaining_after(nursery, f"{HERE}:seven", "x" * 70_000) == 100_000 - 7 - 10
    assert counted_in and counted_in[0] is not threading.main_thread()


async def test_a_raising_counter_falls_back_to_the_byte_estimate(nursery: trio.Nursery) -> None:
    with_default = await remaining_after(nursery, None, "x" * 4000)
    assert await remaining_after(nursery, f"{HERE}:broken", "x" * 4000) == with_default


async def test_a_raising_counter_warns_without_the_prompt(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await remaining_after(nursery, f"{HERE}:broken", SECRET)
    warned = [r.getMessage() for r in caplog.records if "token_counter" in r.getMessage()]
    assert len(warned) == 1 and "ValueError" in warned[0]
    assert SECRET not in caplog.text


def test_a_counter_that_cannot_be_imported_is_a_config_error() -> None:
    named = r"'no_such_module:count' cannot be imported.*@ \$\.token_counter"
    with pytest.raises(ConfigError, match=named):
        parse_config({"targets": {}, "token_counter": "no_such_module:count"})


def test_a_counter_that_is_not_callable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"test_token_counter:HERE. is not callable"):
        parse_config({"targets": {}, "token_counter": f"{HERE}:HERE"})


async def test_a_prompt_is_counted_once_for_the_pool_and_its_provider(
    nursery: trio.Nursery,
) -> None:
    """The pool's and the chosen provider's token limits both need the prompt's size; an
    exact counter (which may be slow) runs once for both."""
    counted_in.clear()
    provider = {"url": await serve_app(nursery, FakeUpstream()), "token_limit": NO_REFILL}
    pool = {"providers": [provider], "token_limit": NO_REFILL}
    config = {"targets": {"m": pool}, "token_counter": f"{HERE}:seven"}
    _, url = await start_gateway(nursery, config)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
        answer = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 7 - 10)
    assert len(counted_in) == 1
