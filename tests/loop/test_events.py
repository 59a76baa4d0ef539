"""LoopEvent wire form, ChannelSink delivery semantics, and backpressure."""

from __future__ import annotations

import orjson
import pytest
import trio

from onwards_trio._loop.events import ChannelSink, LoopEvent, LoopEventKind
from onwards_trio._loop.run import open_response_stream
from onwards_trio._loop.steps import ResponseStatus
from onwards_trio._loop.tools import RequestContext
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._transport.sse import SSEDecoder
from tests.loop.test_loop_helpers import FakeExecutor, FakeModel, Reply, chunk, sse, stream_text

CTX = RequestContext(model="m")
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_wire_names_and_terminals() -> None:
    assert LoopEventKind.CREATED.value == "response.created"
    assert (
        LoopEventKind.FUNCTION_CALL_ARGUMENTS_DELTA.value
        == "response.function_call_arguments.delta"
    )
    assert {k for k in LoopEventKind if k.is_terminal} == {
        LoopEventKind.COMPLETED,
        LoopEventKind.FAILED,
        LoopEventKind.INCOMPLETE,
    }


def test_wire_object_and_sse_framing() -> None:
    ev = LoopEvent(3, LoopEventKind.OUTPUT_TEXT_DELTA, {"item_id": "msg_1", "delta": "hé\nllo"})
    assert ev.wire() == {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "delta": "hé\nllo",
        "sequence_number": 3,
    }
    (decoded,) = SSEDecoder().feed(ev.sse())
    assert decoded.event == "response.output_text.delta"
    assert decoded.id == "3"
    assert orjson.loads(decoded.data) == ev.wire()


async def test_channel_sink_delivers_in_order_and_close_ends_iteration() -> None:
    send, recv = trio.open_memory_channel[LoopEvent](10)
    sink = ChannelSink(send)
    for i in range(3):
        await sink.emit(LoopEvent(i, LoopEventKind.OUTPUT_TEXT_DELTA, {"delta": str(i)}))
    sink.close()
    assert [e.sequence async for e in recv] == [0, 1, 2]


async def test_channel_sink_goes_quiet_when_the_receiver_closes() -> None:
    send, recv = trio.open_memory_channel[LoopEvent](0)
    sink = ChannelSink(send)
    ev = LoopEvent(0, LoopEventKind.CREATED, {})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.emit, ev)  # blocks: nobody receives yet
        await trio.testing.wait_all_tasks_blocked()
        await recv.aclose()  # the blocked send is released, not raised
    assert sink.closed
    with trio.fail_after(1):
        await sink.emit(ev)  # and later emits return at once


async def test_slow_consumer_gets_every_event_in_order(autojump_clock: trio.abc.Clock) -> None:
    async def run(consumer_delay: float) -> list[tuple[int, str, str]]:
        store = MemoryStore()
        await store.begin_response("r", REQUEST)
        model = FakeModel(Reply(chunks=stream_text(*"abcdefghij")))
        got = []
        async with open_response_stream(
            store, FakeExecutor(), CTX, model, request_id="r", buffer_size=1
        ) as recv:
            async for ev in recv:
                got.append((ev.sequence, ev.kind.value, str(ev.data.get("delta", ""))))
                await trio.sleep(consumer_delay)
        return got

    fast = await run(0)
    slow = await run(1.0)
    assert slow == fast
    assert [s for s, _, _ in slow] == list(range(len(slow)))
    assert "".join(d for _, k, d in slow if k == "response.output_text.delta") == "abcdefghij"


async def test_a_full_buffer_holds_the_loop_back(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    await store.begin_response("r", REQUEST)
    model = FakeModel(Reply(chunks=stream_text("x", "y")))
    async with open_response_stream(
        store, FakeExecutor(), CTX, model, request_id="r", buffer_size=1
    ) as recv:
        first = await recv.receive()
        assert first.kind is LoopEventKind.CREATED
        await trio.sleep(60)  # the loop has had all the time it wants
        rec = await store.get_response("r")
        assert rec is not None and rec.status is ResponseStatus.IN_PROGRESS
        assert len(model.requests) <= 1
        rest = [e async for e in recv]
    assert rest[-1].kind is LoopEventKind.COMPLETED
    assert rest[0].sequence == 1


_SDK_NAMES = {
    "response.reasoning.delta": "response.reasoning_text.delta",
    "response.reasoning.done": "response.reasoning_text.done",
}


async def test_every_event_validates_against_the_openai_sdk_types() -> None:
    pydantic = pytest.importorskip("pydantic")
    responses = pytest.importorskip("openai.types.responses")
    adapter = pydantic.TypeAdapter(responses.ResponseStreamEvent)
    calls = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "t", "arguments": ""}}
    ]
    first = sse(
        chunk({"role": "assistant", "tool_calls": calls}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    )
    second = sse(chunk({"reasoning_content": "hm"}), chunk({"content": "hi"}), chunk({}, "stop"))
    store = MemoryStore()
    await store.begin_response("r", REQUEST)
    model = FakeModel([Reply(chunks=first), Reply(chunks=second)])
    seen = set()
    async with open_response_stream(
        store, FakeExecutor({"t": "ok"}), CTX, model, request_id="r"
    ) as recv:
        async for ev in recv:
            # The spec names raw reasoning events response.reasoning.*; the SDK spells the
            # same events (same fields) response.reasoning_text.*.
            wire = {**ev.wire(), "type": _SDK_NAMES.get(ev.kind.value, ev.kind.value)}
            parsed = adapter.validate_python(wire)
            assert parsed.type == wire["type"]
            seen.add(ev.kind)
    assert LoopEventKind.REASONING_DELTA in seen
    assert LoopEventKind.FUNCTION_CALL_ARGUMENTS_DONE in seen
    assert LoopEventKind.COMPLETED in seen
