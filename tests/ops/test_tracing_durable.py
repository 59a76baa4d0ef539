"""Spans of background responses that another gateway process recovered (``_responses/durable``).

A gateway (the CLI, a real process) is killed in the middle of a background response; a new one
on the same SQLite file resumes it. The resumed loop's span is a new trace, linked to the
request that created the response when that request was traced, a root without a link when not.
"""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest
import trio

from tests.ops.otlp_receiver import OTLPReceiver, ReceivedSpan, otlp_receiver
from tests.responses.gateway_process import GatewayProcess, ToolServer, agent_upstream
from tests.responses.test_durable import servers, start_background
from tests.support import FakeUpstream

pytestmark = pytest.mark.usefixtures("fast_otel_export")


async def _spans(receiver: OTLPReceiver, name: str) -> list[ReceivedSpan]:
    with trio.fail_after(30):
        await receiver.wait_for(1, name)
    return [s for s in receiver.spans if s.name == name]


def _traced(config: Path, receiver: OTLPReceiver) -> Path:
    """``config`` with traces sent to ``receiver``, written beside it."""
    data = orjson.loads(config.read_bytes())
    traced = config.with_name("traced.json")
    traced.write_bytes(orjson.dumps({**data, "telemetry": {"endpoint": receiver.url}}))
    return traced


async def _kill_in_a_tool_call(
    nursery: trio.Nursery, config: Path, tool: ToolServer
) -> tuple[GatewayProcess, str]:
    tool.hold = True
    first = await GatewayProcess(config).start(nursery)
    rid = await start_background(first)
    with trio.fail_after(30):
        await tool.called.wait()
    return first, rid


async def _resume(nursery: trio.Nursery, config: Path, tool: ToolServer, rid: str) -> None:
    tool.release()
    second = await GatewayProcess(config).start(nursery)
    final = await second.wait_finished(rid)
    assert final["status"] == "completed", second.log()


async def test_a_recovered_response_is_a_trace_linked_to_the_request_that_created_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream: FakeUpstream = agent_upstream()
    tool = ToolServer()
    async with otlp_receiver() as receiver:
        config = _traced(
            await servers(nursery, tmp_path, upstream, tool, idempotent=True), receiver
        )
        first, rid = await _kill_in_a_tool_call(nursery, config, tool)
        (request,) = await _spans(receiver, "POST /v1/responses")
        await first.stop(signal.SIGKILL)  # its loop's span never ends: never exported
        await _resume(nursery, config, tool, rid)
        (resumed,) = await _spans(receiver, "invoke_agent m")
    assert resumed.attributes["gen_ai.conversation.id"] == rid
    assert resumed.parent_span_id == "" and resumed.trace_id != request.trace_id
    assert resumed.links == [(request.trace_id, request.span_id)]
    steps = [s.name for s in resumed.children(receiver.spans)]
    assert "execute_tool lookup" in steps and "chat m" in steps


async def test_a_recovered_response_created_untraced_is_a_new_root(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    upstream: FakeUpstream = agent_upstream()
    tool = ToolServer()
    async with otlp_receiver() as receiver:
        untraced = await servers(nursery, tmp_path, upstream, tool, idempotent=True)
        first, rid = await _kill_in_a_tool_call(nursery, untraced, tool)
        await first.stop(signal.SIGKILL)
        await _resume(nursery, _traced(untraced, receiver), tool, rid)
        (resumed,) = await _spans(receiver, "invoke_agent m")
    assert resumed.attributes["gen_ai.conversation.id"] == rid
    assert resumed.parent_span_id == "" and resumed.links == []
