"""The status a loop's response ends in: a result whose own status is not a final one ends
``completed``, and a loop that crashes (an error that is neither the loop's nor a
cancellation) leaves its response ``failed`` with a server error and its open steps
``aborted``.

Each test kills a mutant of ``_Run._run`` that survived the rest of the suite
(docs/testing-quality.md)."""

from __future__ import annotations

import pytest

from onwards_trio import MemoryStore, run_response_loop
from onwards_trio._loop.events import LoopEvent, LoopEventKind
from onwards_trio._loop.steps import (
    AppendSteps,
    Complete,
    ResponseStatus,
    StepDescriptor,
    StepState,
)
from onwards_trio._loop.tools import RequestContext
from tests.loop.test_loop import NO_MODEL, ListSink
from tests.loop.test_loop_helpers import FakeExecutor, scripted


async def test_a_result_in_a_status_that_is_not_final_ends_completed() -> None:
    store = MemoryStore(scripted([Complete({"status": "in_progress", "output": []})]))
    sink = ListSink()
    await run_response_loop(
        store, FakeExecutor(), RequestContext(model="m"), NO_MODEL, request_id="r", sink=sink
    )
    record = await store.get_response("r")
    assert record is not None
    assert (record.status, record.output["status"]) == (ResponseStatus.COMPLETED, "completed")
    assert sink.kinds()[-1] is LoopEventKind.COMPLETED
    assert sink.events[-1].data["response"]["status"] == "completed"


class CrashingSink(ListSink):
    """A sink that breaks when the tool call is announced (its step recorded, still open)."""

    async def emit(self, event: LoopEvent) -> None:
        if event.kind is LoopEventKind.OUTPUT_ITEM_ADDED:
            raise RuntimeError("the sink broke")
        await super().emit(event)


async def test_a_crashed_loop_leaves_its_response_failed_with_a_server_error() -> None:
    store = MemoryStore(scripted([AppendSteps((StepDescriptor.tool_call("add"),))]))
    with pytest.raises(RuntimeError, match="the sink broke"):
        await run_response_loop(
            store,
            FakeExecutor({"add": 3}),
            RequestContext(model="m"),
            NO_MODEL,
            request_id="r",
            sink=CrashingSink(),
        )
    record = await store.get_response("r")
    assert record is not None and record.status is ResponseStatus.FAILED
    assert record.output["status"] == "failed"
    assert record.output["error"] == {
        "code": "server_error",
        "message": "the response loop crashed",
    }
    (step,) = await store.list_chain("r", None)
    assert (step.state, step.error) == (StepState.CANCELED, {"type": "aborted"})
