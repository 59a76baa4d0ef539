"""Token usage through a real gateway: the Prometheus counters match what the upstream reported,
and asking a streaming upstream for usage leaves the client's stream as it was."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import trio

from onwards_trio._ops.metrics import Metrics, install_metrics
from tests.support import FakeUpstream, Recorded, Reply, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"
KEY = "sk-usage-test-key-3c9d"


def _usage(p: int, c: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _completion(message: dict[str, Any], usage: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
    )


def _stream(usage: dict[str, Any] | None, with_nulls: bool = False) -> Reply:
    extra = {"usage": None} if with_nulls else {}
    chunks: list[Any] = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "hel"}}], **extra},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}], **extra},
    ]
    if usage is not None:
        chunks.append({"id": "c", "choices": [], "usage": usage})
    return Reply(headers=[(b"content-type", b"text/event-stream")], chunks=sse(*chunks))


async def _gateway(
    nursery: trio.Nursery, upstream: FakeUpstream, **config: Any
) -> tuple[httpx.AsyncClient, Metrics]:
    url = await serve_app(nursery, upstream)
    targets = config.pop("targets", {"gpt": {"url": url, "keys": ["team-a"]}})
    gateway, gw_url = await start_gateway(
        nursery,
        {
            "auth": {"key_definitions": {"team-a": {"key": KEY}}},
            "targets": targets(url) if callable(targets) else targets,
            **config,
        },
    )
    metrics = install_metrics(gateway, Metrics())
    client = httpx.AsyncClient(
        base_url=gw_url, timeout=10, headers={"authorization": f"Bearer {KEY}"}
    )
    return client, metrics


async def _tokens(metrics: Metrics, kind: str, want: float, **labels: str) -> float:
    """The counter once it reached ``want`` (the gateway counts after the client's reply)."""
    name = f"onwards_{kind}_tokens_total"
    with trio.fail_after(5):
        while (value := metrics.registry.get_sample_value(name, labels) or 0.0) < want:
            await trio.sleep(0.005)
    return value


async def test_plain_request_usage_is_counted_by_alias_provider_and_key(
    nursery: trio.Nursery,
) -> None:
    body = _completion({"role": "assistant", "content": "hi"}, _usage(12, 7, cached=4))
    client, metrics = await _gateway(nursery, FakeUpstream(Reply(body=body)))
    async with client:
        for _ in range(2):
            r = await client.post(CHAT, json={"model": "gpt", "messages": []})
            assert r.status_code == 200
    labels = {"alias": "gpt", "provider": "0", "key": "team-a"}
    assert await _tokens(metrics, "input", 24, **labels) == 24
    assert await _tokens(metrics, "output", 14, **labels) == 14
    assert await _tokens(metrics, "cached_input", 8, **labels) == 8


async def test_streamed_request_usage_comes_from_the_final_chunk(nursery: trio.Nursery) -> None:
    client, metrics = await _gateway(nursery, FakeUpstream(_stream(_usage(9, 2))))
    options = {"include_usage": True}
    async with client:
        r = await client.post(
            CHAT, json={"model": "gpt", "messages": [], "stream": True, "stream_options": options}
        )
    assert '"usage"' in r.text  # the client asked for it, so it gets it
    labels = {"alias": "gpt", "provider": "0", "key": "team-a"}
    assert await _tokens(metrics, "input", 9, **labels) == 9
    assert await _tokens(metrics, "output", 2, **labels) == 2


async def test_stream_usage_is_asked_for_without_changing_the_clients_stream(
    nursery: trio.Nursery,
) -> None:
    def script(rec: Recorded) -> Reply:
        asked = rec.json().get("stream_options", {}).get("include_usage") is True
        return _stream(_usage(5, 3) if asked else None, with_nulls=asked)

    upstream = FakeUpstream(script)
    client, metrics = await _gateway(nursery, upstream, telemetry={"stream_usage": True})
    async with client:
        r = await client.post(CHAT, json={"model": "gpt", "messages": [], "stream": True})
    assert upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    assert r.text == b"".join(_stream(None).chunks or []).decode()
    labels = {"alias": "gpt", "provider": "0", "key": "team-a"}
    assert await _tokens(metrics, "output", 3, **labels) == 3


async def test_loop_usage_counts_every_model_call_on_its_alias(nursery: trio.Nursery) -> None:
    def script(rec: Recorded) -> Reply:
        body = rec.json()
        if body["model"] == "small":
            return Reply(body=_completion({"role": "assistant", "content": "x"}, _usage(2, 1)))
        if any(m.get("role") == "tool" for m in body["messages"]):
            return Reply(body=_completion({"role": "assistant", "content": "ok"}, _usage(20, 5)))
        function = {"name": "helper", "arguments": '{"input": "y"}'}
        call = {"id": "call_h", "type": "function", "function": function}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return Reply(body=_completion(message, _usage(10, 3)))

    client, metrics = await _gateway(
        nursery,
        FakeUpstream(script),
        targets=lambda url: {
            "m": {"url": url + "/v1", "keys": ["team-a"], "open_responses": {"adapter": True}},
            "small": {"url": url + "/v1", "keys": ["team-a"]},
        },
        tools={"helper": {"kind": "agent", "model": "small"}},
        store={"kind": "memory"},
    )
    async with client:
        r = await client.post("/v1/responses", json={"model": "m", "input": "go"})
    assert r.json()["status"] == "completed"
    assert await _tokens(metrics, "input", 30, alias="m", provider="0", key="team-a") == 30
    assert await _tokens(metrics, "input", 2, alias="small", provider="0", key="team-a") == 2
