"""SQLite group commit: calls queued behind a running batch run together, each atomic alone."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from onwards_trio._stores.sqlite import SqliteFile, transaction

SCHEMA = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"


class Boom(Exception):
    pass


def _insert(key: str, value: int = 1) -> Callable[[sqlite3.Connection], str]:
    def fn(db: sqlite3.Connection) -> str:
        db.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))
        return key

    return fn


def _rows(db: sqlite3.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT k, v FROM t").fetchall())


@pytest.fixture
async def file(tmp_path: Path) -> SqliteFile:
    return SqliteFile(str(tmp_path / "g.db"), SCHEMA)


async def _in_batch(
    file: SqliteFile, fns: list[Callable[[sqlite3.Connection], object]]
) -> list[object]:
    """Run ``fns`` concurrently while a first call holds the worker thread, so they queue up
    and run as one batch; returns each one's result or exception."""
    release = trio.Event()

    def blocker(db: sqlite3.Connection) -> None:
        trio.from_thread.run(release.wait)  # holds the worker thread until the others are queued

    results: list[object] = [None] * len(fns)

    async def one(i: int, fn: Callable[[sqlite3.Connection], object]) -> None:
        try:
            results[i] = await file.run(fn)
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(file.run, blocker)
        await trio.sleep(0.05)
        for i, fn in enumerate(fns):
            nursery.start_soon(one, i, fn)
        await trio.testing.wait_all_tasks_blocked()
        assert len(file._queue) == len(fns)  # all queued behind the running call
        release.set()
    return results


async def test_queued_calls_all_commit_and_return_their_results(file: SqliteFile) -> None:
    results = await _in_batch(file, [_insert(f"k{i}", i) for i in range(20)])
    assert results == [f"k{i}" for i in range(20)]
    assert await file.run(_rows) == {f"k{i}": i for i in range(20)}
    await file.aclose()


async def test_a_failing_call_rolls_back_only_its_own_writes(file: SqliteFile) -> None:
    def half_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (k, v) VALUES ('bad', 1)")
        raise Boom

    def nested_fails(db: sqlite3.Connection) -> None:
        with transaction(db, "BEGIN IMMEDIATE"):  # a savepoint inside the batch
            db.execute("INSERT INTO t (k, v) VALUES ('nested', 1)")
            raise Boom

    results = await _in_batch(file, [_insert("a"), half_then_fail, nested_fails, _insert("b")])
    assert results[0] == "a" and results[3] == "b"
    assert isinstance(results[1], Boom) and isinstance(results[2], Boom)
    assert await file.run(_rows) == {"a": 1, "b": 1}
    await file.aclose()


async def test_a_sqlite_error_is_mapped_per_call(tmp_path: Path) -> None:
    file = SqliteFile(str(tmp_path / "e.db"), SCHEMA, on_error=lambda e: Boom(str(e)))
    results = await _in_batch(file, [_insert("x"), _insert("x"), _insert("y")])
    # Whichever of the two "x" inserts ran second fails alone.
    assert sorted(map(type, results[:2]), key=str) == sorted([str, Boom], key=str)
    assert results[2] == "y"
    assert await file.run(_rows) == {"x": 1, "y": 1}
    await file.aclose()


async def test_a_queued_call_cancelled_before_its_batch_never_runs(file: SqliteFile) -> None:
    release = trio.Event()

    def blocker(db: sqlite3.Connection) -> None:
        trio.from_thread.run(release.wait)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(file.run, blocker)
        await trio.sleep(0.05)
        with trio.CancelScope() as scope:
            nursery.start_soon(file.run, _insert("kept"))
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await file.run(_insert("dropped"))
        release.set()
    assert await file.run(_rows) == {"kept": 1}
    await file.aclose()
