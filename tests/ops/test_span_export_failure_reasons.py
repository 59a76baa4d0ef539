"""A collector that answers a span export with something other than HTTP: the warning that
the spans were dropped says what the collector did wrong, so an operator can fix it."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.support import FakeUpstream, read_head, serve_app, serve_raw

CHAT = "/v1/chat/completions"


pytestmark = pytest.mark.usefixtures("fast_otel_export")


@pytest.fixture(autouse=True)
def _one_try(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.5")  # one try: no retry fits in it


async def test_a_collector_switching_protocols_is_named_in_the_warning(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def switching(stream: trio.SocketStream) -> None:
        async with stream:
            await read_head(stream)
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
            )
            await stream.receive_some()  # until the gateway hangs up

    collector = f"http://127.0.0.1:{await serve_raw(nursery, switching)}/v1/traces"
    targets = {"gpt": {"url": await serve_app(nursery, FakeUpstream())}}
    config = {"targets": targets, "telemetry": {"endpoint": collector}}
    info = await nursery.start(Gateway(parse_config(config)).serve, "127.0.0.1", 0)
    with caplog.at_level(logging.WARNING, "onwards_trio.telemetry"):
        async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
            chat = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
            assert (await client.post(CHAT, json=chat)).status_code == 200
        with trio.fail_after(10):
            while "span export" not in caplog.text:
                await trio.sleep(0.01)
    assert "(RemoteProtocolError: unexpected upgrade response)" in caplog.text
