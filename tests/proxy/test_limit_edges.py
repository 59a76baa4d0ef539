"""Limits at their edges, over real sockets: what a token limit reserves for a request, to
the token, as the client sees it in ``x-ratelimit-remaining-tokens``."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from tests.support import FakeUpstream, serve_app, start_gateway

CHAT = "/v1/chat/completions"
# A window so long that nothing refills while a test runs: the header shows the reservation.
NO_REFILL = {"tokens": 1000, "window_secs": 1e9, "default_output_tokens": 500}


async def remaining_after(
    nursery: trio.Nursery, body: bytes, token_limit: dict[str, Any] = NO_REFILL
) -> int:
    up = FakeUpstream()
    pool: dict[str, Any] = {
        "providers": [{"url": await serve_app(nursery, up)}],
        "token_limit": token_limit,
    }
    _, url = await start_gateway(nursery, {"targets": {"m": pool}})
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        answer = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    return int(answer.headers["x-ratelimit-remaining-tokens"])


def chat_body(length: int, **extra: Any) -> bytes:
    """A chat body of exactly ``length`` bytes (padded inside the message)."""
    base = {"model": "m", "messages": [{"role": "user", "content": ""}], **extra}
    pad = length - len(orjson.dumps(base))
    base["messages"][0]["content"] = "x" * pad
    body = orjson.dumps(base)
    assert len(body) == length
    return body


async def test_the_prompt_is_reserved_at_a_whole_token_per_four_body_bytes(
    nursery: trio.Nursery,
) -> None:
    body = chat_body(403, max_tokens=10)  # 100.75 tokens of prompt: 100 are reserved
    assert await remaining_after(nursery, body) == 1000 - 100 - 10


async def test_max_tokens_zero_reserves_no_output(nursery: trio.Nursery) -> None:
    body = chat_body(400, max_tokens=0)  # not the 500 default: the client asked for none
    assert await remaining_after(nursery, body) == 1000 - 100


async def test_a_token_window_of_one_second_is_served(nursery: trio.Nursery) -> None:
    limit = {"tokens": 100_000, "window_secs": 1, "default_output_tokens": 0}
    assert await remaining_after(nursery, chat_body(400), limit) >= 100_000 - 100


async def test_a_token_limit_of_one_token_is_served(nursery: trio.Nursery) -> None:
    limit = {"tokens": 1, "window_secs": 1e9, "default_output_tokens": 0}
    # a bigger estimate is capped at the whole limit, so the first request takes the token
    assert await remaining_after(nursery, chat_body(400), limit) == 0
