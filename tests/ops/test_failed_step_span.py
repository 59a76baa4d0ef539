"""A loop step that fails is a span marked failed: a tool whose server answers 500 ends its
``execute_tool`` span with outcome ``failed`` as its error type, while the response goes on
(the model gets the tool's error and answers).

It kills ``_Run._run_step`` 33/34 (a failed step's outcome misspelt), which no other test
read (docs/testing-quality.md)."""

from __future__ import annotations

import pytest
import trio

from tests.ops.otlp_receiver import otlp_receiver
from tests.ops.test_telemetry_http import (
    COMPLETION,
    PROMPT,
    _calls,
    _completion,
    _config,
    _gateway,
    _only,
    _responses_create,
    _usage,
    _wait,
)
from tests.support import FakeUpstream, Recorded, Reply, serve_app

pytestmark = pytest.mark.usefixtures("fast_otel_export")


def _script(rec: Recorded) -> Reply:
    """Ask for the ``lookup`` tool, then answer once its (failed) output is in."""
    if any(m.get("role") == "tool" for m in rec.json()["messages"]):
        return _completion({"role": "assistant", "content": COMPLETION}, _usage(20, 5))
    return _completion(_calls(("call_l", "lookup", '{"q": "x"}')), _usage(10, 3))


async def test_a_failed_tool_step_is_a_failed_span(nursery: trio.Nursery) -> None:
    broken_tool = FakeUpstream(Reply(status=500, body=b'{"error": "down"}'))
    async with otlp_receiver() as receiver:
        model_url = await serve_app(nursery, FakeUpstream(_script))
        config = _config(
            receiver.url,
            {"m": {"url": model_url + "/v1", "open_responses": {"adapter": True}}},
            store={"kind": "memory"},
            tools={"lookup": {"url": await serve_app(nursery, broken_tool)}},
        )
        _, url = await _gateway(nursery, config)
        resp = await _responses_create(url, model="m", input=PROMPT)
        assert resp.output_text == COMPLETION
        spans = await _wait(receiver, 1, "POST /v1/responses")
    lookup = _only(spans, "execute_tool lookup")
    assert lookup.attributes["onwards.step.outcome"] == "failed"
    assert lookup.attributes["error.type"] == "failed"
    assert lookup.error
