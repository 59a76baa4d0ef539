"""A tool call that fails still ends its ``function_call_output`` item: ``incomplete``, with
the error as the output the client (and the model) reads; a failing model call adds no tool
item."""

from __future__ import annotations

from onwards_trio._loop.events import LoopEventKind
from onwards_trio._loop.steps import StepDescriptor
from onwards_trio._loop.tools import ToolError
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop import ListSink, run, tools_then_complete
from tests.loop.test_loop_helpers import FakeExecutor, FakeModel, Reply


async def test_a_failing_tool_call_ends_its_output_item_incomplete_with_the_error() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t", call_id="call_abc")))
    sink = ListSink()
    await run(store, FakeExecutor({"t": ToolError.execution("kaput")}), sink=sink)
    done = [e.data for e in sink.events if e.kind is LoopEventKind.OUTPUT_ITEM_DONE]
    assert len(done) == 1
    item = done[0]["item"]
    assert (item["type"], item["call_id"], item["status"]) == (
        "function_call_output",
        "call_abc",
        "incomplete",
    )
    assert "kaput" in item["output"]


async def test_a_failing_model_call_adds_no_tool_output_item() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.model_call({"model": "m"})))
    sink = ListSink()
    assert await run(store, model=FakeModel(Reply(status=500, body=b"no")), sink=sink) == {
        "done": ["failed"]
    }
    kinds = sink.kinds()
    assert LoopEventKind.OUTPUT_ITEM_DONE not in kinds
    assert kinds[-1] is LoopEventKind.COMPLETED
