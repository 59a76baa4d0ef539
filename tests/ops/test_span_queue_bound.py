"""The spans waiting for export are bounded by ``telemetry.max_queue_size``: past it, a request's
server and client spans are dropped, not queued (memory stays bounded while a collector is
down or between exports)."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_telemetry_http import CHAT, _chat, _client, _config, _gateway
from tests.support import FakeUpstream, serve_app


async def test_spans_past_the_queue_size_are_dropped(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No export before the gateway stops: everything queued goes out in its last flush.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    upstream = FakeUpstream()
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        config = _config(receiver.url, targets, telemetry={"max_queue_size": 3})
        async with trio.open_nursery() as inner:
            _, url = await _gateway(inner, config)
            async with _client(url) as client:
                for _ in range(3):  # a client span, then a server span, each
                    assert (await client.post(CHAT, json=_chat())).status_code == 200
            inner.cancel_scope.cancel()
    # The first request's two spans and the second's client span; the rest was dropped.
    assert sorted(s.kind for s in receiver.spans) == ["client", "client", "server"]


async def test_a_full_batch_is_exported_at_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # no tick within the test
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    upstream = FakeUpstream()
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        with trio.fail_after(10):  # the request's two spans fill a batch
            spans = await receiver.wait_for(2)
    assert sorted(s.kind for s in spans) == ["client", "server"]
