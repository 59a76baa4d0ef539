"""What a request span keeps of the strings a client chooses. The alias asked for is recorded,
configured or not, so it is cut at 128 characters (with ``...``) rather than kept as sent,
the way recorded content is cut at 16 KiB. A path that is not one of the gateway's own
routes (proxied as it is) is not recorded at all: its route is ``other`` and the span is named
by the method alone. A caller's ``tracestate`` is kept, as W3C Trace Context asks, on the
request's span and its upstream attempt's."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.ops.test_telemetry_http import (
    CHAT,
    TRACEPARENT,
    _chat,
    _client,
    _config,
    _gateway,
    _only,
    _wait,
)
from tests.support import FakeUpstream, Reply, chat_completion, serve_app

LIMIT = 128  # what the span keeps of an alias

pytestmark = pytest.mark.usefixtures("fast_otel_export")


async def _server_spans(nursery: trio.Nursery, *aliases: str) -> list[ReceivedSpan]:
    """One request per alias, none of them configured (each answered 404), and their spans."""
    upstream = FakeUpstream(Reply(body=chat_completion("hi")))
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            for alias in aliases:
                r = await client.post(CHAT, json=_chat(model=alias))
                assert r.status_code == 404
        spans = await _wait(receiver, len(aliases))
    return sorted(spans, key=lambda s: s.start)


async def test_an_alias_over_128_characters_is_cut_in_the_span(nursery: trio.Nursery) -> None:
    exact, over = "a" * LIMIT, "b" * (LIMIT + 1)
    first, second = await _server_spans(nursery, exact, over)
    assert first.attributes["onwards.alias"] == exact
    assert first.attributes["gen_ai.request.model"] == exact
    assert second.attributes["onwards.alias"] == "b" * LIMIT + "..."
    assert second.attributes["gen_ai.request.model"] == "b" * LIMIT + "..."


async def test_a_path_not_served_is_not_recorded(nursery: trio.Nursery) -> None:
    path = "/v1/a-path-no-span-may-hold"
    upstream = FakeUpstream(Reply(body=chat_completion("hi")))
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            await client.post(path, json=_chat())  # proxied as it is
        spans = await _wait(receiver, 1)
    assert _only(spans, "POST").attributes["http.route"] == "other"
    assert "a-path-no-span-may-hold" not in repr(spans)


async def test_a_callers_tracestate_is_kept_on_the_request_and_attempt_spans(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion("hi")))
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url, traceparent=TRACEPARENT, tracestate="k=v") as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    (attempt,) = server.children(spans)
    assert (server.trace_state, attempt.trace_state) == ("k=v", "k=v")
