"""The Response objects a loop puts in its lifecycle events: whole (every field the openai SDK
requires, with its default) and in the status of the event, when the caller passes no echo
of its own (``run_response_loop`` used directly, not through the HTTP layer)."""

from __future__ import annotations

from typing import Any

import pytest

from onwards_trio._loop.events import LoopEventKind
from onwards_trio._loop.run import LoopError, run_response_loop
from onwards_trio._loop.steps import Complete, Fail
from onwards_trio._loop.tools import RequestContext
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop import NO_MODEL, ListSink
from tests.loop.test_loop_helpers import FakeExecutor, scripted


def defaults(model: str) -> dict[str, Any]:
    return {
        "object": "response",
        "model": model,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
    }


async def events_of(store: MemoryStore, model: str | None, **kwargs: Any) -> ListSink:
    sink = ListSink()
    await run_response_loop(
        store,
        FakeExecutor(),
        RequestContext(model=model),
        NO_MODEL,
        request_id="r",
        sink=sink,
        **kwargs,
    )
    return sink


def responses(sink: ListSink) -> dict[LoopEventKind, dict[str, Any]]:
    out = {}
    for event in sink.events:
        response = dict(event.data["response"])
        assert response.pop("id") == "resp_r"
        assert isinstance(response.pop("created_at"), int)
        out[event.kind] = response
    return out


async def test_created_and_in_progress_carry_a_whole_response_in_progress() -> None:
    sink = await events_of(MemoryStore(scripted([Complete({})])), "m")
    got = responses(sink)
    expected = {**defaults("m"), "status": "in_progress"}
    assert got[LoopEventKind.CREATED] == expected
    assert got[LoopEventKind.IN_PROGRESS] == expected


async def test_a_context_without_a_model_names_none() -> None:
    sink = await events_of(MemoryStore(scripted([Complete({})])), None)
    assert responses(sink)[LoopEventKind.CREATED]["model"] == ""


async def test_a_queued_response_starts_in_status_queued() -> None:
    sink = await events_of(MemoryStore(scripted([Complete({})])), "m", queued=True)
    got = responses(sink)
    assert got[LoopEventKind.CREATED] == {**defaults("m"), "status": "queued"}
    assert got[LoopEventKind.QUEUED] == {**defaults("m"), "status": "queued"}
    assert got[LoopEventKind.IN_PROGRESS]["status"] == "in_progress"


async def test_a_failed_response_ends_in_status_failed() -> None:
    store = MemoryStore(scripted([Fail({"code": "nope", "message": "it broke"})]))
    sink = ListSink()
    with pytest.raises(LoopError):
        await run_response_loop(
            store, FakeExecutor(), RequestContext(model="m"), NO_MODEL, request_id="r", sink=sink
        )
    failed = responses(sink)[LoopEventKind.FAILED]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "nope: it broke"}
