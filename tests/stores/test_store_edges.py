"""The stores at their edges: a retention delete larger than one chunk, the streamed flag of a
usage group, an empty replayed body, and a backend closed while its task is cancelled.

Each test kills a mutant of ``_stores/base.py`` that survived the rest of the suite
(docs/testing-quality.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from onwards_trio import MemoryResponseStore, MemoryStore, StoreBackend
from onwards_trio._proxy.ledger import UsageQuery, UsageRow
from onwards_trio._stores.base import DurableStore
from onwards_trio._stores.memory import MemoryDurableStore
from onwards_trio._stores.postgres import PostgresDatabase, PostgresDurableStore
from onwards_trio._stores.sqlite import SqliteDurableStore
from tests.stores.test_store_postgres import fresh_schema, needs_postgres
from tests.stores.test_usage_store import T0, open_store

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)]


def row(i: int, *, streamed: bool = False) -> UsageRow:
    return UsageRow(T0 + i, f"r{i}", "k", "m", 0, "m", 1, 1, 0, None, 200, 1.0, "/v1/c", streamed)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_retention_delete_larger_than_a_chunk_removes_and_counts_every_row(
    kind: str, tmp_path: Path
) -> None:
    # The SQL stores delete in chunks of 10,000 rows; a month of usage is many chunks.
    n = 20_500
    async with open_store(kind, tmp_path) as store:
        with trio.fail_after(120):
            await store.add_usage([row(i) for i in range(n)])
            assert await store.delete_usage_before(T0 + n) == n
            assert await store.usage_rows(UsageQuery(0, 1e12), 0, 10) == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_usage_group_says_streamed_as_a_boolean(kind: str, tmp_path: Path) -> None:
    # SQLite keeps the flag as 0/1; a summary shows true/false whatever the backend.
    async with open_store(kind, tmp_path) as store:
        with trio.fail_after(30):
            await store.add_usage([row(1, streamed=True), row(2)])
            groups = await store.summarize_usage(UsageQuery(0, 1e12, ("streamed",)), 10)
    assert sorted((g["streamed"], type(g["streamed"])) for g in groups) == [
        (False, bool),
        (True, bool),
    ]


@contextlib.asynccontextmanager
async def durable_store(kind: str, tmp_path: Path) -> AsyncIterator[DurableStore]:
    if kind == "memory":
        yield MemoryDurableStore()
        return
    async with contextlib.AsyncExitStack() as stack:
        store: DurableStore
        if kind == "sqlite":
            store = SqliteDurableStore(str(tmp_path / "d.sqlite3"))
        else:
            store = PostgresDurableStore(
                PostgresDatabase(await stack.enter_async_context(fresh_schema()))
            )
        try:
            yield store
        finally:
            await store.aclose()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_an_empty_response_body_is_replayed_empty(kind: str, tmp_path: Path) -> None:
    async with durable_store(kind, tmp_path) as store:
        with trio.fail_after(30):
            assert await store.idempotency_begin("s", "k", "f", "A", 60.0, 60.0) is None
            await store.idempotency_finish("s", "k", "A", 204, [], b"")
            seen = await store.idempotency_get("s", "k")
    assert seen is not None
    assert (seen.state, seen.status, seen.body) == ("done", 204, b"")


class ClosingSteps(MemoryStore):
    closed = False

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


class ClosingResponses(MemoryResponseStore):
    closed = False

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


async def test_a_backend_closed_while_cancelled_closes_both_stores() -> None:
    # Shutdown closes the backend from a task being cancelled: connections must still close.
    steps, responses = ClosingSteps(), ClosingResponses()
    backend = StoreBackend(steps, responses)
    with trio.CancelScope() as scope:
        scope.cancel()
        await backend.aclose()
    assert (responses.closed, steps.closed) == (True, True)
