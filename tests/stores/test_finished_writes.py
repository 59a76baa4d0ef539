"""A finished foreground response written in one call (``write_finished``): the Response
object, the loop's response rows and its steps together, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from onwards_trio._loop.steps import ResponseStatus, StepDescriptor, StepState
from onwards_trio._stores.base import FinishedResponse, FinishedWriter, StoreBackend, StoredResponse
from onwards_trio._stores.memory import MemoryBackend, MemoryStore
from onwards_trio._stores.postgres import PostgresBackend
from onwards_trio._stores.sqlite import SqliteBackend
from tests.stores.test_store_postgres import fresh_schema, needs_postgres

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    b: StoreBackend
    if request.param == "postgres":
        async with fresh_schema() as dsn:
            b = PostgresBackend(dsn)
            try:
                yield b
            finally:
                await b.aclose()
        return
    b = MemoryBackend() if request.param == "memory" else SqliteBackend(tmp_path / "s.sqlite3")
    try:
        yield b
    finally:
        await b.aclose()


def response(status: str, **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": status, "output": [], **extra}


async def loop_rows() -> MemoryStore:
    """What a loop leaves in memory: a response with a model step and a tool step whose
    sub-agent scope has a step of its own, and the sub-agent's response row."""
    steps = MemoryStore()
    await steps.begin_response("resp_1", CHAT)
    model = await steps.record_step("resp_1", None, None, StepDescriptor.model_call(CHAT))
    await steps.mark_step_processing(model.id)
    await steps.complete_step(model.id, ANSWER)
    tool = await steps.record_step("resp_1", None, model.id, StepDescriptor.tool_call("helper"))
    await steps.begin_response("agent_1", CHAT)
    sub = await steps.record_step("resp_1", tool.id, None, StepDescriptor.model_call(CHAT))
    await steps.fail_step(sub.id, {"type": "executor_error"})
    await steps.complete_step(tool.id, "done")
    await steps.finish_response("agent_1", ResponseStatus.FAILED, None)
    await steps.finish_response("resp_1", ResponseStatus.COMPLETED, response("completed"))
    return steps


async def finished(new: bool, status: str = "completed") -> FinishedResponse:
    rows, steps = (await loop_rows()).contents()
    record = StoredResponse("resp_1", response(status), input_items=[{"type": "message"}])
    return FinishedResponse(record, new, rows, steps)


def writer(backend: StoreBackend) -> FinishedWriter:
    assert isinstance(backend, FinishedWriter)
    return backend


async def test_a_new_response_is_stored_whole(backend: StoreBackend) -> None:
    assert await writer(backend).write_finished(await finished(new=True))
    got = await backend.responses.get("resp_1")
    assert got is not None
    assert (got.status, got.input_items) == ("completed", [{"type": "message"}])
    chain = await backend.steps.list_chain("resp_1", None)
    assert [(s.kind.value, s.state, s.sequence) for s in chain] == [
        ("model_call", StepState.COMPLETED, 1),
        ("tool_call", StepState.COMPLETED, 2),
    ]
    assert (chain[0].request_payload, chain[0].response_payload) == (CHAT, ANSWER)
    assert chain[1].prev_step_id == chain[0].id
    (sub,) = await backend.steps.list_chain("resp_1", chain[1].id)
    assert (sub.state, sub.error) == (StepState.FAILED, {"type": "executor_error"})
    loop = await backend.steps.get_response("resp_1")
    assert loop is not None
    assert (loop.status, loop.request, loop.output) == (
        ResponseStatus.COMPLETED,
        CHAT,
        response("completed"),
    )
    agent = await backend.steps.get_response("agent_1")
    assert agent is not None and agent.status is ResponseStatus.FAILED


async def test_a_created_response_moves_to_its_final_state(backend: StoreBackend) -> None:
    await backend.responses.create(StoredResponse("resp_1", response("in_progress")))
    assert await writer(backend).write_finished(await finished(new=False))
    got = await backend.responses.get("resp_1")
    assert got is not None and got.status == "completed"
    assert len(await backend.steps.list_chain("resp_1", None)) == 2


async def test_a_response_deleted_meanwhile_is_not_written_back(backend: StoreBackend) -> None:
    assert not await writer(backend).write_finished(await finished(new=False))
    assert await backend.responses.get("resp_1") is None
    assert await backend.steps.list_chain("resp_1", None) == []
    assert await backend.steps.get_response("resp_1") is None


async def test_a_refused_status_move_writes_nothing(backend: StoreBackend) -> None:
    await backend.responses.create(StoredResponse("resp_1", response("cancelled")))
    assert not await writer(backend).write_finished(await finished(new=False))
    got = await backend.responses.get("resp_1")
    assert got is not None and got.status == "cancelled"
    assert await backend.steps.list_chain("resp_1", None) == []


async def test_a_failing_write_leaves_nothing_behind(backend: StoreBackend) -> None:
    await backend.responses.create(StoredResponse("resp_1", response("in_progress")))
    with pytest.raises(ValueError, match="already exists"):
        await writer(backend).write_finished(await finished(new=True))
    got = await backend.responses.get("resp_1")
    assert got is not None and got.status == "in_progress"
    assert await backend.steps.list_chain("resp_1", None) == []


async def test_a_later_step_continues_the_sequence(backend: StoreBackend) -> None:
    await writer(backend).write_finished(await finished(new=True))
    step = await backend.steps.record_step("resp_1", None, None, StepDescriptor.model_call(CHAT))
    assert step.sequence == 4  # the model step, the tool step and its sub-agent's step
