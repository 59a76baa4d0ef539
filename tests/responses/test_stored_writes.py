"""What is in the store when a client gets the answer of a stored foreground response: its
final state and its steps, written in one call (docs/stores.md, "What is on disk")."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from onwards_trio._loop.steps import StepState
from onwards_trio._stores.base import FinishedResponse
from onwards_trio._stores.memory import MemoryBackend
from onwards_trio._stores.sqlite import SqliteFile
from tests.responses.test_responses_api import sdk, start, text_reply
from tests.support import FakeUpstream


async def test_a_stored_answer_is_one_store_call_and_is_stored_when_it_arrives(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "r.sqlite3")}
    gateway, client, _ = await start(
        nursery, FakeUpstream(lambda rec: text_reply(rec)), store=store
    )
    calls: list[str] = []
    run, insert = SqliteFile.run, SqliteFile.insert

    def note(fn: Callable[[sqlite3.Connection], Any]) -> None:
        if not fn.__qualname__.startswith("SqliteDurableStore."):  # leases: not this request's
            calls.append(fn.__qualname__)

    async def counted(
        self: SqliteFile, fn: Callable[[sqlite3.Connection], Any], within: float | None = None
    ) -> Any:
        note(fn)
        return await run(self, fn, within)

    async def counted_insert(
        self: SqliteFile,
        fn: Callable[[sqlite3.Connection], Any],
        rows: Any,
        value: Any,
        within: float | None = None,
    ) -> Any:
        note(fn)
        return await insert(self, fn, rows, value, within)

    monkeypatch.setattr(SqliteFile, "run", counted)
    monkeypatch.setattr(SqliteFile, "insert", counted_insert)
    resp = await sdk(lambda: client.responses.create(model="m", input="hi"))
    assert resp.output_text == "Hello world"
    assert len(calls) == 1, calls  # the response, its loop row and its step, together
    stored = gateway.responses.response_store
    steps = gateway.responses.step_store
    assert stored is not None and steps is not None
    record = await stored.get(resp.id)
    assert record is not None and record.status == "completed"
    assert record.output == resp.model_dump(mode="json")["output"]
    assert [s.state for s in await steps.list_chain(resp.id, None)] == [StepState.COMPLETED]


async def test_an_answer_whose_final_state_cannot_be_stored_is_an_error(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: MemoryBackend, finished: FinishedResponse) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(MemoryBackend, "write_finished", broken)
    _, _, gw_url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    async with httpx.AsyncClient(timeout=15) as http:
        r = await http.post(gw_url + "/v1/responses", json={"model": "m", "input": "hi"})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "Hello" not in r.text


async def start_on_sqlite(nursery: trio.Nursery, path: Path) -> Any:
    return await start(
        nursery,
        FakeUpstream(lambda rec: text_reply(rec)),
        store={"kind": "sqlite", "path": str(path)},
    )


async def test_the_answer_is_the_stored_response_object_byte_for_byte(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "r.sqlite3"
    _, _, gw_url = await start_on_sqlite(nursery, path)
    async with httpx.AsyncClient(timeout=15) as http:
        r = await http.post(gw_url + "/v1/responses", json={"model": "m", "input": "hi"})
    assert r.status_code == 200
    with sqlite3.connect(path) as db:
        (stored,) = db.execute(
            "SELECT response FROM oresp_responses WHERE id = ?", (r.json()["id"],)
        ).fetchone()
    assert r.content == stored.encode()
    assert orjson.loads(stored)["status"] == "completed"


async def test_response_and_step_ids_begin_with_their_creation_time(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "r.sqlite3"
    _, client, _ = await start_on_sqlite(nursery, path)
    ids = []
    for _ in range(3):
        before = time.time_ns() // 1_000_000
        resp = await sdk(lambda: client.responses.create(model="m", input="hi"))
        after = time.time_ns() // 1_000_000
        assert re.fullmatch(r"resp_[0-9a-f]{48}", resp.id)
        assert before <= int(resp.id[5:17], 16) <= after  # later ids sort later
        ids.append(resp.id)
    with sqlite3.connect(path) as db:
        steps = db.execute("SELECT id, request_id FROM loop_steps").fetchall()
    assert {request_id for _, request_id in steps} == set(ids)
    for step_id, request_id in steps:
        assert re.fullmatch(r"step_[0-9a-f]{36}", step_id)
        assert step_id[5:17] >= request_id[5:17]  # made after its response


async def stream_events(gw_url: str, on_terminal: Callable[[str], Any] | None = None) -> list[Any]:
    events: list[Any] = []
    body = {"model": "m", "input": "hi", "stream": True}
    async with (
        httpx.AsyncClient(timeout=15) as http,
        http.stream("POST", gw_url + "/v1/responses", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                events.append(event)
                snapshot = event.get("response")
                ended = snapshot is not None and snapshot["status"] not in (
                    "queued",
                    "in_progress",
                )
                if on_terminal is not None and ended:
                    await on_terminal(snapshot["id"])
    return events


async def test_a_streamed_response_is_stored_before_its_last_event_is_sent(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = MemoryBackend.write_finished

    async def slow(self: MemoryBackend, finished: FinishedResponse) -> bool:
        await trio.sleep(0.3)  # a slow disk: the last event must wait for it
        return await write(self, finished)

    monkeypatch.setattr(MemoryBackend, "write_finished", slow)
    gateway, _, gw_url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    seen: list[str] = []

    async def check(rid: str) -> None:
        store = gateway.responses.response_store
        assert store is not None
        record = await store.get(rid)
        seen.append(record.status if record is not None else "missing")

    events = await stream_events(gw_url, check)
    assert events[-1]["type"] == "response.completed"
    assert seen == ["completed"]


async def test_a_stream_whose_final_state_cannot_be_stored_ends_failed(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: MemoryBackend, finished: FinishedResponse) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(MemoryBackend, "write_finished", broken)
    _, client, gw_url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    events = await stream_events(gw_url)
    last = events[-1]
    assert last["type"] == "response.failed"
    assert last["response"]["error"]["message"] == "The response could not be stored."
    retrieved = await sdk(lambda: client.responses.retrieve(last["response"]["id"]))
    assert retrieved.status == "in_progress"  # as created; its end was never stored
