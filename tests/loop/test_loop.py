"""The loop itself (reference §3.AA behaviours plus the §5.1 fixes), with fake transports.

Custom (scripted) transitions pin the onwards semantics; the default Open Responses transition
has its own file (test_loop_transition.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio

from onwards_trio._loop.events import ChannelSink, LoopEvent, LoopEventKind
from onwards_trio._loop.run import LoopConfig, LoopError, LoopErrorKind, run_response_loop
from onwards_trio._loop.steps import (
    AppendSteps,
    Complete,
    Fail,
    NextAction,
    ResponseStatus,
    StepDescriptor,
    StepKind,
    StepState,
    StoreError,
    StoreErrorKind,
)
from onwards_trio._loop.tools import RequestContext, ToolError, ToolKind
from onwards_trio._loop.transition import ScopeView
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop_helpers import (
    BrokenStore,
    FakeExecutor,
    FakeModel,
    Reply,
    chat,
    model_then_complete,
    scripted,
    stream_text,
)

CTX = RequestContext(model="m")
NO_MODEL = FakeModel(Reply(status=599))


class ListSink:
    def __init__(self) -> None:
        self.events: list[LoopEvent] = []

    async def emit(self, event: LoopEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[LoopEventKind]:
        return [e.kind for e in self.events]


async def run(
    store: MemoryStore,
    executor: Any = None,
    model: Any = NO_MODEL,
    **kwargs: Any,
) -> Any:
    return await run_response_loop(
        store, executor or FakeExecutor(), CTX, model, request_id="r", **kwargs
    )


def tools_then_complete(*descs: StepDescriptor) -> Any:
    def transition(view: ScopeView) -> NextAction:
        if not view.chain:
            return AppendSteps(descs)
        return Complete({"done": [s.state.value for s in view.chain]})

    return transition


# -- reference §3.AA -----------------------------------------------------------------------------


async def test_complete_immediately_returns_payload() -> None:
    store = MemoryStore(scripted([Complete({"final": True})]))
    executor = FakeExecutor({"t": 1})
    assert await run(store, executor) == {"final": True}
    assert await store.list_chain("r", None) == []
    assert executor.calls == []


async def test_fail_immediately_raises_failed_with_payload() -> None:
    store = MemoryStore(scripted([Fail({"reason": "bad"})]))
    with pytest.raises(LoopError) as info:
        await run(store)
    assert info.value.kind is LoopErrorKind.FAILED
    assert info.value.payload == {"reason": "bad"}
    assert str(info.value) == 'response loop failed: {"reason":"bad"}'


async def test_single_model_call_stores_the_upstream_body_verbatim() -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    store = MemoryStore(model_then_complete(request, {"final": 1}))
    model = FakeModel(Reply(body={"output": "hello"}))
    assert await run(store, model=model) == {"final": 1}
    assert model.requests == [request] and model.streams == [False]
    (step,) = await store.list_chain("r", None)
    assert step.kind is StepKind.MODEL_CALL and step.state is StepState.COMPLETED
    assert step.response_payload == {"output": "hello"}


async def test_parallel_fan_out_chains_prev_step_id() -> None:
    descs = [StepDescriptor.tool_call("t", {"i": i}) for i in range(3)]
    store = MemoryStore(tools_then_complete(*descs))
    executor = FakeExecutor({"t": "ok"})
    await run(store, executor)
    chain = await store.list_chain("r", None)
    assert [s.sequence for s in chain] == [1, 2, 3]
    assert [s.prev_step_id for s in chain] == [None, chain[0].id, chain[1].id]
    assert [s.request_payload["args"] for s in chain] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert len(executor.calls) == 3


async def test_step_failure_does_not_abort_the_loop() -> None:
    def transition(view: ScopeView) -> NextAction:
        if len(view.chain) < 2:
            return AppendSteps([StepDescriptor.model_call({"n": len(view.chain)})])
        return Complete({"ok": True})

    store = MemoryStore(transition)
    model = FakeModel([Reply(status=500, body=b"upstream broke"), Reply(body={"fine": 1})])
    assert await run(store, model=model) == {"ok": True}
    first, second = await store.list_chain("r", None)
    assert first.state is StepState.FAILED
    assert first.error == {
        "type": "executor_error",
        "message": "executor error: model call returned HTTP 500: upstream broke",
    }
    assert second.state is StepState.COMPLETED and second.response_payload == {"fine": 1}


async def test_max_iterations_cap_fires_after_exactly_that_many_transitions() -> None:
    calls = []

    def endless(view: ScopeView) -> NextAction:
        calls.append(1)
        return AppendSteps([StepDescriptor.tool_call("t")])

    store = MemoryStore(endless)
    result = await run(store, FakeExecutor({"t": 1}), config=LoopConfig(max_response_iterations=3))
    assert result["status"] == "incomplete"
    assert result["incomplete_details"] == {"reason": "max_messages"}
    assert len(calls) == 3
    assert len(await store.list_chain("r", None)) == 3
    # everything produced is kept
    assert [i["type"] for i in result["output"]] == ["function_call_output"] * 3


async def test_agent_tool_runs_a_sub_loop_under_its_step() -> None:
    def transition(view: ScopeView) -> NextAction:
        if view.scope_parent is not None:
            return Complete({"sub": "result"})
        if not view.chain:
            return AppendSteps([StepDescriptor.tool_call("agent", {"q": 1})])
        return Complete(view.chain[-1].response_payload)

    store = MemoryStore(transition)
    executor = FakeExecutor(kinds={"agent": ToolKind.AGENT})
    assert await run(store, executor) == {"sub": "result"}
    assert executor.calls == []
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.COMPLETED and step.response_payload == {"sub": "result"}


async def test_http_tool_goes_through_the_executor_with_its_args() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("add", {"x": 1, "y": 2})))
    executor = FakeExecutor({"add": 3})
    await run(store, executor)
    assert [(n, a) for n, _, a in executor.calls] == [("add", {"x": 1, "y": 2})]
    (step,) = await store.list_chain("r", None)
    assert step.response_payload == 3


async def test_empty_append_steps_is_an_error() -> None:
    store = MemoryStore(scripted([AppendSteps([])]))
    with pytest.raises(LoopError) as info:
        await run(store)
    assert info.value.kind is LoopErrorKind.EMPTY_ACTION


async def test_resume_continues_from_the_chain_tail() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    old = await store.record_step("r", None, None, StepDescriptor.tool_call("t"))
    await store.mark_step_processing(old.id)
    await store.complete_step(old.id, "earlier")
    calls = 0

    def transition(view: ScopeView) -> NextAction:
        nonlocal calls
        calls += 1
        if calls == 1:
            return AppendSteps([StepDescriptor.tool_call("t")])
        return Complete({})

    store.transition = transition
    await run(store, FakeExecutor({"t": 1}))
    first, second = await store.list_chain("r", None)
    assert second.prev_step_id == first.id == old.id
    assert second.sequence == old.sequence + 1


async def test_streaming_model_call_forwards_token_deltas_and_terminals() -> None:
    request = {"model": "m", "messages": [], "stream": True}
    store = MemoryStore(model_then_complete(request))
    sink = ListSink()
    await run(store, model=FakeModel(Reply(chunks=stream_text("Hello", " world"))), sink=sink)
    assert sink.events[0].kind is LoopEventKind.CREATED and sink.events[0].sequence == 0
    deltas = [e.data["delta"] for e in sink.events if e.kind is LoopEventKind.OUTPUT_TEXT_DELTA]
    assert deltas == ["Hello", " world"]
    assert sink.kinds()[-1] is LoopEventKind.COMPLETED
    (step,) = await store.list_chain("r", None)
    assert step.response_payload["choices"][0]["message"]["content"] == "Hello world"
    assert step.response_payload["usage"]["completion_tokens"] == 2


async def test_tool_call_emits_its_output_item() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t", call_id="call_abc")))
    sink = ListSink()
    await run(store, FakeExecutor({"t": {"v": 1}}), sink=sink)
    done = [e for e in sink.events if e.kind is LoopEventKind.OUTPUT_ITEM_DONE]
    assert len(done) == 1
    item = done[0].data["item"]
    assert item["type"] == "function_call_output"
    assert item["call_id"] == "call_abc"  # the real call id, not call_step_<n>
    assert item["output"] == '{"v":1}'
    assert sink.kinds().count(LoopEventKind.COMPLETED) == 1


async def test_non_streaming_model_call_emits_each_item_in_one_delta() -> None:
    store = MemoryStore(model_then_complete({"model": "m", "messages": []}))
    sink = ListSink()
    await run(store, model=FakeModel(Reply(body=chat("whole answer"))), sink=sink)
    kinds = sink.kinds()
    deltas = [e for e in sink.events if e.kind is LoopEventKind.OUTPUT_TEXT_DELTA]
    assert [e.data["delta"] for e in deltas] == ["whole answer"]
    done = [e for e in sink.events if e.kind is LoopEventKind.OUTPUT_TEXT_DONE]
    assert [e.data["text"] for e in done] == ["whole answer"]
    assert kinds.count(LoopEventKind.OUTPUT_ITEM_ADDED) == 1
    assert kinds[-1] is LoopEventKind.COMPLETED


# -- fixes and additions -------------------------------------------------------------------------


async def test_tool_step_without_a_name_is_failed_not_left_processing() -> None:
    bad = StepDescriptor(StepKind.TOOL_CALL, {"args": {}})
    store = MemoryStore(tools_then_complete(bad))
    assert await run(store) == {"done": ["failed"]}
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED
    assert "missing 'name'" in step.error["message"]


async def test_failing_sibling_does_not_cancel_the_others(autojump_clock: trio.abc.Clock) -> None:
    async def slow_ok(args: Any) -> str:
        await trio.sleep(1)
        return "ok"

    descs = [StepDescriptor.tool_call(n) for n in ("ok", "boom", "ok")]
    store = MemoryStore(tools_then_complete(*descs))
    executor = FakeExecutor({"ok": slow_ok, "boom": ToolError.execution("kaput")})
    assert await run(store, executor) == {"done": ["completed", "failed", "completed"]}
    failed = (await store.list_chain("r", None))[1]
    assert failed.error["code"] == "execution_error"
    assert failed.error["detail"] == "Tool execution error: kaput"
    assert executor.finished == 2


async def test_fan_out_of_ten_runs_concurrently(autojump_clock: trio.abc.Clock) -> None:
    descs = [StepDescriptor.tool_call("t", {"i": i}) for i in range(10)]
    store = MemoryStore(tools_then_complete(*descs))
    executor = FakeExecutor({"t": "ok"}, delay=1.0)
    start = trio.current_time()
    await run(store, executor)
    elapsed = trio.current_time() - start
    assert executor.max_active == 10
    assert 1.0 <= elapsed < 1.5  # one step's time, not ten


async def test_executor_exceptions_other_than_tool_error_fail_the_step() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    assert await run(store, FakeExecutor({"t": RuntimeError("bug")})) == {"done": ["failed"]}
    (step,) = await store.list_chain("r", None)
    assert "RuntimeError: bug" in step.error["message"]


async def test_unknown_tool_fails_the_step_with_not_found() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("ghost")))
    await run(store, FakeExecutor({}))
    (step,) = await store.list_chain("r", None)
    assert step.error["message"] == "executor target not found: ghost"


async def test_tool_timeout_fails_the_step(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    executor = FakeExecutor({"t": 1}, delay=10)
    await run(store, executor, config=LoopConfig(tool_timeout=2))
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED and step.error["code"] == "timeout"


async def test_model_call_timeout_fails_the_step(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore(model_then_complete({"m": 1}, {"x": 1}))
    model = FakeModel(Reply(body={}, delay=30))
    await run(store, model=model, config=LoopConfig(model_call_timeout=5))
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED and "timed out" in step.error["message"]
    assert model.active == 0


async def test_transport_exception_fails_the_step() -> None:
    store = MemoryStore(model_then_complete({"m": 1}, {"x": 1}))
    await run(store, model=FakeModel(Reply(raise_exc=OSError("refused"))))
    (step,) = await store.list_chain("r", None)
    assert "model call HTTP error: OSError: refused" in step.error["message"]


async def test_stream_error_event_fails_the_step() -> None:
    chunks = [b'data: {"error": {"message": "overloaded"}}\n\n']
    store = MemoryStore(model_then_complete({"stream": True}, {"x": 1}))
    await run(store, model=FakeModel(Reply(chunks=chunks)))
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED and "overloaded" in step.error["message"]


async def test_depth_above_cap_fails_before_touching_the_store() -> None:
    store = BrokenStore(scripted([Complete({})]), "list_chain")
    with pytest.raises(LoopError) as info:
        await run(store, depth=9)
    assert info.value.kind is LoopErrorKind.MAX_DEPTH_EXCEEDED
    assert store.calls == 0


async def test_sub_agent_recursion_is_capped() -> None:
    def transition(view: ScopeView) -> NextAction:
        if not view.chain:
            return AppendSteps([StepDescriptor.tool_call("agent")])
        last = view.chain[-1]
        if last.state is StepState.COMPLETED:
            return Complete(last.response_payload)
        return Fail(last.error)

    store = MemoryStore(transition)
    executor = FakeExecutor(kinds={"agent": ToolKind.AGENT})
    with pytest.raises(LoopError) as info:
        await run(store, executor, config=LoopConfig(max_response_step_depth=3))
    assert info.value.kind is LoopErrorKind.FAILED
    # Scopes nest 4 deep (depths 0..3); the innermost agent step is refused by the cap.
    scope, depth = None, 0
    while True:
        chain = await store.list_chain("r", scope)
        if not chain:
            break
        (step,) = chain
        assert step.state is StepState.FAILED
        scope, depth = step.id, depth + 1
    assert depth == 4
    assert step.error["type"] == "max_depth_exceeded"


async def test_store_failure_ends_the_loop_with_a_store_error() -> None:
    store = BrokenStore(tools_then_complete(StepDescriptor.tool_call("t")), "complete_step")
    sink = ListSink()
    with trio.fail_after(5):
        with pytest.raises(LoopError) as info:
            await run(store, FakeExecutor({"t": 1}), sink=sink)
    assert info.value.kind is LoopErrorKind.STORE
    assert "disk on fire" in str(info.value)
    assert sink.kinds()[-1] is LoopEventKind.FAILED
    error = sink.events[-1].data["response"]["error"]
    assert error["code"] == "server_error" and error["message"].startswith("store_error: ")
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.CANCELED  # not left processing


async def test_store_failure_in_a_fan_out_cancels_the_siblings() -> None:
    async def slow(args: Any) -> str:
        await trio.sleep(100)
        return "never"

    def transition(view: ScopeView) -> NextAction:
        return AppendSteps([StepDescriptor.tool_call("fast"), StepDescriptor.tool_call("slow")])

    store = BrokenStore(transition, "complete_step")
    executor = FakeExecutor({"fast": 1, "slow": slow})
    with trio.fail_after(5):
        with pytest.raises(LoopError) as info:
            await run(store, executor)
    assert info.value.kind is LoopErrorKind.STORE
    states = {s.request_payload["name"]: s.state for s in await store.list_chain("r", None)}
    assert states == {"fast": StepState.CANCELED, "slow": StepState.CANCELED}
    assert executor.active == 0


async def test_response_final_state_is_written() -> None:
    store = MemoryStore(scripted([Complete({"output": ["x"], "status": "incomplete"})]))
    sink = ListSink()
    await run(store, sink=sink, response={"model": "alias"})
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.INCOMPLETE
    assert rec.output["model"] == "alias" and rec.output["output"] == ["x"]
    assert sink.kinds()[-1] is LoopEventKind.INCOMPLETE


async def test_failed_response_final_state_is_written() -> None:
    store = MemoryStore(scripted([Fail({"code": "nope", "message": "it broke"})]))
    with pytest.raises(LoopError):
        await run(store)
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED
    # a code outside the SDK's declared set is server_error, the specific code leading
    assert rec.output["error"] == {"code": "server_error", "message": "nope: it broke"}


async def test_events_are_numbered_contiguously_with_one_terminal() -> None:
    descs = [StepDescriptor.tool_call("t", {"i": i}) for i in range(5)]
    store = MemoryStore(tools_then_complete(*descs))
    sink = ListSink()
    await run(store, FakeExecutor({"t": 1}), sink=sink, first_sequence=7)
    assert [e.sequence for e in sink.events] == list(range(7, 7 + len(sink.events)))
    assert sum(e.kind.is_terminal for e in sink.events) == 1
    added = [
        e.data["output_index"] for e in sink.events if e.kind is LoopEventKind.OUTPUT_ITEM_ADDED
    ]
    assert added == [0, 1, 2, 3, 4]


async def test_max_iterations_emits_one_incomplete_terminal_with_the_output() -> None:
    store = MemoryStore(scripted([AppendSteps([StepDescriptor.tool_call("t")])]))
    sink = ListSink()
    await run(
        store, FakeExecutor({"t": 1}), sink=sink, config=LoopConfig(max_response_iterations=2)
    )
    terminals = [e for e in sink.events if e.kind.is_terminal]
    assert [e.kind for e in terminals] == [LoopEventKind.INCOMPLETE]
    response = terminals[0].data["response"]
    assert response["status"] == "incomplete" and response["error"] is None
    assert len(response["output"]) == 2


async def test_sub_loop_iteration_cap_is_still_an_error() -> None:
    def transition(view: ScopeView) -> NextAction:
        if view.scope_parent is not None:
            return AppendSteps([StepDescriptor.tool_call("t")])
        if not view.chain:
            return AppendSteps([StepDescriptor.tool_call("agent", {})])
        return Complete({"agent": view.chain[-1].state.value})

    store = MemoryStore(transition)
    executor = FakeExecutor({"t": 1}, kinds={"agent": ToolKind.AGENT})
    assert await run(store, executor, config=LoopConfig(max_response_iterations=2)) == {
        "agent": "failed"
    }


async def test_sub_loop_events_are_not_forwarded() -> None:
    def transition(view: ScopeView) -> NextAction:
        if view.scope_parent is not None:
            if not view.chain:
                return AppendSteps([StepDescriptor.model_call({"stream": True})])
            return Complete("inner answer")
        if not view.chain:
            return AppendSteps([StepDescriptor.tool_call("agent", call_id="call_a")])
        return Complete({})

    store = MemoryStore(transition)
    sink = ListSink()
    model = FakeModel(Reply(chunks=stream_text("secret", " inner")))
    await run(store, FakeExecutor(kinds={"agent": ToolKind.AGENT}), model, sink=sink)
    assert LoopEventKind.OUTPUT_TEXT_DELTA not in sink.kinds()
    (done,) = [e for e in sink.events if e.kind is LoopEventKind.OUTPUT_ITEM_DONE]
    assert done.data["item"]["output"] == "inner answer"
    assert done.data["item"]["call_id"] == "call_a"


async def test_channel_sink_with_a_closed_receiver_does_not_stop_the_loop() -> None:
    send, recv = trio.open_memory_channel[LoopEvent](0)
    recv.close()
    sink = ChannelSink(send)
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    assert await run(store, FakeExecutor({"t": 1}), sink=sink) == {"done": ["completed"]}
    assert sink.closed
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.COMPLETED


async def test_executor_tools_failure_is_an_executor_error_reported_once() -> None:
    class NoTools(FakeExecutor):
        async def tools(self, ctx: RequestContext) -> Any:
            raise RuntimeError("registry down")

    store = MemoryStore(scripted([Complete({})]))
    sink = ListSink()
    with pytest.raises(LoopError) as info:
        await run(store, NoTools(), sink=sink)
    assert info.value.kind is LoopErrorKind.EXECUTOR
    assert sink.kinds() == [LoopEventKind.FAILED]
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED


async def test_resume_fails_a_tool_call_a_dead_run_left_processing() -> None:
    store = MemoryStore(scripted([Complete({"ok": 1})]))
    stale = await store.record_step("r", None, None, StepDescriptor.tool_call("t"))
    await store.mark_step_processing(stale.id)
    executor = FakeExecutor({"t": 1})
    assert await run(store, executor) == {"ok": 1}
    step = await store.get_step(stale.id)
    assert executor.calls == []  # it may have had its effect: never run twice
    assert step.state is StepState.FAILED and step.error["type"] == "interrupted"
    assert "not declared idempotent" in step.error["message"]


async def test_resume_reruns_an_idempotent_tool_call_left_processing() -> None:
    store = MemoryStore(scripted([Complete({"ok": 1})]))
    stale = await store.record_step("r", None, None, StepDescriptor.tool_call("t", call_id="c"))
    await store.mark_step_processing(stale.id)
    executor = FakeExecutor({"t": 7}, idempotent=frozenset({"t"}))
    assert await run(store, executor) == {"ok": 1}
    step = await store.get_step(stale.id)
    assert executor.calls == [("t", "c", {})]
    assert step.state is StepState.COMPLETED and step.response_payload == 7


async def test_resume_runs_a_step_that_never_started() -> None:
    store = MemoryStore(scripted([Complete({"ok": 1})]))
    pending = await store.record_step("r", None, None, StepDescriptor.tool_call("t"))
    executor = FakeExecutor({"t": 1})
    assert await run(store, executor) == {"ok": 1}
    assert len(executor.calls) == 1
    assert (await store.get_step(pending.id)).state is StepState.COMPLETED


async def test_resume_asks_the_model_again_for_a_call_left_processing() -> None:
    request = {"model": "m", "messages": []}
    store = MemoryStore(scripted([Complete({"ok": 1})]))
    stale = await store.record_step("r", None, None, StepDescriptor.model_call(request))
    await store.mark_step_processing(stale.id)
    model = FakeModel(Reply(body={"answer": 1}))
    assert await run(store, model=model) == {"ok": 1}
    assert model.requests == [request]
    step = await store.get_step(stale.id)
    assert step.state is StepState.COMPLETED and step.response_payload == {"answer": 1}


async def test_resume_leaves_completed_steps_alone_and_continues_the_sequence() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    done = await store.record_step("r", None, None, StepDescriptor.tool_call("t"))
    await store.mark_step_processing(done.id)
    await store.complete_step(done.id, 1)
    executor = FakeExecutor({"t": 1})
    sink = ListSink()
    assert await run(store, executor, sink=sink, first_sequence=5) == {"done": ["completed"]}
    assert executor.calls == []
    assert [e.sequence for e in sink.events] == [5]  # no second response.created
    assert sink.kinds() == [LoopEventKind.COMPLETED]


async def test_a_handed_over_loop_leaves_its_steps_for_another_process(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def slow(args: Any) -> int:
        await trio.sleep(10)
        return 1

    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    with trio.move_on_after(1):
        await run(store, FakeExecutor({"t": slow}), handed_over=lambda: True)
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.PROCESSING
    assert await store.get_response("r") is None  # not finished: resumable


class StallOnFirstDone(ListSink):
    """Takes every event except the first ``output_item.done``, on which it blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False

    async def emit(self, event: LoopEvent) -> None:
        if event.kind is LoopEventKind.OUTPUT_ITEM_DONE and not self.stalled:
            self.stalled = True
            await trio.sleep_forever()
        await super().emit(event)


async def test_an_event_whose_send_was_cancelled_does_not_use_up_a_sequence(
    autojump_clock: trio.abc.Clock,
) -> None:
    # "fast" is stuck delivering its output_item.done when "slow"'s store write fails and
    # cancels the fan-out; the response.failed that follows must take the unsent number.
    async def slow(args: Any) -> int:
        await trio.sleep(1)
        return 2

    store = BrokenStore(
        tools_then_complete(StepDescriptor.tool_call("fast"), StepDescriptor.tool_call("slow")),
        "complete_step",
        after=1,
    )
    sink = StallOnFirstDone()
    with trio.fail_after(5), pytest.raises(LoopError):
        await run(store, FakeExecutor({"fast": 1, "slow": slow}), sink=sink)
    assert sink.stalled
    assert sink.kinds()[-1] is LoopEventKind.FAILED
    assert [e.sequence for e in sink.events] == list(range(len(sink.events)))


class CancelThenBreak(MemoryStore):
    """``complete_step`` cancels ``scope`` and then fails: a store error with a cancellation
    pending."""

    scope: trio.CancelScope

    async def complete_step(self, step_id: str, payload: Any) -> None:
        self.scope.cancel()
        raise StoreError(StoreErrorKind.STORAGE, "disk on fire")


async def test_a_store_error_with_a_cancellation_pending_still_writes_the_response() -> None:
    store = CancelThenBreak(tools_then_complete(StepDescriptor.tool_call("t")))
    with trio.CancelScope() as scope:
        store.scope = scope
        with contextlib.suppress(LoopError):
            await run(store, FakeExecutor({"t": 1}))
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.CANCELED


class CrashingSink(ListSink):
    async def emit(self, event: LoopEvent) -> None:
        if event.kind is LoopEventKind.OUTPUT_ITEM_ADDED:
            raise RuntimeError("sink bug")
        await super().emit(event)


async def test_an_unexpected_crash_writes_the_response_failed() -> None:
    store = MemoryStore(tools_then_complete(StepDescriptor.tool_call("t")))
    with pytest.raises(RuntimeError):
        await run(store, FakeExecutor({"t": 1}), sink=CrashingSink())
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED
    assert rec.output["error"]["code"] == "server_error"
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.CANCELED
