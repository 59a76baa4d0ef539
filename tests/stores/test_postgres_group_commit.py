"""PostgreSQL group commit: writes queued behind running batches share one transaction, each
call atomic alone (the same contract as ``test_sqlite_group_commit.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import trio

from onwards_trio._stores.postgres import PostgresDatabase
from tests.stores.test_store_postgres import fresh_schema, needs_postgres

pytestmark = needs_postgres

Conn = psycopg.Connection[Any]


class Boom(Exception):
    pass


@pytest.fixture
async def db() -> AsyncIterator[PostgresDatabase]:
    async with fresh_schema() as dsn:
        database = PostgresDatabase(dsn, pool_size=1)  # one slot: the second write queues
        try:
            await database.run(
                lambda conn: conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int NOT NULL)")
            )
            yield database
        finally:
            await database.aclose()


def insert(key: str, value: int = 1) -> Callable[[Conn], int]:
    """Insert a row; return the id of the transaction that wrote it."""

    def fn(conn: Conn) -> int:
        conn.execute("INSERT INTO t (k, v) VALUES (%s, %s)", (key, value))
        row = conn.execute("SELECT txid_current()").fetchone()
        assert row is not None
        return int(row[0])

    return fn


def rows(conn: Conn) -> dict[str, int]:
    return dict(conn.execute("SELECT k, v FROM t").fetchall())


async def _hold_writer(nursery: trio.Nursery, db: PostgresDatabase) -> trio.Event:
    """Start a write that holds the only slot until the returned event is set, and wait until
    it runs: writes made meanwhile queue behind it."""
    started, release = trio.Event(), trio.Event()

    def blocker(conn: Conn) -> None:
        trio.from_thread.run_sync(started.set)
        trio.from_thread.run(release.wait)

    nursery.start_soon(db.write, blocker)
    await started.wait()
    return release


async def in_batch(db: PostgresDatabase, fns: list[Callable[[Conn], Any]]) -> list[Any]:
    """Run ``fns`` concurrently while a first write holds the only slot, so they queue up and
    run as one batch; returns each one's result or exception."""
    results: list[Any] = [None] * len(fns)

    async def one(i: int, fn: Callable[[Conn], Any]) -> None:
        try:
            results[i] = await db.write(fn)
        except Exception as exc:
            results[i] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(nursery, db)
            for i, fn in enumerate(fns):
                nursery.start_soon(one, i, fn)
            await trio.testing.wait_all_tasks_blocked()
            assert len(db._group.queue) == len(fns)  # all queued behind the running write
            release.set()
    return results


async def test_queued_writes_share_one_transaction(db: PostgresDatabase) -> None:
    txids = await in_batch(db, [insert(f"k{i}", i) for i in range(20)])
    assert len(set(txids)) == 1  # one transaction, one commit
    assert await db.run(rows) == {f"k{i}": i for i in range(20)}


async def test_a_lone_write_runs_alone(db: PostgresDatabase) -> None:
    first = await db.write(insert("a"))
    second = await db.write(insert("b"))
    assert first != second


async def test_a_failing_write_rolls_back_only_its_own(db: PostgresDatabase) -> None:
    def half_then_fail(conn: Conn) -> None:
        conn.execute("INSERT INTO t (k, v) VALUES ('bad', 1)")
        raise Boom

    def nested_fails(conn: Conn) -> None:
        with conn.transaction():
            conn.execute("INSERT INTO t (k, v) VALUES ('nested', 1)")
            raise Boom

    results = await in_batch(db, [insert("a"), half_then_fail, nested_fails, insert("b")])
    assert isinstance(results[1], Boom) and isinstance(results[2], Boom)
    assert results[0] == results[3]
    assert await db.run(rows) == {"a": 1, "b": 1}


async def test_a_database_error_is_mapped_per_call(db: PostgresDatabase) -> None:
    results = await in_batch(db, [insert("x"), insert("x"), insert("y")])
    # Whichever of the two "x" inserts ran second fails alone, as a StoreError.
    assert sorted(type(r).__name__ for r in results[:2]) == ["StoreError", "int"]
    assert isinstance(results[2], int)
    assert await db.run(rows) == {"x": 1, "y": 1}


async def test_a_queued_write_cancelled_before_its_batch_never_runs(
    db: PostgresDatabase,
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(nursery, db)
            with trio.CancelScope() as scope:
                nursery.start_soon(db.write, insert("kept"))
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await db.write(insert("dropped"))
            release.set()
    assert await db.run(rows) == {"kept": 1}


async def test_a_write_given_start_within_runs_though_its_caller_is_cancelled(
    db: PostgresDatabase,
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(nursery, db)
            with trio.CancelScope() as scope:
                scope.cancel()
                nursery.start_soon(_set, release)
                assert isinstance(await db.write(insert("shielded"), 30), int)
    assert await db.run(rows) == {"shielded": 1}


async def test_a_write_that_loses_a_deadlock_is_run_again_alone(db: PostgresDatabase) -> None:
    """Two batches lock the same two rows in opposite orders: PostgreSQL aborts one call
    (``deadlock detected``); it runs again alone once its batch has committed, so both
    calls succeed."""
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('p', 0), ('q', 0)"))
    wide = PostgresDatabase(db.dsn, pool_size=2)
    wide._group.max_batch = 2  # two batches of two
    release = [trio.Event(), trio.Event()]
    locked = [trio.Event(), trio.Event()]
    go = trio.Event()

    def blocker(n: int) -> Callable[[Conn], None]:
        def fn(conn: Conn) -> None:
            trio.from_thread.run(release[n].wait)

        return fn

    def cross(first: str, second: str, n: int) -> Callable[[Conn], str]:
        def fn(conn: Conn) -> str:
            conn.execute("UPDATE t SET v = v + 1 WHERE k = %s", (first,))
            trio.from_thread.run_sync(locked[n].set)
            if n == 0:
                trio.from_thread.run(go.wait)
            conn.execute("UPDATE t SET v = v + 1 WHERE k = %s", (second,))
            return first

        return fn

    results: list[Any] = []

    async def write(fn: Callable[[Conn], Any]) -> None:
        try:
            results.append(await wide.write(fn))
        except Exception as e:
            results.append(e)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for fn in (blocker(0), blocker(1)):  # both slots taken
                    nursery.start_soon(wide.write, fn)
                    await trio.testing.wait_all_tasks_blocked()
                queued: list[Callable[[Conn], Any]] = [
                    cross("p", "q", 0),
                    insert("n0"),
                    cross("q", "p", 1),
                    insert("n1"),
                ]
                for call in queued:
                    nursery.start_soon(write, call)  # queued in this order
                    await trio.testing.wait_all_tasks_blocked()
                release[0].set()  # batch [p then q, n0]: locks p, waits
                await locked[0].wait()
                release[1].set()  # batch [q then p, n1]: locks q, waits for p
                await locked[1].wait()
                go.set()  # the first batch's call now wants q: a deadlock
        assert sorted(r for r in results if isinstance(r, str)) == ["p", "q"], results
        assert await db.run(rows) == {"p": 2, "q": 2, "n0": 1, "n1": 1}
    finally:
        await wide.aclose()


async def _set(event: trio.Event) -> None:
    event.set()
