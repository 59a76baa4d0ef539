"""A stored Response keeps its input and context items, and what is stored or read is a copy:
created with ``create``, written whole at its end (``write_finished``), and read with ``get``,
in every backend.

Each test kills a mutant of ``_stores/memory.py`` that survived the rest of the suite
(docs/testing-quality.md)."""

from __future__ import annotations

from typing import Any

from onwards_trio._stores.base import (
    FinishedResponse,
    ResponseStore,
    StoreBackend,
    StoredEvent,
    StoredResponse,
)
from tests.stores.test_finished_writes import backend as backend  # the fixture
from tests.stores.test_finished_writes import loop_rows, response, writer
from tests.stores.test_response_store import record
from tests.stores.test_response_store import store as store  # the fixture

INPUT = [{"type": "message", "id": "msg_2", "role": "user", "content": []}]
CONTEXT = [{"type": "message", "id": "msg_1", "role": "user", "content": []}]


def items() -> dict[str, Any]:
    return {"input_items": [dict(i) for i in INPUT], "context_items": [dict(i) for i in CONTEXT]}


def mutate(rec: StoredResponse) -> None:
    rec.response["status"] = "failed"
    rec.input_items.append({"type": "changed"})
    rec.context_items.append({"type": "changed"})


async def test_a_created_response_keeps_its_items_as_they_were(store: ResponseStore) -> None:
    created = record(**items())
    await store.create(created)
    mutate(created)
    got = await store.get("resp_1")
    assert got is not None
    assert (got.status, got.input_items, got.context_items) == ("queued", INPUT, CONTEXT)


async def test_a_read_response_is_a_copy(store: ResponseStore) -> None:
    await store.create(record(**items()))
    first = await store.get("resp_1")
    assert first is not None
    mutate(first)
    got = await store.get("resp_1")
    assert got is not None
    assert (got.status, got.input_items, got.context_items) == ("queued", INPUT, CONTEXT)


async def test_a_response_written_whole_keeps_its_items_as_they_were(
    backend: StoreBackend,
) -> None:
    rows, steps = (await loop_rows()).contents()
    written = StoredResponse("resp_1", response("completed"), **items())
    assert await writer(backend).write_finished(FinishedResponse(written, True, rows, steps))
    mutate(written)
    got = await backend.responses.get("resp_1")
    assert got is not None
    assert (got.status, got.input_items, got.context_items) == ("completed", INPUT, CONTEXT)


async def test_a_response_written_whole_takes_events(backend: StoreBackend) -> None:
    rows, steps = (await loop_rows()).contents()
    written = StoredResponse("resp_1", response("completed"))
    await writer(backend).write_finished(FinishedResponse(written, True, rows, steps))
    event = StoredEvent(1, "response.completed", b'{"type":"response.completed"}')
    await backend.responses.append_events("resp_1", [event])
    assert await backend.responses.events_after("resp_1", 0) == [event]


async def test_the_steps_of_a_response_written_whole_are_read_by_id(
    backend: StoreBackend,
) -> None:
    rows, steps = (await loop_rows()).contents()
    written = StoredResponse("resp_1", response("completed"))
    await writer(backend).write_finished(FinishedResponse(written, True, rows, steps))
    for _, step in steps:
        got = await backend.steps.get_step(step.id)
        assert (got.state, got.sequence) == (step.state, step.sequence)
