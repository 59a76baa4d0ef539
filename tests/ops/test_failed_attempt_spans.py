"""A failed upstream attempt's client span is an error that says why: the status for a 5xx
(500 included, and on the server span that relays it), ``network_error`` for a provider that
cannot be reached, which the next attempt's span gives as its retry reason."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_telemetry_http import CHAT, _chat, _client, _config, _gateway, _only, _wait
from tests.support import FakeUpstream, Reply, chat_completion, serve_app

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


async def test_an_unreachable_provider_is_a_network_error_then_the_retry_reason(
    nursery: trio.Nursery,
) -> None:
    working = FakeUpstream(Reply(body=chat_completion("hi")))
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with otlp_receiver() as receiver:
        targets = {
            "gpt": {
                "strategy": "priority",
                "fallback": {"enabled": True},
                "providers": [{"url": nobody}, {"url": await serve_app(nursery, working)}],
            }
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    first, second = sorted(server.children(spans), key=lambda s: s.attributes["onwards.attempt"])
    assert first.error and first.attributes["error.type"] == "network_error"
    assert "http.response.status_code" not in first.attributes
    assert second.attributes["onwards.retry_reason"] == "network_error"
    assert not second.error and "error.type" not in second.attributes


async def test_an_attempts_server_port_is_the_urls_or_its_schemes_default(
    nursery: trio.Nursery,
) -> None:
    working = FakeUpstream(Reply(body=chat_completion("hi")))
    port = int((working_url := await serve_app(nursery, working)).rsplit(":", 1)[1])
    async with otlp_receiver() as receiver:
        providers = [
            {"url": "https://127.0.0.1"},
            {"url": "http://127.0.0.1"},
            {"url": working_url},
        ]
        targets = {
            "gpt": {"strategy": "priority", "fallback": {"enabled": True}, "providers": providers}
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    attempts = sorted(server.children(spans), key=lambda s: s.attributes["onwards.attempt"])
    assert [(a.attributes["server.address"], a.attributes["server.port"]) for a in attempts] == [
        ("127.0.0.1", 443),  # nobody listens there: a network error, then the next provider
        ("127.0.0.1", 80),
        ("127.0.0.1", port),
    ]


async def test_each_attempt_span_lies_within_its_request_span_in_order(
    nursery: trio.Nursery,
) -> None:
    working = FakeUpstream(Reply(body=chat_completion("hi")))
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with otlp_receiver() as receiver:
        providers = [{"url": nobody}, {"url": await serve_app(nursery, working)}]
        targets = {
            "gpt": {"strategy": "priority", "fallback": {"enabled": True}, "providers": providers}
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    first, second = sorted(server.children(spans), key=lambda s: s.attributes["onwards.attempt"])
    times = [server.start, first.start, first.end, second.start, second.end, server.end]
    assert times == sorted(times) and server.start > 0
