"""The default Open Responses transition driving the loop: model → server tools → model → done."""

from __future__ import annotations

from typing import Any

import orjson
import trio

from onwards_trio._loop.events import LoopEvent, LoopEventKind
from onwards_trio._loop.run import open_response_stream, run_response_loop
from onwards_trio._loop.steps import (
    AppendSteps,
    ChainStep,
    Fail,
    ResponseStatus,
    StepDescriptor,
    StepKind,
    StepState,
)
from onwards_trio._loop.tools import RequestContext, ToolError, ToolKind, ToolSchema
from onwards_trio._loop.transition import ScopeView, open_responses_transition
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop_helpers import (
    FakeExecutor,
    FakeModel,
    Reply,
    chat,
    chunk,
    sse,
    stream_text,
    tool_call,
)

CTX = RequestContext(model="m")
USER = [{"role": "user", "content": "what is 1+2?"}]


async def start(request: dict[str, Any] | None = None) -> MemoryStore:
    store = MemoryStore()
    await store.begin_response("r", request or {"model": "m", "messages": USER})
    return store


async def run(store: MemoryStore, executor: Any, model: FakeModel) -> Any:
    return await run_response_loop(store, executor, CTX, model, request_id="r")


async def test_server_tool_round_trip_builds_the_follow_up_request() -> None:
    store = await start()
    model = FakeModel(
        [
            Reply(body=chat(None, tool_calls=[tool_call("call_1", "add", '{"x":1,"y":2}')])),
            Reply(body=chat("3")),
        ]
    )
    executor = FakeExecutor({"add": {"sum": 3}})
    result = await run(store, executor, model)
    assert executor.calls == [("add", "call_1", {"x": 1, "y": 2})]
    follow_up = model.requests[1]["messages"]
    assert follow_up[:1] == USER
    assert follow_up[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"x":1,"y":2}'},
            }
        ],
    }
    assert follow_up[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"sum":3}'}
    assert result["status"] == "completed"
    assert [i["type"] for i in result["output"]] == [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert result["output"][0]["call_id"] == result["output"][1]["call_id"] == "call_1"
    assert result["usage"]["total_tokens"] == 10  # 5 per model call, summed
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.COMPLETED


async def test_parallel_tool_calls_become_a_fan_out_in_call_order() -> None:
    store = await start()
    calls = [tool_call(f"call_{i}", "add", f'{{"x":{i}}}') for i in range(3)]
    model = FakeModel([Reply(body=chat(None, tool_calls=calls)), Reply(body=chat("ok"))])
    await run(store, FakeExecutor({"add": 1}), model)
    chain = await store.list_chain("r", None)
    tools = [s for s in chain if s.kind is StepKind.TOOL_CALL]
    assert [s.request_payload["call_id"] for s in tools] == ["call_0", "call_1", "call_2"]
    tool_msgs = [m for m in model.requests[1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["call_0", "call_1", "call_2"]


async def test_client_side_tool_call_completes_with_the_function_call() -> None:
    store = await start()
    model = FakeModel(Reply(body=chat(None, tool_calls=[tool_call("call_c", "get_weather")])))
    executor = FakeExecutor({"add": 1})
    result = await run(store, executor, model)
    assert executor.calls == []
    assert len(model.requests) == 1
    (item,) = result["output"]
    assert item["type"] == "function_call" and item["call_id"] == "call_c"
    assert item["name"] == "get_weather"


async def test_invalid_arguments_go_back_to_the_model() -> None:
    store = await start()
    model = FakeModel(
        [
            Reply(body=chat(None, tool_calls=[tool_call("call_1", "add", "{not json")])),
            Reply(body=chat("sorry")),
        ]
    )
    executor = FakeExecutor({"add": 1})
    await run(store, executor, model)
    assert executor.calls == []
    tool_msg = model.requests[1]["messages"][-1]
    assert tool_msg["role"] == "tool" and tool_msg["content"].startswith(
        "Error: Invalid arguments:"
    )


async def test_tool_errors_go_back_to_the_model() -> None:
    store = await start()
    model = FakeModel(
        [Reply(body=chat(None, tool_calls=[tool_call("call_1", "add")])), Reply(body=chat("sorry"))]
    )
    await run(store, FakeExecutor({"add": ToolError.execution("division by zero")}), model)
    tool_msg = model.requests[1]["messages"][-1]
    assert tool_msg == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Error: Tool execution error: division by zero",
    }


async def test_failed_model_step_fails_the_response() -> None:
    store = await start()
    model = FakeModel(Reply(status=502, body=b"bad gateway"))
    async with open_response_stream(store, FakeExecutor({}), CTX, model, request_id="r") as recv:
        events = [e async for e in recv]
    assert events[-1].kind is LoopEventKind.FAILED
    error = events[-1].data["response"]["error"]
    assert error["code"] == "server_error" and "HTTP 502" in error["message"]
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED


async def test_length_finish_makes_the_response_incomplete() -> None:
    store = await start()
    model = FakeModel(Reply(body=chat("cut", finish="length")))
    async with open_response_stream(store, FakeExecutor({}), CTX, model, request_id="r") as recv:
        events = [e async for e in recv]
    assert events[-1].kind is LoopEventKind.INCOMPLETE
    response = events[-1].data["response"]
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_streamed_items_match_the_final_output() -> None:
    store = await start({"model": "m", "messages": USER, "stream": True})
    calls = [
        {
            "index": 0,
            "id": "call_s",
            "type": "function",
            "function": {"name": "add", "arguments": ""},
        }
    ]
    first = sse(
        chunk({"role": "assistant", "tool_calls": calls}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
    )
    model = FakeModel([Reply(chunks=first), Reply(chunks=stream_text("three"))])
    async with open_response_stream(
        store, FakeExecutor({"add": 3}), CTX, model, request_id="r"
    ) as recv:
        events: list[LoopEvent] = [e async for e in recv]
    arg_events = [e for e in events if e.kind.value.startswith("response.function_call_arguments")]
    assert [e.data["call_id"] for e in arg_events] == ["call_s"] * 3  # no "call_unknown"
    assert arg_events[-1].data["name"] == "add" and arg_events[-1].data["arguments"] == '{"x":1}'
    done = sorted(
        (e for e in events if e.kind is LoopEventKind.OUTPUT_ITEM_DONE),
        key=lambda e: e.data["output_index"],
    )
    final = events[-1].data["response"]
    assert [d.data["item"] for d in done] == final["output"]
    assert [d.data["output_index"] for d in done] == [0, 1, 2]
    assert model.requests[0]["stream_options"] == {"include_usage": True}


async def test_agent_tool_runs_a_default_sub_loop() -> None:
    store = await start({"model": "m", "messages": USER, "tools": [{"type": "function"}]})

    def answer(request: Any) -> Reply:
        if request["messages"][0] == {"role": "system", "content": "the research tool"}:
            assert request["messages"][1] == {"role": "user", "content": "find it"}
            return Reply(body=chat("found it"))
        if len(request["messages"]) == 1:
            return Reply(
                body=chat(None, tool_calls=[tool_call("call_r", "research", '{"input":"find it"}')])
            )
        return Reply(body=chat("done: " + request["messages"][-1]["content"]))

    model = FakeModel(answer)
    executor = FakeExecutor(kinds={"research": ToolKind.AGENT})
    result = await run(store, executor, model)
    assert result["output"][-1]["content"][0]["text"] == "done: found it"
    (tool_step,) = [s for s in await store.list_chain("r", None) if s.kind is StepKind.TOOL_CALL]
    assert tool_step.response_payload == "found it"
    (inner,) = await store.list_chain("r", tool_step.id)
    assert inner.state is StepState.COMPLETED
    assert model.requests[1]["tools"] == [{"type": "function"}]


def test_no_recorded_request_fails() -> None:
    view = ScopeView("r", None, None, None, [], {})
    action = open_responses_transition(view)
    assert isinstance(action, Fail) and action.payload["code"] == "invalid_request"


def test_interrupted_tool_step_is_reported_to_the_model() -> None:
    from onwards_trio._loop.steps import ResponseRecord

    model_step = ChainStep(
        "s1",
        StepKind.MODEL_CALL,
        StepState.COMPLETED,
        1,
        None,
        None,
        {},
        chat(None, tool_calls=[tool_call("call_1", "add")]),
    )
    tool_step = ChainStep(
        "s2",
        StepKind.TOOL_CALL,
        StepState.CANCELED,
        2,
        "s1",
        None,
        {"name": "add", "call_id": "call_1"},
    )
    view = ScopeView(
        "r",
        None,
        ResponseRecord("r", ResponseStatus.IN_PROGRESS, {"model": "m", "messages": USER}),
        None,
        [model_step, tool_step],
        {"add": ToolSchema("add")},
    )
    action = open_responses_transition(view)
    assert isinstance(action, AppendSteps)
    messages = action.steps[0].request_payload["messages"]
    assert messages[-1]["content"] == "Error: the tool call did not finish"


async def test_tool_output_strings_are_passed_verbatim(autojump_clock: trio.abc.Clock) -> None:
    store = await start()
    model = FakeModel(
        [Reply(body=chat(None, tool_calls=[tool_call("call_1", "echo")])), Reply(body=chat("k"))]
    )
    await run(store, FakeExecutor({"echo": "plain text"}), model)
    assert model.requests[1]["messages"][-1]["content"] == "plain text"
    assert orjson.loads(orjson.dumps(model.requests[1])) == model.requests[1]


async def test_resume_after_an_interrupted_model_step_asks_the_model_again() -> None:
    store = await start()
    request = {"model": "m", "messages": USER}
    dead = await store.record_step("r", None, None, StepDescriptor.model_call(request))
    await store.mark_step_processing(dead.id)
    model = FakeModel(Reply(body=chat("second try")))
    result = await run(store, FakeExecutor({}), model)
    assert model.requests == [request]
    assert result["output"][0]["content"][0]["text"] == "second try"
    (step,) = await store.list_chain("r", None)  # the same step, run again
    assert step.id == dead.id and step.state is StepState.COMPLETED


async def test_tool_calls_without_an_id_keep_one_call_id_end_to_end() -> None:
    # A non-streamed upstream that sends no tool-call id: the function_call item, the tool
    # output item and the follow-up messages must all use the same stand-in id.
    store = await start()
    call = {"type": "function", "function": {"name": "add", "arguments": "{}"}}
    model = FakeModel([Reply(body=chat(None, tool_calls=[call])), Reply(body=chat("3"))])
    result = await run(store, FakeExecutor({"add": 3}), model)
    fc, fco = result["output"][0], result["output"][1]
    assert (fc["type"], fco["type"]) == ("function_call", "function_call_output")
    assert fco["call_id"] == fc["call_id"]
    follow_up = model.requests[1]["messages"]
    assert follow_up[1]["tool_calls"][0]["id"] == fc["call_id"]
    assert follow_up[2]["tool_call_id"] == fc["call_id"]
