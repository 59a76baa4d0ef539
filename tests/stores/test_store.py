"""The shared MultiStepStore suite: every store implementation must pass all of it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._loop.steps import (
    AppendSteps,
    Complete,
    MultiStepStore,
    NextAction,
    ResponseStatus,
    StepDescriptor,
    StepKind,
    StepState,
    StoreError,
    StoreErrorKind,
)
from onwards_trio._loop.tools import ToolSchema
from onwards_trio._loop.transition import ScopeView
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._stores.postgres import PostgresStore
from onwards_trio._stores.sqlite import SqliteStore, transaction
from tests.stores.test_store_postgres import fresh_schema, needs_postgres

MODEL = StepDescriptor.model_call({"model": "m", "messages": []})
TOOL = StepDescriptor.tool_call("add", {"x": 1}, call_id="call_1")

seen_views: list[ScopeView] = []


def recording_transition(view: ScopeView) -> NextAction:
    seen_views.append(view)
    return Complete({"chain": len(view.chain)})


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MultiStepStore]:
    seen_views.clear()
    if request.param == "memory":
        yield MemoryStore(recording_transition)
    elif request.param == "postgres":
        async with fresh_schema() as dsn:
            pg = PostgresStore(dsn, recording_transition)
            try:
                yield pg
            finally:
                await pg.aclose()
    else:
        s = SqliteStore(tmp_path / "loop.db", recording_transition)
        try:
            yield s
        finally:
            await s.aclose()


async def test_sequences_start_at_one_and_increase_per_request(store: MultiStepStore) -> None:
    a1 = await store.record_step("a", None, None, MODEL)
    a2 = await store.record_step("a", None, a1.id, TOOL)
    b1 = await store.record_step("b", None, None, MODEL)
    assert (a1.sequence, a2.sequence, b1.sequence) == (1, 2, 1)
    assert len({a1.id, a2.id, b1.id}) == 3


async def test_sequences_are_shared_across_scopes_of_one_request(store: MultiStepStore) -> None:
    top = await store.record_step("a", None, None, TOOL)
    sub = await store.record_step("a", top.id, None, MODEL)
    assert sub.sequence == top.sequence + 1


async def test_list_chain_filters_by_scope_and_orders_by_sequence(store: MultiStepStore) -> None:
    s1 = await store.record_step("a", None, None, MODEL)
    sub = await store.record_step("a", s1.id, None, MODEL)
    s2 = await store.record_step("a", None, s1.id, TOOL)
    await store.record_step("other", None, None, MODEL)
    top = await store.list_chain("a", None)
    assert [s.id for s in top] == [s1.id, s2.id]
    assert [s.prev_step_id for s in top] == [None, s1.id]
    assert [s.kind for s in top] == [StepKind.MODEL_CALL, StepKind.TOOL_CALL]
    inner = await store.list_chain("a", s1.id)
    assert [s.id for s in inner] == [sub.id]
    assert inner[0].parent_step_id == s1.id


async def test_new_step_is_pending_with_its_request_payload(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, TOOL)
    step = await store.get_step(rec.id)
    assert step.state is StepState.PENDING
    assert step.request_payload == {"name": "add", "args": {"x": 1}, "call_id": "call_1"}
    assert step.response_payload is None and step.error is None


async def test_complete_path_stores_payload(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.mark_step_processing(rec.id)
    assert (await store.get_step(rec.id)).state is StepState.PROCESSING
    await store.complete_step(rec.id, {"text": "héllo ✓", "n": [1, 2.5, None]})
    step = await store.get_step(rec.id)
    assert step.state is StepState.COMPLETED
    assert step.response_payload == {"text": "héllo ✓", "n": [1, 2.5, None]}


async def test_fail_path_stores_error(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.mark_step_processing(rec.id)
    await store.fail_step(rec.id, {"type": "executor_error", "message": "boom"})
    step = await store.get_step(rec.id)
    assert step.state is StepState.FAILED
    assert step.error == {"type": "executor_error", "message": "boom"}


async def test_pending_step_can_fail_directly(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, TOOL)
    await store.fail_step(rec.id, {"message": "never ran"})
    assert (await store.get_step(rec.id)).state is StepState.FAILED


async def test_mark_processing_twice_is_a_conflict(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.mark_step_processing(rec.id)
    with pytest.raises(StoreError) as info:
        await store.mark_step_processing(rec.id)
    assert info.value.kind is StoreErrorKind.CONFLICT


async def test_terminal_steps_cannot_change(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.mark_step_processing(rec.id)
    await store.complete_step(rec.id, {"ok": True})
    for call in (
        store.complete_step(rec.id, {"ok": False}),
        store.fail_step(rec.id, {"message": "late"}),
    ):
        with pytest.raises(StoreError) as info:
            await call
        assert info.value.kind is StoreErrorKind.CONFLICT
    assert (await store.get_step(rec.id)).response_payload == {"ok": True}


@pytest.mark.parametrize("start", ["pending", "processing"])
async def test_cancel_step_moves_open_steps_to_canceled(store: MultiStepStore, start: str) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    if start == "processing":
        await store.mark_step_processing(rec.id)
    assert await store.cancel_step(rec.id, {"type": "canceled"}) is True
    step = await store.get_step(rec.id)
    assert step.state is StepState.CANCELED
    assert step.error == {"type": "canceled"}


async def test_cancel_step_leaves_terminal_steps_alone(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.mark_step_processing(rec.id)
    await store.fail_step(rec.id, {"message": "x"})
    assert await store.cancel_step(rec.id) is False
    step = await store.get_step(rec.id)
    assert step.state is StepState.FAILED and step.error == {"message": "x"}


async def test_completing_a_canceled_step_is_a_conflict(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, MODEL)
    await store.cancel_step(rec.id)
    with pytest.raises(StoreError) as info:
        await store.complete_step(rec.id, {})
    assert info.value.kind is StoreErrorKind.CONFLICT


async def test_unknown_step_is_not_found(store: MultiStepStore) -> None:
    for call in (
        store.get_step("step_nope"),
        store.mark_step_processing("step_nope"),
        store.complete_step("step_nope", {}),
        store.fail_step("step_nope", {}),
        store.cancel_step("step_nope"),
    ):
        with pytest.raises(StoreError) as info:
            await call
        assert info.value.kind is StoreErrorKind.NOT_FOUND


async def test_stored_payload_is_a_copy(store: MultiStepStore) -> None:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": "a"}]}
    rec = await store.record_step("a", None, None, StepDescriptor.model_call(payload))
    payload["messages"].append("mutated")
    assert (await store.get_step(rec.id)).request_payload == {
        "messages": [{"role": "user", "content": "a"}]
    }


async def test_unserialisable_payload_is_a_serialization_error(store: MultiStepStore) -> None:
    with pytest.raises(StoreError) as info:
        await store.record_step("a", None, None, StepDescriptor.model_call({"x": object()}))
    assert info.value.kind is StoreErrorKind.SERIALIZATION
    assert await store.list_chain("a", None) == []


async def test_response_row_lifecycle(store: MultiStepStore) -> None:
    assert await store.get_response("r") is None
    await store.begin_response("r", {"model": "m", "messages": []})
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.IN_PROGRESS
    assert rec.request == {"model": "m", "messages": []}
    await store.finish_response("r", ResponseStatus.COMPLETED, {"output": [1]})
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.COMPLETED
    assert rec.request == {"model": "m", "messages": []}
    assert rec.output == {"output": [1]}
    assert await store.assemble_response("r") == {"output": [1]}


async def test_finish_response_without_begin_creates_the_row(store: MultiStepStore) -> None:
    await store.finish_response("r", ResponseStatus.CANCELLED)
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.CANCELLED and rec.request is None


async def test_assemble_unknown_response_is_not_found(store: MultiStepStore) -> None:
    with pytest.raises(StoreError) as info:
        await store.assemble_response("nope")
    assert info.value.kind is StoreErrorKind.NOT_FOUND


async def test_next_action_for_gives_the_transition_a_full_view(store: MultiStepStore) -> None:
    await store.begin_response("r", {"model": "m", "messages": []})
    parent = await store.record_step("r", None, None, TOOL)
    await store.record_step("r", parent.id, None, MODEL)
    tools = {"add": ToolSchema("add")}
    action = await store.next_action_for("r", parent.id, tools)
    assert action == Complete({"chain": 1})
    view = seen_views[-1]
    assert view.request_id == "r" and view.scope_parent == parent.id
    assert view.parent_step is not None and view.parent_step.id == parent.id
    assert view.response is not None and view.response.request == {"model": "m", "messages": []}
    assert view.tools == tools


async def test_concurrent_record_step_allocates_distinct_sequences(store: MultiStepStore) -> None:
    sequences: list[int] = []

    async def record() -> None:
        sequences.append((await store.record_step("a", None, None, MODEL)).sequence)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(record)
    assert sorted(sequences) == list(range(1, 21))


async def test_default_transition_starts_with_the_recorded_request(tmp_path: Path) -> None:
    sqlite = SqliteStore(tmp_path / "d.db")
    for store in (MemoryStore(), sqlite):
        await store.begin_response(
            "r", {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        )
        action = await store.next_action_for("r", None, {})
        assert isinstance(action, AppendSteps)
        assert action.steps[0].kind is StepKind.MODEL_CALL
        assert action.steps[0].request_payload["messages"] == [{"role": "user", "content": "q"}]
    await sqlite.aclose()


async def test_sqlite_file_survives_a_new_store_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    async with SqliteStore(path) as first:
        rec = await first.record_step("a", None, None, MODEL)
        await first.mark_step_processing(rec.id)
        await first.complete_step(rec.id, {"ok": 1})
    async with SqliteStore(path) as second:
        chain = await second.list_chain("a", None)
        assert [(s.id, s.state, s.response_payload) for s in chain] == [
            (rec.id, StepState.COMPLETED, {"ok": 1})
        ]
        nxt = await second.record_step("a", None, rec.id, TOOL)
        assert nxt.sequence == 2
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_sqlite_errors_become_store_errors(tmp_path: Path) -> None:
    bad = tmp_path / "dir-not-file"
    bad.mkdir()
    store = SqliteStore(bad)
    with pytest.raises(StoreError) as info:
        await store.list_chain("a", None)
    assert info.value.kind is StoreErrorKind.STORAGE


def test_a_transaction_whose_commit_fails_is_rolled_back() -> None:
    # A deferred foreign key fails at COMMIT: the connection must not stay in the transaction
    # (the next BEGIN IMMEDIATE of record_step would fail forever after).
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(
        "CREATE TABLE p (id INTEGER PRIMARY KEY);"
        "CREATE TABLE c (pid INTEGER REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED);"
    )
    with pytest.raises(sqlite3.IntegrityError), transaction(db):
        db.execute("INSERT INTO c VALUES (1)")
    assert not db.in_transaction
    db.close()
