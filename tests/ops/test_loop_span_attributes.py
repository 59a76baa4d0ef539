"""The attributes of a Responses loop's spans, whole: a response run (``invoke_agent``), its
model and tool steps and a sub-agent's run, with ``record_content`` off (no prompt, no tool
arguments or results) and on (the content, cut at 16 KiB); nested agents' depths.

Each test but the last kills mutants of ``_ops/tracing.py``'s attribute functions that
survived the rest of the suite (docs/testing-quality.md); the last holds a config agent's
depth, which its loop once reported as 0."""

from __future__ import annotations

import contextlib
from typing import Any

import openai
import orjson
import pytest
import trio

from tests.ops.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.ops.test_telemetry_http import (
    COMPLETION,
    PROMPT,
    _calls,
    _completion,
    _config,
    _gateway,
    _loop_gateway,
    _loop_script,
    _only,
    _responses_create,
    _usage,
    _wait,
)
from tests.support import FakeUpstream, Recorded, Reply, serve_app

LIMIT = 16 * 1024  # what one content attribute holds

pytestmark = pytest.mark.usefixtures("fast_otel_export")


async def _spans(nursery: trio.Nursery, **telemetry: Any) -> tuple[str, list[ReceivedSpan]]:
    async with otlp_receiver() as receiver:
        url = await _loop_gateway(nursery, receiver, FakeUpstream(_loop_script), **telemetry)
        resp = await _responses_create(url, model="m", input=PROMPT)
        spans = await _wait(receiver, 1, "POST /v1/responses")
    return resp.id, spans


def _without(attributes: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if k not in names}


async def test_a_loops_spans_carry_exactly_their_attributes(nursery: trio.Nursery) -> None:
    response_id, spans = await _spans(nursery)
    assert _only(spans, "POST /v1/responses").attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/responses",
        "http.response.status_code": 200,
        "onwards.alias": "m",
        "gen_ai.request.model": "m",
        "onwards.key_label": "team-a",
        "gen_ai.usage.input_tokens": 32,
        "gen_ai.usage.output_tokens": 9,
    }
    assert _only(spans, "invoke_agent m").attributes == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.conversation.id": response_id,
        "onwards.depth": 0,
        "gen_ai.request.model": "m",
        "onwards.response.status": "completed",
        "gen_ai.usage.input_tokens": 30,
        "gen_ai.usage.output_tokens": 8,
    }
    helper = _only(spans, "invoke_agent small").attributes
    assert _without(helper, "gen_ai.conversation.id") == {
        "gen_ai.operation.name": "invoke_agent",
        "onwards.depth": 1,
        "gen_ai.request.model": "small",
        "onwards.response.status": "completed",
        "gen_ai.usage.input_tokens": 2,
        "gen_ai.usage.output_tokens": 1,
    }
    assert _without(_only(spans, "execute_tool lookup").attributes, "onwards.step.id") == {
        "onwards.step.kind": "tool_call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "lookup",
        "gen_ai.tool.call.id": "call_l",
        "onwards.step.outcome": "completed",
    }
    steps = [s for s in spans if s.name == "chat m" and s.kind == "internal"]
    assert sorted(
        (_without(s.attributes, "onwards.step.id") for s in steps),
        key=lambda a: a["gen_ai.usage.input_tokens"],
    ) == [
        {
            "onwards.step.kind": "model_call",
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "m",
            "onwards.step.outcome": "completed",
            "gen_ai.usage.input_tokens": tokens,
            "gen_ai.usage.output_tokens": out,
            "gen_ai.response.model": "up",
        }
        for tokens, out in ((10, 3), (20, 5))
    ]
    (attempt,) = [s for s in spans if s.name == "chat small" and s.kind == "client"]
    assert isinstance(attempt.attributes["gen_ai.response.time_to_first_chunk"], float)
    assert isinstance(attempt.attributes["server.port"], int)
    assert _without(attempt.attributes, "gen_ai.response.time_to_first_chunk", "server.port") == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "small",
        "server.address": "127.0.0.1",
        "onwards.provider": 0,
        "onwards.attempt": 1,
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": 2,
        "gen_ai.usage.output_tokens": 1,
    }


def _two_tools(rec: Recorded) -> Reply:
    """Call ``exact`` and ``over`` at once, then answer."""
    if any(m.get("role") == "tool" for m in rec.json()["messages"]):
        return _completion({"role": "assistant", "content": COMPLETION}, _usage(2, 1))
    return _completion(_calls(("call_e", "exact", "{}"), ("call_o", "over", "{}")), _usage(1, 1))


def _tool_answering(length: int) -> FakeUpstream:
    """A tool whose result, as a span records it (compact JSON), is ``length`` characters."""
    return FakeUpstream(Reply(body=orjson.dumps({"a": "x" * (length - 8)})))


async def test_recorded_content_is_cut_past_16_kib(nursery: trio.Nursery) -> None:
    async with otlp_receiver() as receiver:
        config = _config(
            receiver.url,
            {
                "m": {
                    "url": await serve_app(nursery, FakeUpstream(_two_tools)) + "/v1",
                    "open_responses": {"adapter": True},
                }
            },
            store={"kind": "memory"},
            tools={
                "exact": {"url": await serve_app(nursery, _tool_answering(LIMIT))},
                "over": {"url": await serve_app(nursery, _tool_answering(LIMIT + 1))},
            },
            telemetry={"record_content": True},
        )
        _, url = await _gateway(nursery, config)
        await _responses_create(url, model="m", input=PROMPT)
        spans = await _wait(receiver, 1, "POST /v1/responses")
    exact = _only(spans, "execute_tool exact").attributes["gen_ai.tool.call.result"]
    over = _only(spans, "execute_tool over").attributes["gen_ai.tool.call.result"]
    assert exact == orjson.dumps({"a": "x" * (LIMIT - 8)}).decode()
    assert over == orjson.dumps({"a": "x" * (LIMIT - 7)}).decode()[:LIMIT] + "..."


async def test_a_failed_response_run_is_an_error_span_with_its_type(
    nursery: trio.Nursery,
) -> None:
    failing = FakeUpstream(Reply(status=500, body=b'{"error": "down"}'))
    async with otlp_receiver() as receiver:
        config = _config(
            receiver.url,
            {
                "m": {
                    "url": await serve_app(nursery, failing) + "/v1",
                    "open_responses": {"adapter": True},
                }
            },
            store={"kind": "memory"},
        )
        _, url = await _gateway(nursery, config)
        with contextlib.suppress(openai.APIError):
            await _responses_create(url, model="m", input=PROMPT)
        spans = await _wait(receiver, 1, "POST /v1/responses")
    run = _only(spans, "invoke_agent m")
    assert run.error
    assert run.attributes["onwards.response.status"] == "failed"
    assert run.attributes["error.type"] == "failed"  # the LoopError's kind


async def test_a_model_steps_recorded_output_is_its_answer(nursery: trio.Nursery) -> None:
    _, spans = await _spans(nursery, record_content=True)
    steps = [s for s in spans if s.name == "chat m" and s.kind == "internal"]
    (last,) = [s for s in steps if s.attributes["gen_ai.usage.input_tokens"] == 20]
    assert "gen_ai.tool.call.result" not in last.attributes
    answer = orjson.loads(last.attributes["gen_ai.output.messages"])
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": COMPLETION}


def _nested(rec: Recorded) -> Reply:
    """``m`` calls the agent tool ``helper`` (on ``small``), which calls ``deeper`` (on
    ``tiny``); each answers once its tool's output is in."""
    body = rec.json()
    tool = {"m": "helper", "small": "deeper"}.get(body["model"])
    if tool is None or any(m.get("role") == "tool" for m in body["messages"]):
        return _completion({"role": "assistant", "content": "done"}, _usage(1, 1))
    return _completion(_calls((f"call_{tool}", tool, '{"input": "y"}')), _usage(1, 1))


async def test_a_config_agents_run_reports_its_nesting_depth(nursery: trio.Nursery) -> None:
    # A config agent's run is a loop of its own response: its depth is not its scope's.
    async with otlp_receiver() as receiver:
        url = await serve_app(nursery, FakeUpstream(_nested)) + "/v1"
        config = _config(
            receiver.url,
            {
                "m": {"url": url, "open_responses": {"adapter": True}},
                "small": {"url": url},
                "tiny": {"url": url},
            },
            store={"kind": "memory"},
            tools={
                "helper": {"kind": "agent", "model": "small"},
                "deeper": {"kind": "agent", "model": "tiny"},
            },
        )
        _, gateway_url = await _gateway(nursery, config)
        await _responses_create(gateway_url, model="m", input=PROMPT)
        spans = await _wait(receiver, 1, "POST /v1/responses")
    depths = {
        name: _only(spans, f"invoke_agent {name}").attributes["onwards.depth"]
        for name in ("m", "small", "tiny")
    }
    assert depths == {"m": 0, "small": 1, "tiny": 2}
