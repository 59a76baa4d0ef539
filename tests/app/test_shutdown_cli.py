"""SIGTERM to the ``onwards-trio`` process: a stream in flight finishes, then the process exits."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import orjson
import pytest
import trio

from tests.support import FakeUpstream, Reply, cli_gateway, serve_app, sse

pytestmark = [pytest.mark.slow]


async def test_sigterm_lets_a_stream_in_flight_finish(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    chunks = sse(*({"n": i} for i in range(8)))
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.1)
    )
    config = tmp_path / "config.json"
    config.write_bytes(orjson.dumps({"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}))
    async with cli_gateway(config) as gateway:
        request = {"model": "gpt-4", "messages": [], "stream": True}
        client = httpx.AsyncClient(base_url=gateway.url, timeout=10)
        async with client, client.stream("POST", "/v1/chat/completions", json=request) as r:
            stream = r.aiter_bytes()
            received = await anext(stream)
            gateway.process.send_signal(signal.SIGTERM)
            async for chunk in stream:
                received += chunk
        with trio.fail_after(15):
            code = await gateway.process.wait()
    assert received == b"".join(chunks)
    assert code == 0
