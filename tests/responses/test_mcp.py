"""MCP tools end to end: a real MCP server (the official SDK's ``MCPServer`` over streamable
HTTP, in its own process on loopback) behind the gateway, the ``openai`` SDK as the client and
a fake chat-completions upstream as the model."""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from openai.types.responses import (
    ResponseMcpCallArgumentsDeltaEvent,
    ResponseMcpCallArgumentsDoneEvent,
    ResponseMcpCallCompletedEvent,
    ResponseMcpCallFailedEvent,
    ResponseMcpCallInProgressEvent,
    ResponseMcpListToolsCompletedEvent,
    ResponseMcpListToolsInProgressEvent,
)
from openai.types.responses.response_output_item import McpApprovalRequest, McpCall, McpListTools

from onwards_trio._loop.events import LoopEvent, LoopEventKind
from onwards_trio._loop.run import DisconnectPolicy, LoopConfig
from onwards_trio._loop.steps import StepState
from onwards_trio._responses.mcp_client import McpServer
from onwards_trio._responses.mcp_tools import McpPlan, RequestMcpTool, url_allowed
from tests.responses.test_responses_api import (
    gateway_config,
    has_tool_result,
    make_client,
    sdk,
    text_reply,
    tool_reply,
    wait_status,
)
from tests.support import FakeUpstream, Recorded, Reply, serve_app, start_gateway

SERVER = Path(__file__).with_name("mcp_server.py")


class McpProcess:
    """``mcp_server.py`` in a child process; ``url`` is its ``/mcp`` endpoint."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the MCP test server did not start: {line!r}")
        self.base = f"http://127.0.0.1:{int(line.split()[1])}"
        self.url = self.base + "/mcp"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[McpProcess]:
    """One server for the tests that do not change or kill it."""
    server = McpProcess()
    yield server
    server.stop()


@pytest.fixture
def own_server() -> Iterator[McpProcess]:
    server = McpProcess()
    yield server
    server.stop()


def calls_then_answers(name: str, args: str, answer: str = "done") -> Any:
    """The model calls ``name`` once, then answers with ``answer``."""

    def script(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, answer)
        return tool_reply(rec, name, args)

    return script


async def gateway_with(
    nursery: trio.Nursery, upstream: FakeUpstream, **extra: Any
) -> tuple[Any, openai.OpenAI]:
    url = await serve_app(nursery, upstream)
    gateway, gw_url = await start_gateway(nursery, gateway_config(url, **extra))
    return gateway, make_client(gw_url)


def tool_messages(rec: Recorded) -> list[dict[str, Any]]:
    return [m for m in rec.json()["messages"] if m.get("role") == "tool"]


def offered(rec: Recorded) -> dict[str, Any]:
    return {t["function"]["name"]: t["function"] for t in rec.json().get("tools", [])}


# -- config servers ------------------------------------------------------------------------------


async def test_config_server_tools_are_offered_called_and_fed_back(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__add", '{"a": 2, "b": 3}'))
    tools = {"calc": {"kind": "mcp", "url": shared_server.url, "allowed_tools": ["add", "boom"]}}
    _, client = await gateway_with(nursery, upstream, tools=tools)
    resp = await sdk(lambda: client.responses.create(model="m", input="2+3?"))
    assert resp.status == "completed"
    first, second = upstream.requests
    assert set(offered(first)) == {"calc__add", "calc__boom"}
    assert offered(first)["calc__add"]["parameters"]["required"] == ["a", "b"]
    (message,) = tool_messages(second)
    assert message["content"] == "5"
    outputs = [i for i in resp.output if i.type == "function_call_output"]
    assert [o.status for o in outputs] == ["completed"]


async def test_config_server_headers_reach_the_server(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__whoami", "{}"))
    spec = {"kind": "mcp", "url": shared_server.url, "headers": {"Authorization": "Bearer k1"}}
    _, client = await gateway_with(nursery, upstream, tools={"calc": spec})
    await sdk(lambda: client.responses.create(model="m", input="who?"))
    (message,) = tool_messages(upstream.requests[1])
    assert message["content"] == "Bearer k1"


async def test_one_session_per_server_per_response(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    def script(rec: Recorded) -> Reply:
        if len(tool_messages(rec)) == 2:
            return text_reply(rec, "done")
        return tool_reply(rec, "calc__session", "{}", call_id=f"call_{len(tool_messages(rec))}")

    upstream = FakeUpstream(script)
    spec = {"kind": "mcp", "url": shared_server.url, "protocol": "legacy"}
    _, client = await gateway_with(nursery, upstream, tools={"calc": spec})
    await sdk(lambda: client.responses.create(model="m", input="twice"))
    await sdk(lambda: client.responses.create(model="m", input="again"))
    first = [m["content"] for m in tool_messages(upstream.requests[2])]
    second = [m["content"] for m in tool_messages(upstream.requests[5])]
    assert first[0] == first[1] != "none"  # both calls of a response share its session
    assert second[0] == second[1] != first[0]  # the next response has a session of its own
    # Each session was ended (DELETE) when its response finished: the server no longer knows it.
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(
            shared_server.url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={
                "accept": "application/json, text/event-stream",
                "mcp-session-id": first[0],
                "mcp-protocol-version": "2025-11-25",
            },
        )
    assert answer.status_code == 404


async def test_config_tool_error_is_a_failed_step_the_model_sees(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__boom", '{"reason": "x"}'))
    tools = {"calc": {"kind": "mcp", "url": shared_server.url}}
    gateway, client = await gateway_with(nursery, upstream, tools=tools)
    resp = await sdk(lambda: client.responses.create(model="m", input="go"))
    assert resp.status == "completed" and resp.output_text == "done"
    (message,) = tool_messages(upstream.requests[1])
    assert message["content"].startswith("Error: ")
    assert "boom" in message["content"]
    chain = await gateway.responses.step_store.list_chain(resp.id, None)
    assert [s.state for s in chain] == [StepState.COMPLETED, StepState.FAILED, StepState.COMPLETED]


async def test_server_dying_mid_call_fails_only_its_step(
    nursery: trio.Nursery, own_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("srv__die", "{}"))
    tools = {"srv": {"kind": "mcp", "url": own_server.url, "timeout_secs": 60}}
    gateway, client = await gateway_with(nursery, upstream, tools=tools)
    with trio.fail_after(30):  # far less than the server's timeout: the death is noticed
        resp = await sdk(lambda: client.responses.create(model="m", input="go"))
    assert resp.status == "completed" and resp.output_text == "done"
    (message,) = tool_messages(upstream.requests[1])
    assert message["content"].startswith("Error: ") and "srv" in message["content"]
    chain = await gateway.responses.step_store.list_chain(resp.id, None)
    assert chain[1].state is StepState.FAILED


async def test_slow_server_fails_its_step_at_its_timeout(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__slow", '{"seconds": 60}'))
    tools = {"calc": {"kind": "mcp", "url": shared_server.url, "timeout_secs": 1}}
    _, client = await gateway_with(nursery, upstream, tools=tools)
    resp = await sdk(lambda: client.responses.create(model="m", input="go"))
    assert resp.status == "completed"
    (message,) = tool_messages(upstream.requests[1])
    assert "did not answer within 1s" in message["content"]


async def test_unreachable_config_server_is_left_out_of_the_offer(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    tools = {"gone": {"kind": "mcp", "url": "http://127.0.0.1:9/mcp", "timeout_secs": 5}}
    _, client = await gateway_with(nursery, upstream, tools=tools)
    resp = await sdk(lambda: client.responses.create(model="m", input="hi"))
    assert resp.status == "completed"
    assert "tools" not in upstream.requests[0].json()


async def test_tools_list_changed_refreshes_the_listing(
    nursery: trio.Nursery, own_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("srv__grow", "{}"))
    # A 2025-era session: notifications reach the client on the session's GET stream.
    tools = {"srv": {"kind": "mcp", "url": own_server.url, "protocol": "legacy"}}
    _, client = await gateway_with(nursery, upstream, tools=tools, mcp={"tools_ttl_secs": 3600})
    await sdk(lambda: client.responses.create(model="m", input="grow"))
    assert "srv__extra" not in offered(upstream.requests[0])
    upstream.script = lambda rec: text_reply(rec)
    await sdk(lambda: client.responses.create(model="m", input="again"))
    assert "srv__extra" in offered(upstream.requests[-1])


# -- request tools -------------------------------------------------------------------------------


def mcp_tool(server: McpProcess, **extra: Any) -> Any:
    return {"type": "mcp", "server_label": "calc", "server_url": server.url, **extra}


def allowing(server: McpProcess) -> dict[str, Any]:
    return {"allowed_server_urls": [server.base + "/"]}


async def test_request_server_streams_mcp_items_the_sdk_parses(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__add", '{"a": 2, "b": 3}'))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    tool = mcp_tool(
        shared_server, require_approval="never", headers={"Authorization": "Bearer s3cret"}
    )

    def run() -> list[Any]:
        with client.responses.create(model="m", input="2+3?", tools=[tool], stream=True) as s:
            return list(s)

    events = await sdk(run)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    by_type = {type(e) for e in events}
    for kind in (
        ResponseMcpListToolsInProgressEvent,
        ResponseMcpListToolsCompletedEvent,
        ResponseMcpCallArgumentsDeltaEvent,
        ResponseMcpCallArgumentsDoneEvent,
        ResponseMcpCallInProgressEvent,
        ResponseMcpCallCompletedEvent,
    ):
        assert kind in by_type, kind
    assert not any("function_call" in e.type for e in events)
    final = events[-1].response
    assert [i.type for i in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    listing, call, _ = final.output
    assert isinstance(listing, McpListTools) and isinstance(call, McpCall)
    assert "add" in {t.name for t in listing.tools}
    assert (call.name, call.server_label, call.output, call.status) == (
        "add",
        "calc",
        "5",
        "completed",
    )
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["mcp_list_tools", "mcp_call", "message"]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1, 2]
    (echo,) = final.tools
    assert echo.type == "mcp" and echo.headers is None  # credentials are not echoed
    assert "s3cret" not in final.model_dump_json()


async def test_request_tool_error_is_recorded_on_the_call_item(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__boom", '{"reason": "x"}'))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    tool = mcp_tool(shared_server, require_approval="never")

    def run() -> list[Any]:
        with client.responses.create(model="m", input="go", tools=[tool], stream=True) as s:
            return list(s)

    events = await sdk(run)
    assert ResponseMcpCallFailedEvent in {type(e) for e in events}
    call = next(i for i in events[-1].response.output if isinstance(i, McpCall))
    assert call.status == "failed" and call.output is None
    assert call.error is not None and call.error.type == "mcp_tool_execution_error"
    assert "boom" in tool_messages(upstream.requests[1])[0]["content"]


async def test_request_server_url_outside_the_allow_list_is_refused(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client = await gateway_with(nursery, upstream)  # default: no URL allowed
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(
            lambda: client.responses.create(model="m", input="x", tools=[mcp_tool(shared_server)])
        )
    assert info.value.body["param"] == "tools[0].server_url"  # type: ignore[index]
    assert upstream.requests == []


async def test_request_allowed_tools_filter_limits_the_offer(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    by_name = mcp_tool(shared_server, allowed_tools=["boom", "slow"])
    await sdk(lambda: client.responses.create(model="m", input="x", tools=[by_name]))
    assert set(offered(upstream.requests[-1])) == {"calc__boom", "calc__slow"}
    read_only = mcp_tool(shared_server, allowed_tools={"read_only": True})
    resp = await sdk(lambda: client.responses.create(model="m", input="x", tools=[read_only]))
    assert set(offered(upstream.requests[-1])) == {"calc__add"}  # the one marked readOnlyHint
    listing = resp.output[0]
    assert isinstance(listing, McpListTools) and [t.name for t in listing.tools] == ["add"]


async def test_request_tool_named_like_a_client_function_is_400(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    function: Any = {"type": "function", "name": "calc__add", "parameters": {"type": "object"}}
    with pytest.raises(openai.BadRequestError):
        await sdk(
            lambda: client.responses.create(
                model="m", input="x", tools=[mcp_tool(shared_server), function]
            )
        )
    assert upstream.requests == []


async def test_request_server_that_cannot_list_is_424(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    spec = {"allowed_server_urls": ["http://127.0.0.1:9/"], "timeout_secs": 5}
    _, client = await gateway_with(nursery, upstream, mcp=spec)
    tool: Any = {"type": "mcp", "server_label": "gone", "server_url": "http://127.0.0.1:9/mcp"}
    with pytest.raises(openai.APIStatusError) as info:
        await sdk(lambda: client.responses.create(model="m", input="x", tools=[tool]))
    assert info.value.status_code == 424
    assert upstream.requests == []


async def test_approval_request_ends_the_response_and_approval_continues_it(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__add", '{"a": 1, "b": 2}', "three"))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    tool = mcp_tool(shared_server)  # require_approval defaults to "always"

    def run() -> list[Any]:
        with client.responses.create(model="m", input="1+2?", tools=[tool], stream=True) as s:
            return list(s)

    events = await sdk(run)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [type(i) for i in done] == [McpListTools, McpApprovalRequest]
    first = events[-1].response
    assert first.status == "completed"
    assert [i.type for i in first.output] == ["mcp_list_tools", "mcp_approval_request"]
    request = first.output[1]
    assert isinstance(request, McpApprovalRequest)
    assert (request.name, request.arguments) == ("add", '{"a": 1, "b": 2}')
    assert len(upstream.requests) == 1  # nothing ran

    answer: Any = {
        "type": "mcp_approval_response",
        "approval_request_id": request.id,
        "approve": True,
    }
    second = await sdk(
        lambda: client.responses.create(
            model="m", input=[answer], tools=[tool], previous_response_id=first.id
        )
    )
    assert second.status == "completed" and second.output_text == "three"
    call = next(i for i in second.output if isinstance(i, McpCall))
    assert (call.approval_request_id, call.output, call.status) == (request.id, "3", "completed")
    messages = upstream.requests[1].json()["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == request.id
    assert (messages[-1]["role"], messages[-1]["tool_call_id"]) == ("tool", request.id)
    assert messages[-1]["content"] == "3"


async def test_denied_approval_is_told_to_the_model(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__add", '{"a": 1, "b": 2}'))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    tool = mcp_tool(shared_server)
    first = await sdk(lambda: client.responses.create(model="m", input="1+2?", tools=[tool]))
    answer: Any = {
        "type": "mcp_approval_response",
        "approval_request_id": first.output[1].id,
        "approve": False,
        "reason": "not today",
    }
    second = await sdk(
        lambda: client.responses.create(
            model="m", input=[answer], tools=[tool], previous_response_id=first.id
        )
    )
    assert not any(isinstance(i, McpCall) for i in second.output)
    (message,) = tool_messages(upstream.requests[1])
    assert message["content"] == "Error: the user denied this call: not today"


async def test_cancel_mid_call_leaves_no_step_open(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__slow", '{"seconds": 60}'))
    gateway, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    tool = mcp_tool(shared_server, require_approval="never")
    queued = await sdk(
        lambda: client.responses.create(model="m", input="go", tools=[tool], background=True)
    )
    steps = gateway.responses.step_store
    with trio.fail_after(20):
        while True:  # the call is under way
            chain = await steps.list_chain(queued.id, None)
            if len(chain) == 2 and chain[1].state is StepState.PROCESSING:
                break
            await trio.sleep(0.05)
    cancelled = await sdk(lambda: client.responses.cancel(queued.id))
    assert cancelled.status == "cancelled"
    chain = await steps.list_chain(queued.id, None)
    assert [s.state for s in chain] == [StepState.COMPLETED, StepState.CANCELED]
    await wait_status(client, queued.id, {"cancelled"})


async def test_stream_left_mid_call_with_cancel_policy_leaves_no_step_open(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(calls_then_answers("calc__slow", '{"seconds": 60}'))
    url = await serve_app(nursery, upstream)
    gateway, gw_url = await start_gateway(nursery, gateway_config(url, mcp=allowing(shared_server)))
    gateway.responses.loop_config = LoopConfig(on_disconnect=DisconnectPolicy.CANCEL)
    body = {"model": "m", "input": "go", "stream": True}
    body["tools"] = [mcp_tool(shared_server, require_approval="never")]
    rid = None
    async with (
        httpx.AsyncClient(timeout=20) as http,
        http.stream("POST", gw_url + "/v1/responses", json=body) as stream,
    ):
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                event = orjson.loads(line[6:])
                rid = rid or event["response"]["id"]
                if event["type"] == "response.mcp_call.in_progress":
                    break  # leave while the call runs
    steps = gateway.responses.step_store
    assert steps is not None and rid is not None
    with trio.fail_after(20):
        while True:
            # A foreground response's steps are stored with its final state, all at once.
            chain = await steps.list_chain(rid, None)
            if chain and all(s.state.is_terminal for s in chain):
                break
            await trio.sleep(0.05)
    assert [s.state for s in chain] == [StepState.COMPLETED, StepState.CANCELED]


async def test_approval_for_an_unknown_request_is_400(
    nursery: trio.Nursery, shared_server: McpProcess
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client = await gateway_with(nursery, upstream, mcp=allowing(shared_server))
    first = await sdk(lambda: client.responses.create(model="m", input="hi"))
    answer: Any = {
        "type": "mcp_approval_response",
        "approval_request_id": "mcpr_x",
        "approve": True,
    }
    with pytest.raises(openai.BadRequestError):
        await sdk(
            lambda: client.responses.create(
                model="m", input=[answer], previous_response_id=first.id
            )
        )
    assert len(upstream.requests) == 1


async def test_mcp_events_continue_a_resumed_sequence() -> None:
    got: list[LoopEvent] = []

    class Sink:
        async def emit(self, event: LoopEvent) -> None:
            got.append(event)

    plan = McpPlan([RequestMcpTool(McpServer("calc", "http://127.0.0.1:9/mcp"), None, frozenset())])
    sink = plan.events(Sink())
    await sink.emit(LoopEvent(7, LoopEventKind.CREATED, {"response": {}}))
    await sink.emit(LoopEvent(8, LoopEventKind.IN_PROGRESS, {"response": {}}))
    assert [e.sequence for e in got] == [7, 8]


# -- the allow-list ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://mcp.example.com/mcp", True),
        ("https://mcp.example.com/mcp/v2", True),
        ("https://mcp.example.com/mcpx", False),
        ("http://mcp.example.com/mcp", False),
        ("https://mcp.example.com:8443/mcp", False),
        ("https://evil.example/mcp", False),
        ("https://user@mcp.example.com/mcp", False),
        ("ftp://mcp.example.com/mcp", False),
    ],
)
def test_url_allow_list_matches_origin_and_path_prefix(url: str, allowed: bool) -> None:
    assert url_allowed(url, ["https://mcp.example.com/mcp"]) is allowed
