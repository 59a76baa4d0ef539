"""How the gateway sends spans (``_ops/otlp.py``): the OTLP/HTTP exporter's rules, seen by a
scripted collector on loopback — retries of transient refusals, none of permanent ones, and the
standard variables for compression and headers."""

from __future__ import annotations

import gzip
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from onwards_trio import Gateway, parse_config
from onwards_trio._transport.server import serve
from tests.support import FakeUpstream, serve_app

CHAT = "/v1/chat/completions"


pytestmark = pytest.mark.usefixtures("fast_otel_export")


class Collector:
    """Answers export POSTs with the scripted statuses (then 200), keeping what arrived."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[dict[bytes, bytes], bytes]] = []
        self.url = ""
        self._arrived = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append((dict(scope["headers"]), body))
        self._arrived.set()
        self._arrived = trio.Event()
        status = self.statuses.pop(0) if self.statuses else 200
        headers = [(b"content-length", b"0")]
        if status == 503:
            headers.append((b"retry-after", b"0"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while len(self.received) < count:
                await self._arrived.wait()

    def span_ids(self, index: int) -> set[str]:
        headers, body = self.received[index]
        if headers.get(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        return {
            s.span_id.hex()
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        }


@asynccontextmanager
async def collector(*statuses: int) -> AsyncIterator[Collector]:
    app = Collector(*statuses)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, "127.0.0.1", 0)
        app.url = binds[0]
        yield app
        nursery.cancel_scope.cancel()


async def _request(nursery: trio.Nursery, endpoint: str) -> httpx.AsyncClient:
    targets = {"gpt": {"url": await serve_app(nursery, FakeUpstream())}}
    config = {"targets": targets, "telemetry": {"endpoint": endpoint}}
    info = await nursery.start(Gateway(parse_config(config)).serve, "127.0.0.1", 0)
    return httpx.AsyncClient(base_url=info.url, timeout=10)


def _chat() -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_batch_refused_with_503_is_sent_again(nursery: trio.Nursery) -> None:
    async with collector(503) as app:
        async with await _request(nursery, app.url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        await app.wait_for(2)
    assert app.received[1][1] == app.received[0][1]
    assert app.span_ids(1)


async def test_a_batch_refused_with_400_is_dropped_not_sent_again(nursery: trio.Nursery) -> None:
    async with collector(400) as app, await _request(nursery, app.url) as client:
        assert (await client.post(CHAT, json=_chat())).status_code == 200
        await app.wait_for(1)
        assert (await client.post(CHAT, json=_chat())).status_code == 200
        await app.wait_for(2)
    # The second export holds none of the first one's spans.
    assert app.span_ids(0) and app.span_ids(0).isdisjoint(app.span_ids(1))


async def test_compression_and_headers_come_from_the_standard_variables(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=acme,x-note=a%20b")
    async with collector() as app:
        async with await _request(nursery, app.url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        await app.wait_for(1)
    headers, _ = app.received[0]
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"content-type"] == b"application/x-protobuf"
    assert (headers[b"x-tenant"], headers[b"x-note"]) == (b"acme", b"a b")
    assert app.span_ids(0)


async def test_a_failed_export_is_logged_without_the_urls_credentials(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async with collector(400) as app:
        endpoint = app.url.replace("http://", "http://user:s3cret@") + "?token=s3cret"
        with caplog.at_level(logging.WARNING, "onwards_trio.telemetry"):
            async with await _request(nursery, endpoint) as client:
                assert (await client.post(CHAT, json=_chat())).status_code == 200
            await app.wait_for(1)
            with trio.fail_after(10):
                while "span export" not in caplog.text:
                    await trio.sleep(0.01)
    assert "status 400" in caplog.text and "s3cret" not in caplog.text
