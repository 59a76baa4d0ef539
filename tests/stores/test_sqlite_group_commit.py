"""SQLite group commit: calls queued behind a running batch run together, each atomic alone;
new finished responses in a batch are inserted together."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._loop.steps import ResponseStatus, StepDescriptor, StepState
from onwards_trio._stores.base import FinishedResponse, StoredResponse
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._stores.sqlite import SqliteBackend, SqliteFile, transaction

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
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


async def _hold_writer(nursery: trio.Nursery, file: SqliteFile) -> trio.Event:
    """Start a call that holds the writer thread until the returned event is set, and wait
    until it runs: calls made meanwhile queue behind it."""
    started, release = trio.Event(), trio.Event()

    def blocker(db: sqlite3.Connection) -> None:
        trio.from_thread.run_sync(started.set)
        trio.from_thread.run(release.wait)

    nursery.start_soon(file.run, blocker)
    await started.wait()
    return release


async def _in_batch(
    file: SqliteFile, fns: list[Callable[[sqlite3.Connection], object]]
) -> list[object]:
    """Run ``fns`` concurrently while a first call holds the worker thread, so they queue up
    and run as one batch; returns each one's result or exception."""
    results: list[object] = [None] * len(fns)

    async def one(i: int, fn: Callable[[sqlite3.Connection], object]) -> None:
        try:
            results[i] = await file.run(fn)
        except Exception as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        release = await _hold_writer(nursery, file)
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
    async with trio.open_nursery() as nursery:
        release = await _hold_writer(nursery, file)
        with trio.CancelScope() as scope:
            nursery.start_soon(file.run, _insert("kept"))
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await file.run(_insert("dropped"))
        release.set()
    assert await file.run(_rows) == {"kept": 1}
    await file.aclose()


async def test_a_call_given_start_within_runs_though_its_caller_is_cancelled(
    file: SqliteFile,
) -> None:
    async with trio.open_nursery() as nursery:
        release = await _hold_writer(nursery, file)
        with trio.CancelScope() as scope:
            scope.cancel()
            nursery.start_soon(_set, release)  # once the call below is queued, cancelled
            assert await file.run(_insert("shielded"), 30) == "shielded"
            with pytest.raises(trio.Cancelled):  # the cancellation lands afterwards
                await trio.lowlevel.checkpoint()
    assert await file.run(_rows) == {"shielded": 1}
    await file.aclose()


async def test_a_call_not_started_within_its_bound_fails_without_running(
    file: SqliteFile,
) -> None:
    results: list[object] = []

    async def bounded() -> None:
        try:
            results.append(await file.run(_insert("late"), 0))
        except trio.TooSlowError as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        release = await _hold_writer(nursery, file)
        nursery.start_soon(bounded)
        nursery.start_soon(file.run, _insert("unbounded"))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert [type(r) for r in results] == [trio.TooSlowError]
    assert await file.run(_rows) == {"unbounded": 1}  # it ran; the late one did not
    await file.aclose()


async def _finished(response_id: str, **fields: Any) -> FinishedResponse:
    """A new foreground response as the HTTP layer writes it: one completed model step
    (``fields``: more of its record's)."""
    steps = MemoryStore()
    await steps.begin_response(response_id, CHAT)
    step = await steps.record_step(response_id, None, None, StepDescriptor.model_call(CHAT))
    await steps.complete_step(step.id, {"answer": response_id})
    await steps.finish_response(response_id, ResponseStatus.COMPLETED, {"id": response_id})
    rows, chain = steps.contents()
    record = StoredResponse(response_id, {"id": response_id, "status": "completed"}, **fields)
    return FinishedResponse(record, True, rows, chain)


async def _finish_together(
    backend: SqliteBackend, ids: list[str], fields: dict[str, dict[str, Any]] | None = None
) -> dict[str, bool | Exception]:
    """``write_finished`` for each of ``ids``, all queued behind a running call (one batch);
    ``fields``: more record fields by id."""
    started, release = trio.Event(), trio.Event()

    def blocker(db: sqlite3.Connection) -> None:
        trio.from_thread.run_sync(started.set)
        trio.from_thread.run(release.wait)

    finished = [await _finished(i, **(fields or {}).get(i, {})) for i in ids]
    results: dict[str, bool | Exception] = {}

    async def one(f: FinishedResponse) -> None:
        try:
            results[f.record.id] = await backend.write_finished(f)
        except Exception as exc:
            results[f.record.id] = exc

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend._db.run, blocker)
            await started.wait()  # the writer runs it: the others queue behind
            for f in finished:
                nursery.start_soon(one, f)
                await trio.testing.wait_all_tasks_blocked()
            assert len(backend._db._queue) == len(ids)
            release.set()
    return results


async def test_new_responses_finished_together_are_each_stored_whole(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "b.sqlite3")
    ids = [f"resp_{i}" for i in range(12)]
    assert await _finish_together(backend, ids) == {i: True for i in ids}
    for i in ids:
        got = await backend.responses.get(i)
        assert got is not None and got.response == {"id": i, "status": "completed"}
        (step,) = await backend.steps.list_chain(i, None)
        assert (step.state, step.response_payload) == (StepState.COMPLETED, {"answer": i})
        loop = await backend.steps.get_response(i)
        assert loop is not None and loop.output == {"id": i}
    await backend.aclose()


async def test_rows_inserted_together_hold_null_and_integers_as_sqlite_types(
    tmp_path: Path,
) -> None:
    # The batch binds None and bools in a cheaper form than sqlite3's adaptation: the
    # columns must still read NULL and INTEGER in the file, as a lone write leaves them.
    backend = SqliteBackend(tmp_path / "b.sqlite3")
    fields = {"resp_a": {"owner": "alice", "background": True}, "resp_b": {}}
    assert await _finish_together(backend, ["resp_a", "resp_b"], fields) == {
        "resp_a": True,
        "resp_b": True,
    }
    await backend.aclose()
    with contextlib.closing(sqlite3.connect(tmp_path / "b.sqlite3")) as db:
        rows = db.execute(
            "SELECT id, owner, typeof(owner), background, typeof(background) "
            "FROM oresp_responses ORDER BY id"
        ).fetchall()
        steps = db.execute(
            "SELECT typeof(scope_parent), typeof(prev_step_id), typeof(error) FROM loop_steps"
        ).fetchall()
    assert rows == [
        ("resp_a", "alice", "text", 1, "integer"),
        ("resp_b", None, "null", 0, "integer"),
    ]
    assert steps == [("null", "null", "null")] * 2


async def test_a_response_that_exists_fails_alone_in_a_batch(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "b.sqlite3")
    await backend.responses.create(StoredResponse("resp_1", {"status": "in_progress"}))
    results = await _finish_together(backend, ["resp_0", "resp_1", "resp_2"])
    assert results["resp_0"] is True and results["resp_2"] is True
    assert isinstance(results["resp_1"], ValueError)
    got = await backend.responses.get("resp_1")
    assert got is not None and got.status == "in_progress"
    assert await backend.steps.list_chain("resp_1", None) == []
    for i in ("resp_0", "resp_2"):
        assert len(await backend.steps.list_chain(i, None)) == 1
    await backend.aclose()


async def test_a_close_queued_behind_calls_runs_after_them(file: SqliteFile) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(file.run, _insert(f"k{i}", i))
        nursery.start_soon(file.aclose)
    assert await file.run(_rows) == {f"k{i}": i for i in range(5)}
    await file.aclose()


async def _set(event: trio.Event) -> None:
    event.set()
