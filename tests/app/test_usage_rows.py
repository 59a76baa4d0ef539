"""What a usage ledger row records, read back through ``GET /v1/usage``: when the request
arrived, the alias the client named (also when a routing rule sent it to another pool) and
the model the provider was asked for."""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio

from tests.app.test_usage_ledger import MESSAGES, rows
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, start_gateway


async def ledger_gateway(nursery: trio.Nursery, up: FakeUpstream, **top: Any) -> str:
    upstream = await serve_app(nursery, up)
    config = {
        "targets": {"m": {}},
        "store": {"kind": "memory"},
        "usage": {"ledger": True},
        **top,
    }
    # each pool's one provider is the fake upstream ("rules": the pool's routing rules)
    config["targets"] = {
        alias: {
            "providers": [{"url": upstream, **{k: v for k, v in spec.items() if k != "rules"}}],
            "routing_rules": spec.get("rules", []),
        }
        for alias, spec in config["targets"].items()
    }
    _, url = await start_gateway(nursery, config)
    return url


async def chat(url: str, model: str, key: str | None = None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES}, headers=headers
        )
    assert r.status_code == 200, r.text


async def test_a_row_is_stamped_with_when_the_request_arrived(nursery: trio.Nursery) -> None:
    url = await ledger_gateway(nursery, FakeUpstream(Reply(body=chat_completion(), delay=1.0)))
    sent = time.time()
    await chat(url, "m")
    answered = time.time()
    (row,) = await rows(url)
    assert sent - 0.01 <= row["time"] <= answered - 0.5  # not when the answer ended


async def test_a_row_names_the_model_the_provider_was_asked_for(nursery: trio.Nursery) -> None:
    url = await ledger_gateway(nursery, FakeUpstream(), targets={"m": {"onwards_model": "big-1"}})
    await chat(url, "m")
    (row,) = await rows(url)
    assert row["alias"] == "m" and row["model"] == "big-1"


async def test_a_redirected_request_is_recorded_under_the_alias_the_client_named(
    nursery: trio.Nursery,
) -> None:
    redirect = {
        "match_labels": {"purpose": "batch"},
        "action": {"type": "redirect", "target": "cheap"},
    }
    url = await ledger_gateway(
        nursery,
        FakeUpstream(),
        auth={"key_definitions": {"batch": {"key": "sk-batch", "labels": {"purpose": "batch"}}}},
        targets={"m": {"rules": [redirect]}, "cheap": {}},
    )
    await chat(url, "m", "sk-batch")
    (row,) = await rows(url, "sk-batch")
    assert row["alias"] == "m" and row["model"] == "cheap"


async def test_a_rows_latency_is_the_requests_time_in_milliseconds(nursery: trio.Nursery) -> None:
    url = await ledger_gateway(nursery, FakeUpstream(Reply(body=chat_completion(), delay=1.0)))
    sent = time.time()
    await chat(url, "m")
    took = time.time() - sent
    (row,) = await rows(url)
    assert 1000 <= row["latency_ms"] <= took * 1000


async def test_a_client_gone_before_the_answer_leaves_a_row_with_status_499(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream(Reply(body=chat_completion(), delay=30.0))
    url = await ledger_gateway(nursery, up)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"model": "m", "messages": MESSAGES}
        with trio.move_on_after(1.0):  # the client gives up while the upstream thinks
            await client.post("/v1/chat/completions", json=body)
    with trio.fail_after(20):
        while not (found := await rows(url)):
            await trio.sleep(0.05)  # the row is noted once the gateway has seen the client go
    assert [r["status"] for r in found] == [499]


async def test_a_stream_answered_with_a_plain_error_is_recorded_as_not_streamed(
    nursery: trio.Nursery,
) -> None:
    error = Reply(status=400, body=b'{"error": {"message": "no"}}')
    url = await ledger_gateway(nursery, FakeUpstream(error))
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    (row,) = await rows(url)
    assert row["status"] == 400 and row["streamed"] is False
