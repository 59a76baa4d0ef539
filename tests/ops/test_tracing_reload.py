"""The ``telemetry`` section on hot reload: read at start (the tracer, its exporter and queue
live for the process), but for ``stream_usage``; a reload that changes it says so."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from onwards_trio import Config, Gateway, parse_config
from onwards_trio._ops.reload import ConfigWatcher
from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_reload_http import body, read, write
from tests.support import FakeUpstream, serve_app

RESTART = "telemetry changes (but stream_usage) take effect after a restart"


pytestmark = pytest.mark.usefixtures("fast_otel_export")


async def test_a_reloaded_endpoint_is_logged_and_spans_stay_with_the_first_collector(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    targets = {"gpt-4": {"url": await serve_app(nursery, FakeUpstream())}}
    path = tmp_path / "config.json"
    async with otlp_receiver() as first, otlp_receiver() as second:
        write(path, {"targets": targets, "telemetry": {"endpoint": first.url}})
        config = parse_config(read(path))
        gateway = Gateway(config)
        info = await nursery.start(gateway.serve, "127.0.0.1", 0)
        watcher = ConfigWatcher(path, gateway.update_config, current=config)
        write(path, {"targets": targets, "telemetry": {"endpoint": second.url}})
        with caplog.at_level(logging.WARNING, "onwards_trio.reload"):
            assert watcher.reload_now()
        assert RESTART in caplog.text
        async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
            assert (await client.post("/v1/chat/completions", json=body())).status_code == 200
        with trio.fail_after(10):
            await first.wait_for(1, "POST /v1/chat/completions")
    assert second.requests == 0


def test_a_reload_changing_only_stream_usage_passes_it_on_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.json"
    doc = {"targets": {"gpt-4": {"url": "http://127.0.0.1:1"}}, "telemetry": {"enabled": False}}
    write(path, doc)
    applied: list[Config] = []
    watcher = ConfigWatcher(path, applied.append, current=parse_config(read(path)))
    write(path, {**doc, "telemetry": {"enabled": False, "stream_usage": True}})
    with caplog.at_level(logging.WARNING, "onwards_trio.reload"):
        assert watcher.reload_now()
    assert applied[-1].telemetry.stream_usage is True
    assert RESTART not in caplog.text
