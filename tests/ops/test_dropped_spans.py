"""Spans dropped at a full export queue are visible: ``<p>_trace_spans_dropped_total`` on the
metrics endpoint counts them, and a warning says how many, at most once a minute.

The gateway runs on a frozen clock (``mock_clock``: time moves only when the test jumps it, so
no export tick and no warning comes unasked); sockets, the collector and the metrics endpoint
are real. The collector never answers, and the queue holds one span."""

from __future__ import annotations

import functools
import logging

import httpx
import pytest
import trio
import trio.testing

from onwards_trio import Gateway, parse_config
from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_telemetry_http import CHAT, KEY, _chat, _config
from tests.support import FakeUpstream, serve_app

pytestmark = pytest.mark.usefixtures("fast_otel_export")

DROPPED = "onwards_trace_spans_dropped_total"


async def _dropped(scraper: httpx.AsyncClient) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    r = await scraper.get("")
    assert r.status_code == 200
    (value,) = [
        s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == DROPPED
    ]
    return value


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "spans dropped" in r.getMessage()]


async def _requests(client: httpx.AsyncClient, count: int) -> None:
    for _ in range(count):
        assert (await client.post(CHAT, json=_chat())).status_code == 200
    await trio.testing.wait_all_tasks_blocked()  # their spans have ended


async def test_dropped_spans_are_counted_and_warned_about_once_a_minute(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "onwards_trio.telemetry")
    async with otlp_receiver("slow") as collector, trio.open_nursery() as nursery:
        try:
            await _drop_and_check(nursery, collector.url, mock_clock, caplog)
        finally:
            # Shutting down flushes the queue within a bound of virtual time: let it pass.
            mock_clock.autojump_threshold = 0
            nursery.cancel_scope.cancel()
    assert "Bearer" not in caplog.text and KEY not in caplog.text


async def _drop_and_check(
    nursery: trio.Nursery,
    collector: str,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    targets = {"gpt": {"url": await serve_app(nursery, FakeUpstream())}}
    config = _config(collector, targets, telemetry={"max_queue_size": 1})
    serve = functools.partial(Gateway(parse_config(config)).serve, metrics_port=0)
    info = await nursery.start(serve, "127.0.0.1", 0)
    assert info.metrics_url is not None
    client = httpx.AsyncClient(base_url=info.url, headers={"authorization": f"Bearer {KEY}"})
    scraper = httpx.AsyncClient(base_url=info.metrics_url)
    async with client, scraper:
        # Nothing is exported before a tick: the first request's client span fills the
        # queue; its server span and both spans of the next two requests are dropped.
        await _requests(client, 3)
        assert await _dropped(scraper) == 5
        assert _warnings(caplog) == []

        mock_clock.jump(60)  # a minute: the warning; the tick sends the queued span to the
        await trio.testing.wait_all_tasks_blocked()  # collector, which keeps it waiting
        assert _warnings(caplog) == [
            "5 spans dropped in the last 60s, 5 since start: the export queue "
            "(max_queue_size 1) was full, the collector is down or slow"
        ]

        await _requests(client, 2)  # one span queued, three dropped
        assert await _dropped(scraper) == 8
        mock_clock.jump(59)
        await trio.testing.wait_all_tasks_blocked()
        assert len(_warnings(caplog)) == 1  # not before the minute is over
        mock_clock.jump(1)
        await trio.testing.wait_all_tasks_blocked()
        assert _warnings(caplog)[1:] == [
            "3 spans dropped in the last 60s, 8 since start: the export queue "
            "(max_queue_size 1) was full, the collector is down or slow"
        ]

        mock_clock.jump(60)  # a minute without drops: no warning
        await trio.testing.wait_all_tasks_blocked()
        assert len(_warnings(caplog)) == 2


async def test_without_tracing_there_is_no_dropped_spans_counter(nursery: trio.Nursery) -> None:
    targets = {"gpt": {"url": await serve_app(nursery, FakeUpstream())}}
    serve = functools.partial(Gateway(parse_config({"targets": targets})).serve, metrics_port=0)
    info = await nursery.start(serve, "127.0.0.1", 0)
    async with httpx.AsyncClient(timeout=10) as scraper:
        r = await scraper.get(info.metrics_url)
    assert r.status_code == 200 and "onwards_usage_ledger_dropped_total" in r.text
    assert "trace_spans_dropped" not in r.text
