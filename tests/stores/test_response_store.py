"""One suite for every ResponseStore implementation (memory, SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._stores.base import ResponseStore, StoredEvent, StoredResponse, can_transition
from onwards_trio._stores.memory import MemoryResponseStore
from onwards_trio._stores.postgres import PostgresResponseStore
from onwards_trio._stores.sqlite import SqliteResponseStore
from tests.stores.test_store_postgres import fresh_schema, needs_postgres


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResponseStore]:
    if request.param == "postgres":
        async with fresh_schema() as dsn:
            pg = PostgresResponseStore(dsn)
            try:
                yield pg
            finally:
                await pg.aclose()
        return
    s: ResponseStore
    if request.param == "memory":
        s = MemoryResponseStore()
    else:
        s = SqliteResponseStore(str(tmp_path / "r.sqlite3"))
    try:
        yield s
    finally:
        await s.aclose()


def resp(rid: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": "response", "status": status, "output": [], **extra}


def record(rid: str = "resp_1", status: str = "queued", **kw: Any) -> StoredResponse:
    return StoredResponse(id=rid, response=resp(rid, status), **kw)


async def test_create_then_get_round_trips(store: ResponseStore) -> None:
    items = [{"type": "message", "id": "msg_1", "role": "user", "content": []}]
    await store.create(record(input_items=items, background=True, owner="k1"))
    got = await store.get("resp_1")
    assert got is not None
    assert got.status == "queued"
    assert got.owner == "k1"
    assert got.input_items == items
    assert got.background is True


async def test_get_unknown_is_none(store: ResponseStore) -> None:
    assert await store.get("resp_nope") is None


async def test_create_twice_is_refused(store: ResponseStore) -> None:
    await store.create(record())
    with pytest.raises(ValueError, match="already exists"):
        await store.create(record())


async def test_status_moves_forward(store: ResponseStore) -> None:
    await store.create(record())
    assert await store.update("resp_1", resp("resp_1", "in_progress"))
    assert await store.update("resp_1", resp("resp_1", "completed", output=[{"type": "x"}]))
    got = await store.get("resp_1")
    assert got is not None
    assert (got.status, got.output) == ("completed", [{"type": "x"}])


async def test_terminal_status_is_final(store: ResponseStore) -> None:
    await store.create(record())
    assert await store.update("resp_1", resp("resp_1", "cancelled"))
    assert not await store.update("resp_1", resp("resp_1", "completed"))
    got = await store.get("resp_1")
    assert got is not None
    assert got.status == "cancelled"


async def test_in_progress_cannot_go_back_to_queued(store: ResponseStore) -> None:
    await store.create(record(status="in_progress"))
    assert not await store.update("resp_1", resp("resp_1", "queued"))


async def test_update_unknown_is_false(store: ResponseStore) -> None:
    assert not await store.update("resp_x", resp("resp_x", "completed"))


async def test_delete_forgets_response_and_events(store: ResponseStore) -> None:
    await store.create(record())
    await store.append_events("resp_1", [StoredEvent(0, "response.created", b"{}")])
    assert await store.delete("resp_1")
    assert await store.get("resp_1") is None
    assert await store.events_after("resp_1", -1) == []
    assert not await store.delete("resp_1")


async def test_events_of_a_deleted_response_are_not_kept(store: ResponseStore) -> None:
    # A background loop still flushing its log after a DELETE must not leave events behind.
    await store.create(record())
    assert await store.delete("resp_1")
    await store.append_events("resp_1", [StoredEvent(0, "response.created", b"{}")])
    assert await store.events_after("resp_1", -1) == []


async def test_events_after_filters_and_orders(store: ResponseStore) -> None:
    await store.create(record())
    events = [StoredEvent(i, f"t{i}", b'{"n":%d}' % i) for i in range(5)]
    await store.append_events("resp_1", events[:3])
    await store.append_events("resp_1", events[3:])
    assert await store.events_after("resp_1", 1) == events[2:]
    assert await store.events_after("resp_1", -1) == events


async def test_stored_json_does_not_alias_the_callers(store: ResponseStore) -> None:
    rec = record()
    await store.create(rec)
    rec.response["status"] = "completed"
    got = await store.get("resp_1")
    assert got is not None
    assert got.status == "queued"


async def test_conversation_is_context_inputs_then_outputs() -> None:
    rec = StoredResponse(
        id="r",
        response=resp("r", "completed", output=[{"id": "o"}]),
        input_items=[{"id": "i"}],
        context_items=[{"id": "c"}],
    )
    assert [x["id"] for x in rec.conversation()] == ["c", "i", "o"]


def test_transition_table() -> None:
    assert can_transition("queued", "in_progress")
    assert can_transition("in_progress", "incomplete")
    assert not can_transition("completed", "failed")
    assert not can_transition("in_progress", "bogus")


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    first = SqliteResponseStore(path)
    await first.create(record())
    await first.append_events("resp_1", [StoredEvent(0, "response.created", b"{}")])
    await first.aclose()
    second = SqliteResponseStore(path)
    try:
        assert (await second.get("resp_1")) is not None
        assert len(await second.events_after("resp_1", -1)) == 1
    finally:
        await second.aclose()


async def test_sqlite_concurrent_writers_serialise(tmp_path: Path) -> None:
    s = SqliteResponseStore(str(tmp_path / "r.sqlite3"))
    try:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(s.create, record(f"resp_{i}"))
        for i in range(20):
            assert await s.get(f"resp_{i}") is not None
    finally:
        await s.aclose()
