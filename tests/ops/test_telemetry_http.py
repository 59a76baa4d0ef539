"""Traces through a real gateway, exported over OTLP/HTTP to a real receiver on loopback.

The receiver decodes what the OpenTelemetry exporter sends (``tests/ops/otlp_receiver.py``);
each test reads the span tree it got back.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.ops.otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver
from tests.support import FakeUpstream, Recorded, Reply, chat_completion, serve_app, sse

CHAT = "/v1/chat/completions"
KEY = "sk-client-key-5e1f0c3a9b"
UPSTREAM_KEY = "sk-upstream-key-8d2c4b6e1f"
PROMPT = "the-prompt-text-no-span-may-hold"
COMPLETION = "the-completion-text-no-span-may-hold"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


pytestmark = pytest.mark.usefixtures("fast_otel_export")


def _config(receiver_url: str, targets: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "auth": {"key_definitions": {"team-a": {"key": KEY}}},
        "targets": targets,
        "telemetry": {"endpoint": receiver_url, **extra.pop("telemetry", {})},
        **extra,
    }


async def _gateway(nursery: trio.Nursery, config: dict[str, Any]) -> tuple[Gateway, str]:
    gateway = Gateway(parse_config(config))
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    return gateway, info.url


def _client(url: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=10, headers={"authorization": f"Bearer {KEY}", **headers}
    )


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt", "messages": [{"role": "user", "content": PROMPT}], **extra}


def _tree(spans: list[ReceivedSpan], root: ReceivedSpan, depth: int = 0) -> list[str]:
    """The spans under ``root`` as indented names, children in start order."""
    out = ["  " * depth + root.name]
    for child in sorted(root.children(spans), key=lambda s: s.start):
        out += _tree(spans, child, depth + 1)
    return out


def _only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def _assert_no_secret(spans: list[ReceivedSpan]) -> None:
    text = orjson.dumps([s.attributes for s in spans], default=str).decode()
    for secret in (KEY, UPSTREAM_KEY, PROMPT, COMPLETION, "Bearer"):
        assert secret not in text


async def _wait(receiver: OTLPReceiver, count: int, name: str | None = None) -> list[ReceivedSpan]:
    with trio.fail_after(10):
        return await receiver.wait_for(count, name)


# -- the proxy -------------------------------------------------------------------------------------


async def test_failover_is_one_server_span_with_a_client_span_per_attempt(
    nursery: trio.Nursery,
) -> None:
    failing = FakeUpstream(Reply(status=503, body=b'{"error": "busy"}'))
    working = FakeUpstream(Reply(body=chat_completion(COMPLETION, model="up-model")))
    async with otlp_receiver() as receiver:
        targets = {
            "gpt": {
                "strategy": "priority",
                "fallback": {"enabled": True, "on_status": [503]},
                "providers": [
                    {"url": await serve_app(nursery, failing), "onwards_key": UPSTREAM_KEY},
                    {"url": await serve_app(nursery, working), "onwards_key": UPSTREAM_KEY},
                ],
            }
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            r = await client.post(CHAT, json=_chat())
        assert r.status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    assert server.kind == "server" and server.parent_span_id == ""
    assert _tree(spans, server) == [
        "POST /v1/chat/completions",
        "  chat gpt",
        "  chat gpt",
    ]
    first, second = sorted(server.children(spans), key=lambda s: s.attributes["onwards.attempt"])
    assert first.kind == second.kind == "client"
    assert first.attributes["http.response.status_code"] == 503 and first.error
    assert first.attributes["onwards.provider"] == 0
    assert "onwards.retry_reason" not in first.attributes
    assert second.attributes["onwards.provider"] == 1
    assert second.attributes["onwards.retry_reason"] == "status"
    assert second.attributes["http.response.status_code"] == 200 and not second.error
    assert second.attributes["gen_ai.usage.input_tokens"] == 1
    assert server.attributes["http.route"] == CHAT
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["onwards.alias"] == "gpt"
    assert server.attributes["onwards.key_label"] == "team-a"
    assert server.attributes["onwards.attempts"] == 2
    _assert_no_secret(spans)


async def test_streamed_request_has_time_to_first_chunk_and_usage(nursery: trio.Nursery) -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": COMPLETION}}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}},
    ]
    upstream = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=sse(*chunks))
    )
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url) as client:
            r = await client.post(CHAT, json=_chat(stream=True))
        assert COMPLETION in r.text
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    assert _tree(spans, server) == ["POST /v1/chat/completions", "  chat gpt"]
    (attempt,) = server.children(spans)
    assert 0 < attempt.attributes["gen_ai.response.time_to_first_chunk"] < 10
    assert attempt.attributes["gen_ai.usage.input_tokens"] == 11
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 4
    assert server.attributes["gen_ai.usage.output_tokens"] == 4
    _assert_no_secret(spans)


# -- trace context ---------------------------------------------------------------------------------


async def test_incoming_traceparent_continues_the_callers_trace(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream()
    async with otlp_receiver() as receiver:
        targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url, traceparent=TRACEPARENT) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    assert (server.trace_id, server.parent_span_id) == (TRACE_ID, PARENT_ID)


async def test_traceparent_goes_only_to_providers_that_opted_in(nursery: trio.Nursery) -> None:
    opted, other = FakeUpstream(), FakeUpstream()
    async with otlp_receiver() as receiver:
        targets = {
            "opted": {"url": await serve_app(nursery, opted), "propagate_trace_context": True},
            "other": {"url": await serve_app(nursery, other)},
        }
        _, url = await _gateway(nursery, _config(receiver.url, targets))
        async with _client(url, traceparent=TRACEPARENT, tracestate="k=v") as client:
            for alias in ("opted", "other"):
                assert (await client.post(CHAT, json=_chat(model=alias))).status_code == 200
        spans = await _wait(receiver, 2, "POST /v1/chat/completions")
    (sent,) = opted.requests
    _, trace_id, parent_id, _ = sent.headers["traceparent"].split("-")
    attempt = _only(spans, "chat opted")
    assert (trace_id, parent_id) == (TRACE_ID, attempt.span_id)
    assert sent.headers["tracestate"] == "k=v"
    (not_sent,) = other.requests
    assert "traceparent" not in not_sent.headers and "tracestate" not in not_sent.headers


# -- the loop --------------------------------------------------------------------------------------


def _usage(p: int, c: int) -> dict[str, int]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _completion(message: dict[str, Any], usage: dict[str, int]) -> Reply:
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }
    return Reply(body=orjson.dumps(body))


def _calls(*calls: tuple[str, str, str]) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in calls
        ],
    }


def _loop_script(rec: Recorded) -> Reply:
    """``m`` asks for the ``lookup`` tool and the ``helper`` sub-agent (on ``small``) at once,
    then answers; ``small`` answers at once."""
    body = rec.json()
    if body["model"] == "small":
        return _completion({"role": "assistant", "content": "helped"}, _usage(2, 1))
    if any(m.get("role") == "tool" for m in body["messages"]):
        return _completion({"role": "assistant", "content": COMPLETION}, _usage(20, 5))
    calls = _calls(("call_l", "lookup", '{"q": "x"}'), ("call_h", "helper", '{"input": "y"}'))
    return _completion(calls, _usage(10, 3))


async def _loop_gateway(
    nursery: trio.Nursery, receiver: OTLPReceiver, upstream: FakeUpstream, **telemetry: Any
) -> str:
    tool = FakeUpstream(Reply(body=b'{"answer": 42}'))
    url = await serve_app(nursery, upstream)
    targets = {
        "m": {"url": url + "/v1", "open_responses": {"adapter": True}},
        "small": {"url": url + "/v1"},
    }
    config = _config(
        receiver.url,
        targets,
        store={"kind": "memory"},
        tools={
            "lookup": {"url": await serve_app(nursery, tool)},
            "helper": {"kind": "agent", "model": "small"},
        },
        telemetry=telemetry,
    )
    _, gw_url = await _gateway(nursery, config)
    return gw_url


async def _responses_create(url: str, **params: Any) -> Any:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=15, max_retries=0)
    try:
        with trio.fail_after(20):
            return await trio.to_thread.run_sync(lambda: client.responses.create(**params))
    finally:
        client.close()


async def test_responses_loop_spans_nest_as_the_steps_do(nursery: trio.Nursery) -> None:
    async with otlp_receiver() as receiver:
        url = await _loop_gateway(nursery, receiver, FakeUpstream(_loop_script))
        resp = await _responses_create(url, model="m", input=PROMPT)
        assert resp.output_text == COMPLETION
        spans = await _wait(receiver, 1, "POST /v1/responses")
    server = _only(spans, "POST /v1/responses")
    (response,) = server.children(spans)
    steps = response.children(spans)
    assert sorted(s.name for s in steps) == [
        "chat m",
        "chat m",
        "execute_tool helper",
        "execute_tool lookup",
    ]
    for step in steps:
        if step.name == "chat m":  # the step, then its upstream attempt
            assert _tree(spans, step) == ["chat m", "  chat m"]
            assert step.attributes["onwards.step.kind"] == "model_call"
            assert [c.kind for c in step.children(spans)] == ["client"]
    lookup = _only(spans, "execute_tool lookup")
    assert _tree(spans, lookup) == ["execute_tool lookup"]
    helper = _only(spans, "execute_tool helper")
    assert _tree(spans, helper) == [
        "execute_tool helper",
        "  invoke_agent small",
        "    chat small",
        "      chat small",
    ]
    assert lookup.attributes["gen_ai.tool.call.id"] == "call_l"
    assert lookup.attributes["onwards.step.outcome"] == "completed"
    assert response.attributes["gen_ai.conversation.id"] == resp.id
    assert response.attributes["gen_ai.usage.input_tokens"] == 30  # 10 + 20, not the helper's
    assert server.attributes["gen_ai.usage.input_tokens"] == 32  # every model call it made
    assert "gen_ai.tool.call.arguments" not in lookup.attributes
    _assert_no_secret(spans)


async def test_record_content_puts_tool_arguments_on_spans(nursery: trio.Nursery) -> None:
    async with otlp_receiver() as receiver:
        url = await _loop_gateway(
            nursery, receiver, FakeUpstream(_loop_script), record_content=True
        )
        await _responses_create(url, model="m", input=PROMPT)
        spans = await _wait(receiver, 1, "POST /v1/responses")
    lookup = _only(spans, "execute_tool lookup")
    assert lookup.attributes["gen_ai.tool.call.arguments"] == '{"q": "x"}'
    assert lookup.attributes["gen_ai.tool.call.result"] == '{"answer":42}'
    assert any(PROMPT in str(s.attributes.get("gen_ai.input.messages")) for s in spans)


async def test_background_response_is_a_trace_linked_to_its_request(
    nursery: trio.Nursery,
) -> None:
    async with otlp_receiver() as receiver:
        url = await _loop_gateway(nursery, receiver, FakeUpstream(_loop_script))
        await _responses_create(url, model="m", input="x", background=True)
        spans = await _wait(receiver, 1, "invoke_agent m")
        await _wait(receiver, 1, "POST /v1/responses")
    request = _only(spans, "POST /v1/responses")
    response = _only(spans, "invoke_agent m")
    assert response.parent_span_id == "" and response.trace_id != request.trace_id
    assert response.links == [(request.trace_id, request.span_id)]


# -- a collector that does not keep up -------------------------------------------------------------


@pytest.mark.parametrize("collector", ["down", "slow"])
async def test_a_collector_that_is_down_or_slow_costs_requests_nothing(
    nursery: trio.Nursery, collector: str
) -> None:
    upstream = FakeUpstream()
    targets = {"gpt": {"url": await serve_app(nursery, upstream)}}
    async with otlp_receiver("slow") as slow:
        if collector == "slow":
            endpoint = slow.url
        else:
            with trio.socket.socket() as s:  # a port nobody listens on
                await s.bind(("127.0.0.1", 0))
                endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
        # Far longer than the test may take: an export that held the event loop would show.
        config = _config(endpoint, targets, telemetry={"export_timeout_secs": 60})
        async with trio.open_nursery() as inner:
            _, url = await _gateway(inner, config)
            async with _client(url) as client:
                assert (await client.post(CHAT, json=_chat())).status_code == 200
                if collector == "slow":
                    with trio.fail_after(10):
                        while not slow.requests:  # an export is now stuck on the collector
                            await trio.sleep(0.01)
                with trio.fail_after(10):
                    for _ in range(20):
                        assert (await client.post(CHAT, json=_chat())).status_code == 200
            stopping = trio.current_time()
            inner.cancel_scope.cancel()
        # Stopping does not wait for the collector either (the last flush is bounded).
        assert trio.current_time() - stopping < 10
    assert len(upstream.requests) == 21


# -- off -------------------------------------------------------------------------------------------


def test_without_an_endpoint_the_sdk_is_never_imported() -> None:
    code = (
        "import sys\n"
        "from onwards_trio import Gateway, parse_config\n"
        "gateway = Gateway(parse_config({'targets': {'a': {'url': 'http://127.0.0.1:1'}}}))\n"
        "assert gateway.telemetry is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {"PATH": "", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, check=True)
    assert out.stdout.strip() == b"[]"


async def test_standard_variables_configure_the_exporter(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = FakeUpstream()
    async with otlp_receiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)  # a base URL
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
        config = {"targets": {"gpt": {"url": await serve_app(nursery, upstream)}}}
        _, url = await _gateway(nursery, config)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post(CHAT, json=_chat())).status_code == 200
        spans = await _wait(receiver, 1, "POST /v1/chat/completions")
    server = _only(spans, "POST /v1/chat/completions")
    assert server.service == "gateway-under-test"
    assert server.attributes["onwards.key_label"] == "none"
