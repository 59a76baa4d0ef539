"""``telemetry.stream_usage`` asks a streaming upstream for its usage chunk; the client, who did
not ask, gets its stream as the upstream would have sent it. That holds even when nothing in
the gateway reads the usage (no metrics, tracing, access log, ledger or limits), where the
pipeline could otherwise relay the body untouched."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from tests.support import FakeUpstream, Recorded, Reply, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"
KEY = "sk-stream-usage-test-key-71d2"


def _stream(with_usage: bool) -> Reply:
    chunks: list[object] = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "hel"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}]},
    ]
    if with_usage:
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        chunks.append({"id": "c", "choices": [], "usage": usage})
    return Reply(headers=[(b"content-type", b"text/event-stream")], chunks=sse(*chunks))


async def test_a_stream_keeps_no_usage_chunk_when_nothing_reads_usage(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="onwards_trio.access")  # no access lines

    def script(rec: Recorded) -> Reply:
        return _stream(rec.json().get("stream_options", {}).get("include_usage") is True)

    upstream = FakeUpstream(script)
    _, url = await start_gateway(
        nursery,
        {
            "auth": {"key_definitions": {"team-a": {"key": KEY}}},
            "targets": {"gpt": {"url": await serve_app(nursery, upstream)}},
            "telemetry": {"stream_usage": True},
        },
    )
    async with httpx.AsyncClient(
        base_url=url, timeout=10, headers={"authorization": f"Bearer {KEY}"}
    ) as client:
        r = await client.post(CHAT, json={"model": "gpt", "messages": [], "stream": True})
    assert upstream.requests[0].json()["stream_options"] == {"include_usage": True}
    assert r.text == b"".join(_stream(False).chunks or []).decode()
