"""A failed upstream attempt's client span is an error that says why: the status for a 5xx
(500 included, and on the server span that relays it), ``network_error`` for a provider that
cannot be reached, which the next attempt's span gives as its retry reason. After a failover,
each attempt's span lies within the request's, in order, and the request's span names the
provider that answered."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import ReceivedSpan, otlp_receiver
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


async def _nobody() -> str:
    """The URL of a port nobody listens on."""
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def _failover(
    nursery: trio.Nursery, *urls: str
) -> tuple[ReceivedSpan, list[ReceivedSpan], str]:
    """One request to a pool of providers at ``urls`` (in priority order) and then one that
    answers: its server span, its attempts' spans in order, and the answering one's URL."""
    working = await serve_app(nursery, FakeUpstream(Reply(body=chat_completion("hi"))))
    async with otlp_receiver() as receiver:
        providers = [{"url": u} for u in (*urls, working)]
        targets = {
            "gpt": {"strategy": "priority", "fallback": {"enabled": True}, "providers": providers}
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    attempts = sorted(server.children(spans), key=lambda s: s.attributes["onwards.attempt"])
    return server, attempts, working


async def test_an_unreachable_provider_is_a_network_error_then_the_retry_reason(
    nursery: trio.Nursery,
) -> None:
    _, (first, second), _ = await _failover(nursery, await _nobody())
    assert first.error and first.attributes["error.type"] == "network_error"
    assert "http.response.status_code" not in first.attributes
    assert second.attributes["onwards.retry_reason"] == "network_error"
    assert not second.error and "error.type" not in second.attributes


async def test_the_request_span_names_the_provider_that_answered(nursery: trio.Nursery) -> None:
    server, _, _ = await _failover(nursery, await _nobody())
    assert server.attributes["onwards.provider"] == 1
    assert server.attributes["onwards.attempts"] == 2


async def test_an_attempts_server_port_is_the_urls_or_its_schemes_default(
    nursery: trio.Nursery,
) -> None:
    # Nobody listens on 443 or 80 here: a network error each, then the next provider.
    _, attempts, working = await _failover(nursery, "https://127.0.0.1", "http://127.0.0.1")
    port = int(working.rsplit(":", 1)[1])
    assert [(a.attributes["server.address"], a.attributes["server.port"]) for a in attempts] == [
        ("127.0.0.1", 443),
        ("127.0.0.1", 80),
        ("127.0.0.1", port),
    ]


async def test_each_attempt_span_lies_within_its_request_span_in_order(
    nursery: trio.Nursery,
) -> None:
    server, (first, second), _ = await _failover(nursery, await _nobody())
    times = [server.start, first.start, first.end, second.start, second.end, server.end]
    assert times == sorted(times) and server.start > 0
