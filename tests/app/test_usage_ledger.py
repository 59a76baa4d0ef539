"""The usage ledger over real sockets: the rows a gateway writes for plain, streamed and loop
requests match what the fake upstream reported, in every store (memory, SQLite, PostgreSQL),
and ``GET /v1/usage`` reads them back, scoped by key and summed by group."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from onwards_trio import Gateway, parse_config
from onwards_trio._ops.metrics import Metrics, install_metrics
from onwards_trio._transport.asgi import serve_lifespan
from tests.responses.test_responses_api import completion
from tests.stores.test_store_postgres import fresh_schema, needs_postgres
from tests.support import FakeUpstream, Recorded, Reply, serve_app, sse, start_gateway

MESSAGES: Any = [{"role": "user", "content": "hi"}]
# what the fake upstream reports: prompt, completion, cached prompt tokens
PLAIN = (11, 7, 3)
STREAMED = (13, 5, 0)
TOOL_CALL = (17, 2, 0)
FINAL = (23, 4, 8)


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _answer(usage: tuple[int, int, int], **message: Any) -> Reply:
    finish = "tool_calls" if "tool_calls" in message else "stop"
    return completion({"content": "hi", **message}, finish, _usage(*usage))


def _streamed(usage: tuple[int, int, int]) -> Reply:
    chunks = sse(
        {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c", "choices": [], "usage": _usage(*usage)},
    )
    return Reply(chunks=chunks, headers=[(b"content-type", b"text/event-stream")])


def upstream_script(rec: Recorded) -> Reply:
    """Plain and streamed chat answers; a loop's first call asks for the ``lookup`` tool, its
    second (with the tool's result) answers."""
    body = rec.json()
    if body.get("tools"):
        if any(m.get("role") == "tool" for m in body["messages"]):
            return _answer(FINAL)
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "lookup", "arguments": "{}"},
        }
        return _answer(TOOL_CALL, content=None, tool_calls=[call])
    return _streamed(STREAMED) if body.get("stream") else _answer(PLAIN)


@contextlib.asynccontextmanager
async def store_spec(kind: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    if kind == "postgres":
        async with fresh_schema() as dsn:
            yield {"kind": "postgres", "dsn": dsn}
    elif kind == "sqlite":
        yield {"kind": "sqlite", "path": str(tmp_path / "ledger.sqlite3")}
    else:
        yield {"kind": "memory"}


STORES = [
    "memory",
    "sqlite",
    pytest.param("postgres", marks=needs_postgres),
]


async def ledger_gateway(
    nursery: trio.Nursery, store: dict[str, Any], **extra: Any
) -> tuple[Gateway, str]:
    upstream = await serve_app(nursery, FakeUpstream(upstream_script))
    tool = await serve_app(nursery, FakeUpstream(Reply(body=b'{"found": true}')))
    config = {
        "targets": {
            "m": {"url": upstream + "/v1", "open_responses": {"adapter": True}},
            "other": {"url": upstream + "/v1"},
        },
        "tools": {"lookup": {"url": tool + "/t"}},
        "store": store,
        "usage": {"ledger": True},
        **extra,
    }
    return await start_gateway(nursery, config)


async def usage(url: str, key: str | None = None, **params: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        return await client.get("/v1/usage", params={"start": 0, **params}, headers=headers)


async def rows(url: str, key: str | None = None, **params: Any) -> list[dict[str, Any]]:
    r = await usage(url, key, limit=1000, **params)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["rows"]
    return found


def tokens(row: dict[str, Any]) -> tuple[int, int, int]:
    return (row["input_tokens"], row["output_tokens"], row["cached_tokens"])


def sdk(url: str, key: str = "sk-any") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=20)


# -- rows match the upstream's usage -------------------------------------------------------------


@pytest.fixture(params=STORES)
async def ledger_url(
    request: pytest.FixtureRequest, tmp_path: Path, nursery: trio.Nursery
) -> AsyncIterator[str]:
    """A gateway writing its ledger to each kind of store."""
    async with store_spec(request.param, tmp_path) as store:
        _, url = await ledger_gateway(nursery, store)
        yield url


async def test_a_plain_request_leaves_a_row_with_its_usage(ledger_url: str) -> None:
    async with sdk(ledger_url) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    (row,) = await rows(ledger_url)
    assert tokens(row) == PLAIN
    assert row["alias"] == "m" and row["provider"] == 0 and row["model"] == "m"
    assert row["status"] == 200 and row["streamed"] is False
    assert row["route"] == "/v1/chat/completions" and row["key_label"] == "other"
    assert row["latency_ms"] > 0 and row["request_id"]


async def test_a_streamed_request_leaves_a_row_with_its_final_chunk_usage(ledger_url: str) -> None:
    # the sync SDK in a thread: the async one leaves its SSE generators to the finaliser
    with openai.OpenAI(base_url=f"{ledger_url}/v1", api_key="k", max_retries=0) as client:
        with trio.fail_after(30):
            chunks = await trio.to_thread.run_sync(
                lambda: list(
                    client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
                )
            )
    (row,) = await rows(ledger_url)
    assert all(c.usage is None for c in chunks)  # the gateway asked for it, not the client
    assert tokens(row) == STREAMED and row["streamed"] is True and row["status"] == 200


async def test_each_model_call_of_a_loop_leaves_a_row_under_the_response_id(
    ledger_url: str,
) -> None:
    async with sdk(ledger_url) as client:
        response = await client.responses.create(model="m", input="look it up")
    found = await rows(ledger_url)
    assert response.status == "completed"
    assert [tokens(r) for r in found] == [TOOL_CALL, FINAL]
    assert {r["request_id"] for r in found} == {response.id}
    assert {r["route"] for r in found} == {"/v1/responses"}


async def test_an_anthropic_messages_request_leaves_a_row_on_its_route(
    nursery: trio.Nursery,
) -> None:
    upstream = await serve_app(nursery, FakeUpstream(_answer(PLAIN)))
    config = {
        "targets": {"claude": {"url": upstream + "/v1", "anthropic": {"adapter": True}}},
        "store": {"kind": "memory"},
        "usage": {"ledger": True},
    }
    _, url = await start_gateway(nursery, config)
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:
        r = await client.post(
            "/v1/messages",
            json={"model": "claude", "max_tokens": 10, "messages": MESSAGES},
            headers={"anthropic-version": "2023-06-01"},
        )
    assert r.status_code == 200, r.text
    (row,) = await rows(url)
    assert row["route"] == "/v1/messages" and tokens(row) == PLAIN


async def test_a_refused_request_leaves_a_row_with_its_status_and_no_tokens(
    nursery: trio.Nursery,
) -> None:
    _, url = await ledger_gateway(
        nursery,
        {"kind": "memory"},
        targets={
            "m": {
                "url": await serve_app(nursery, FakeUpstream(_answer(PLAIN))),
                "rate_limit": {"requests_per_second": 0.001, "burst_size": 1},
            }
        },
    )
    async with sdk(url) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    found = await rows(url)
    assert [(r["status"], tokens(r), r["provider"]) for r in found] == [
        (200, PLAIN, 0),
        (429, (0, 0, 0), None),
    ]


async def test_an_unknown_model_leaves_no_row(nursery: trio.Nursery) -> None:
    _, url = await ledger_gateway(nursery, {"kind": "memory"})
    async with sdk(url) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES)
    assert await rows(url) == []


# -- GET /v1/usage ------------------------------------------------------------------------------

AUTH = {
    "global_keys": ["sk-admin"],
    "key_definitions": {"team-a": {"key": "sk-team-a"}, "team-b": {"key": "sk-team-b"}},
}


async def keyed_gateway(nursery: trio.Nursery) -> str:
    upstream = await serve_app(nursery, FakeUpstream(_answer(PLAIN)))
    keys = ["team-a", "team-b"]
    _, url = await ledger_gateway(
        nursery,
        {"kind": "memory"},
        auth=AUTH,
        targets={"m": {"url": upstream, "keys": keys}, "other": {"url": upstream, "keys": keys}},
    )
    for key, model, times in (
        ("sk-team-a", "m", 2),
        ("sk-team-b", "m", 1),
        ("sk-team-b", "other", 1),
    ):
        async with sdk(url, key) as client:
            for _ in range(times):
                await client.chat.completions.create(model=model, messages=MESSAGES)
    return url


async def test_a_global_key_sees_every_row(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    found = await rows(url, "sk-admin")
    assert sorted(r["key_label"] for r in found) == ["team-a", "team-a", "team-b", "team-b"]


async def test_a_defined_key_sees_only_its_own_rows(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    found = await rows(url, "sk-team-b")
    assert [r["key_label"] for r in found] == ["team-b", "team-b"]
    r = await usage(url, "sk-team-b")
    assert r.json()["data"][0]["requests"] == 2


async def test_a_defined_key_asking_for_another_label_is_forbidden(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    r = await usage(url, "sk-team-b", key_label="team-a")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


async def test_no_key_or_an_unknown_key_is_unauthenticated(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    missing, unknown = await usage(url), await usage(url, "sk-nobody")
    assert (missing.status_code, unknown.status_code) == (401, 401)
    assert unknown.json()["error"]["code"] == "invalid_api_key"


async def test_sums_are_grouped_by_the_keys_asked_for(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    r = await usage(url, "sk-admin", group_by="key_label,alias")
    assert r.status_code == 200
    groups = [
        (g["key_label"], g["alias"], g["requests"], g["input_tokens"], g["output_tokens"])
        for g in r.json()["data"]
    ]
    assert groups == [
        ("team-a", "m", 2, 2 * PLAIN[0], 2 * PLAIN[1]),
        ("team-b", "m", 1, PLAIN[0], PLAIN[1]),
        ("team-b", "other", 1, PLAIN[0], PLAIN[1]),
    ]


async def test_filters_narrow_the_sums(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    r = await usage(url, "sk-admin", alias="other")
    (total,) = r.json()["data"]
    assert total["requests"] == 1 and total["cached_tokens"] == PLAIN[2]


async def test_rows_are_paged_with_a_cursor(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    first = (await usage(url, "sk-admin", limit=3)).json()
    assert len(first["rows"]) == 3 and first["has_more"] is True
    second = (await usage(url, "sk-admin", limit=3, after=first["next_after"])).json()
    assert len(second["rows"]) == 1 and second["has_more"] is False
    assert second["next_after"] is None
    ids = [r["id"] for r in first["rows"] + second["rows"]]
    assert ids == sorted(set(ids))


async def test_a_time_range_excludes_rows_outside_it(nursery: trio.Nursery) -> None:
    url = await keyed_gateway(nursery)
    r = await usage(url, "sk-admin", start="2001-01-01T00:00:00Z", end="2001-01-02")
    assert r.status_code == 200 and r.json()["data"][0]["requests"] == 0


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "colour"}, "group_by"),
        ({"group_by": "alias,alias"}, "group_by"),
        ({"start": "yesterday"}, "start"),
        ({"start": 10, "end": 5}, "start"),
        ({"limit": 1001}, "limit"),
        ({"limit": -1}, "limit"),
        ({"after": "x"}, "after"),
        ({"sort": "asc"}, "sort"),
    ],
)
async def test_bad_parameters_are_a_400_naming_the_parameter(
    params: dict[str, Any], param: str, nursery: trio.Nursery
) -> None:
    _, url = await ledger_gateway(nursery, {"kind": "memory"})
    r = await usage(url, **params)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == (
        "invalid_request_error"
    )


async def test_the_route_is_a_404_while_the_ledger_is_off(nursery: trio.Nursery) -> None:
    upstream = await serve_app(nursery, FakeUpstream(_answer(PLAIN)))
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": upstream}}})
    r = await usage(url)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- cost ------------------------------------------------------------------------------------------

PRICING = {"input": 2.5, "output": 10, "cached_input": 1.25}
# PLAIN: 8 uncached and 3 cached input tokens, 7 output: 20 + 3.75 + 70 micro-units, rounded up
PLAIN_COST = 94


async def priced_gateway(nursery: trio.Nursery) -> tuple[Gateway, str]:
    upstream = await serve_app(nursery, FakeUpstream(_answer(PLAIN)))
    config = parse_config(
        {
            "targets": {"m": {"url": upstream, "pricing": PRICING}},
            "store": {"kind": "memory"},
            "usage": {"ledger": True},
        }
    )
    gateway = Gateway(config)
    install_metrics(gateway, Metrics())
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    async with sdk(info.url) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    return gateway, info.url


async def test_a_row_costs_its_usage_at_the_provider_price(nursery: trio.Nursery) -> None:
    _, url = await priced_gateway(nursery)
    r = await usage(url, limit=1)
    (total,), (row,) = r.json()["data"], r.json()["rows"]
    assert row["cost_micros"] == PLAIN_COST and row["cost"] == "0.000094"
    assert total["cost_micros"] == PLAIN_COST


async def test_the_cost_counter_adds_what_responses_cost(nursery: trio.Nursery) -> None:
    gateway, _ = await priced_gateway(nursery)
    assert b'onwards_cost_total{alias="m",key="other",provider="0"} 9.4e-05' in (
        gateway.metrics.render()
    )


async def test_a_client_leaving_after_the_last_event_still_leaves_the_usage(
    nursery: trio.Nursery,
) -> None:
    """The upstream holds its body open after ``[DONE]``; the client leaves at ``[DONE]``, so
    the relay is cancelled before the body ends: the usage already seen still counts."""

    async def lingering(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in _streamed(STREAMED).chunks or ():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await trio.sleep(60)  # the end of the body never comes in time

    upstream = await serve_app(nursery, lingering)
    config = {"targets": {"m": {"url": upstream}}, "store": {"kind": "memory"}}
    _, url = await start_gateway(nursery, {**config, "usage": {"ledger": True}})
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    client = httpx.AsyncClient(base_url=url, timeout=20)
    async with client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                break
    with trio.fail_after(20):
        while not (found := await rows(url)):
            await trio.sleep(0.05)  # the relay notices the client left
    assert tokens(found[0]) == STREAMED
