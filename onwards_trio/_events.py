"""Loop events and their transport: :class:`LoopEvent`, the :class:`EventSink` protocol, the
memory-channel :class:`ChannelSink`, and :func:`open_response_stream`.

A consumer (an SSE response, or any Trio code) iterates the receive end of a bounded memory
channel; the bounded buffer is the backpressure. Delivery is best effort by design: a receiver
that is closed or gone makes the sink stop quietly, and the loop carries on persisting its steps.

``LoopEvent.sequence`` is per response and increases by exactly one per event, so it can be an
SSE ``id:`` and a ``Last-Event-ID`` / ``starting_after`` cursor. ``data`` is the Open Responses
event body without ``type`` and ``sequence_number``; :meth:`LoopEvent.wire` adds both.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import orjson
import trio

from ._sse import encode_event

if TYPE_CHECKING:
    from ._loop import LoopConfig
    from ._model import ModelTransport
    from ._steps import MultiStepStore
    from ._tools import RequestContext, ToolExecutor

__all__ = [
    "ChannelSink",
    "EventSink",
    "LoopEvent",
    "LoopEventKind",
    "open_response_stream",
]


class LoopEventKind(enum.StrEnum):
    """Event kinds; the value is the wire name (``event:`` line / ``type`` field)."""

    CREATED = "response.created"
    IN_PROGRESS = "response.in_progress"
    OUTPUT_ITEM_ADDED = "response.output_item.added"
    OUTPUT_ITEM_DONE = "response.output_item.done"
    CONTENT_PART_ADDED = "response.content_part.added"
    CONTENT_PART_DONE = "response.content_part.done"
    OUTPUT_TEXT_DELTA = "response.output_text.delta"
    OUTPUT_TEXT_DONE = "response.output_text.done"
    FUNCTION_CALL_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
    FUNCTION_CALL_ARGUMENTS_DONE = "response.function_call_arguments.done"
    REASONING_SUMMARY_PART_ADDED = "response.reasoning_summary_part.added"
    REASONING_SUMMARY_PART_DONE = "response.reasoning_summary_part.done"
    REASONING_SUMMARY_TEXT_DELTA = "response.reasoning_summary_text.delta"
    REASONING_SUMMARY_TEXT_DONE = "response.reasoning_summary_text.done"
    REASONING_TEXT_DELTA = "response.reasoning_text.delta"
    REASONING_TEXT_DONE = "response.reasoning_text.done"
    COMPLETED = "response.completed"
    FAILED = "response.failed"
    INCOMPLETE = "response.incomplete"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({LoopEventKind.COMPLETED, LoopEventKind.FAILED, LoopEventKind.INCOMPLETE})


@attrs.frozen
class LoopEvent:
    sequence: int
    kind: LoopEventKind
    data: Mapping[str, Any]

    def wire(self) -> dict[str, Any]:
        """The Open Responses event object: ``type``, the data, ``sequence_number``."""
        return {"type": self.kind.value, **self.data, "sequence_number": self.sequence}

    def sse(self) -> bytes:
        """One SSE event (``event:``, ``id:`` = sequence, ``data:`` = :meth:`wire`)."""
        return encode_event(orjson.dumps(self.wire()), event=self.kind.value, id=self.sequence)


class EventSink(Protocol):
    async def emit(self, event: LoopEvent) -> None:
        """Deliver one event. Must not raise (except ``trio.Cancelled``): delivery problems are
        the sink's to absorb, never the loop's."""
        ...


class ChannelSink:
    """An :class:`EventSink` over a ``trio.MemorySendChannel``.

    ``emit`` waits while the buffer is full (backpressure). Once the receive end is closed the
    sink marks itself ``closed`` and drops further events without waiting.
    """

    def __init__(self, channel: trio.MemorySendChannel[LoopEvent]) -> None:
        self.channel = channel
        self.closed = False

    async def emit(self, event: LoopEvent) -> None:
        if self.closed:
            return
        try:
            await self.channel.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    def close(self) -> None:
        """Close the send end: the consumer's ``async for`` ends after the buffered events."""
        self.closed = True
        self.channel.close()


@asynccontextmanager
async def open_response_stream(
    store: MultiStepStore,
    executor: ToolExecutor,
    ctx: RequestContext,
    model: ModelTransport,
    *,
    request_id: str,
    config: LoopConfig | None = None,
    buffer_size: int = 64,
    nursery: trio.Nursery | None = None,
    response: Mapping[str, Any] | None = None,
    first_sequence: int = 0,
) -> AsyncIterator[trio.MemoryReceiveChannel[LoopEvent]]:
    """Run one response loop and hand the caller the receive end of its event channel.

    The loop runs in ``nursery`` if one is given (a service nursery that outlives the consumer:
    the loop then survives the consumer's cancellation), else in a nursery opened here (leaving
    the block waits for the loop, and cancelling the caller's scope cancels it, with its steps
    persisted as ``canceled``). When the consumer leaves the block, delivery stops at once;
    ``config.on_disconnect`` decides whether the loop goes on (``CONTINUE``) or its upstream
    work is cancelled (``CANCEL``). The channel ends after the terminal event. A
    :class:`~onwards_trio.LoopError` is not raised here: it was already sent as
    ``response.failed`` and written to the store.
    """
    from ._loop import DisconnectPolicy, LoopConfig, LoopError, run_response_loop

    cfg = config if config is not None else LoopConfig()
    send, recv = trio.open_memory_channel[LoopEvent](buffer_size)
    sink = ChannelSink(send)
    loop_scope = trio.CancelScope()

    async def runner() -> None:
        with loop_scope:
            try:
                await run_response_loop(
                    store,
                    executor,
                    ctx,
                    model,
                    request_id=request_id,
                    sink=sink,
                    config=cfg,
                    response=response,
                    first_sequence=first_sequence,
                )
            except LoopError:
                pass  # reported as response.failed and persisted by the loop
            finally:
                sink.close()

    async with trio.open_nursery() as own:
        (nursery or own).start_soon(runner)
        try:
            async with recv:
                yield recv
        finally:
            sink.closed = True
            if cfg.on_disconnect is DisconnectPolicy.CANCEL:
                loop_scope.cancel()
