"""An upstream that answers 500 marks its attempt's client span, and the request's server span
that relays it, as errors of type ``500``: the boundary status of a server error."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_telemetry_http import CHAT, _chat, _client, _config, _gateway, _only, _wait
from tests.support import FakeUpstream, Reply, serve_app

pytestmark = pytest.mark.usefixtures("fast_otel_export")


async def test_an_upstream_500_is_an_error_on_both_spans(nursery: trio.Nursery) -> None:
    failing = FakeUpstream(Reply(status=500, body=b'{"error": "broken"}'))
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, failing)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            r = await client.post(CHAT, json=_chat())
        assert r.status_code == 500
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    (attempt,) = server.children(spans)
    assert attempt.error and attempt.attributes["error.type"] == "500"
    assert attempt.attributes["http.response.status_code"] == 500
    assert server.error and server.attributes["error.type"] == "500"
