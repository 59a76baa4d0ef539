"""Loop events and their transport: :class:`LoopEvent`, the :class:`EventSink` protocol, the
memory-channel :class:`ChannelSink` (``run.open_response_stream`` runs a loop into one).

A consumer (an SSE response, or any Trio code) iterates the receive end of a bounded memory
channel; the bounded buffer is the backpressure. Delivery is best effort by design: a receiver
that is closed or gone makes the sink stop quietly, and the loop carries on persisting its steps.

``LoopEvent.sequence`` is per response and increases by exactly one per event, so it can be an
SSE ``id:`` and a ``Last-Event-ID`` / ``starting_after`` cursor. ``data`` is the Open Responses
event body without ``type`` and ``sequence_number``; :meth:`LoopEvent.wire` adds both.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import orjson
import trio

from onwards_trio._transport.sse import encode_event

__all__ = [
    "ChannelSink",
    "EventSink",
    "LoopEvent",
    "LoopEventKind",
]


class LoopEventKind(enum.StrEnum):
    """Event kinds; the value is the wire name (``event:`` line / ``type`` field)."""

    CREATED = "response.created"
    QUEUED = "response.queued"
    IN_PROGRESS = "response.in_progress"
    OUTPUT_ITEM_ADDED = "response.output_item.added"
    OUTPUT_ITEM_DONE = "response.output_item.done"
    CONTENT_PART_ADDED = "response.content_part.added"
    CONTENT_PART_DONE = "response.content_part.done"
    OUTPUT_TEXT_DELTA = "response.output_text.delta"
    OUTPUT_TEXT_DONE = "response.output_text.done"
    OUTPUT_TEXT_ANNOTATION_ADDED = "response.output_text.annotation.added"
    REFUSAL_DELTA = "response.refusal.delta"
    REFUSAL_DONE = "response.refusal.done"
    FUNCTION_CALL_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
    FUNCTION_CALL_ARGUMENTS_DONE = "response.function_call_arguments.done"
    REASONING_SUMMARY_PART_ADDED = "response.reasoning_summary_part.added"
    REASONING_SUMMARY_PART_DONE = "response.reasoning_summary_part.done"
    REASONING_SUMMARY_TEXT_DELTA = "response.reasoning_summary_text.delta"
    REASONING_SUMMARY_TEXT_DONE = "response.reasoning_summary_text.done"
    REASONING_TEXT_DELTA = "response.reasoning_text.delta"
    REASONING_TEXT_DONE = "response.reasoning_text.done"
    # MCP tools of a Responses request (``_responses.mcp_tools`` turns function calls into these).
    MCP_LIST_TOOLS_IN_PROGRESS = "response.mcp_list_tools.in_progress"
    MCP_LIST_TOOLS_COMPLETED = "response.mcp_list_tools.completed"
    MCP_CALL_IN_PROGRESS = "response.mcp_call.in_progress"
    MCP_CALL_ARGUMENTS_DELTA = "response.mcp_call_arguments.delta"
    MCP_CALL_ARGUMENTS_DONE = "response.mcp_call_arguments.done"
    MCP_CALL_COMPLETED = "response.mcp_call.completed"
    MCP_CALL_FAILED = "response.mcp_call.failed"
    REASONING_DELTA = "response.reasoning.delta"  # the spec's name for raw reasoning deltas
    REASONING_DONE = "response.reasoning.done"
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
    """Where a loop's events go. A sink may also say ``quiet = True`` (an attribute; absent
    means False): it only wants ``response.output_item.done`` and the terminal event (a
    non-streamed answer), so the loop does not build the others (their sequence numbers are
    still used up)."""

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
