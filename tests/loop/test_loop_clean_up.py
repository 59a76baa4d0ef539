"""What a loop that ends early leaves in the store: every step it left open is closed with the
reason (cancelled or aborted), also inside a sub-agent, and a step the store cannot close is
logged with its traceback.

Each test kills a mutant of ``_Run._clean_up`` that survived the rest of the suite
(docs/testing-quality.md). Fakes only, under ``autojump_clock``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from onwards_trio import LoopError, MemoryStore, run_response_loop
from onwards_trio._loop.steps import StepState, StoreError, StoreErrorKind
from onwards_trio._loop.tools import ToolKind
from tests.loop.test_loop_cancel import CTX, REQUEST, all_steps, new_store, scenario
from tests.loop.test_loop_helpers import (
    BrokenStore,
    FakeExecutor,
    FakeModel,
    Reply,
    chat,
    sse,
    stream_text,
    tool_call,
)


async def test_a_step_open_when_the_loop_is_cancelled_is_closed_as_canceled(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = await new_store()
    model, executor = scenario()
    with trio.move_on_after(0.75):  # during the first model call's stream
        await run_response_loop(store, executor, CTX, model, request_id="r")
    (step,) = await all_steps(store)
    assert (step.state, step.error) == (StepState.CANCELED, {"type": "canceled"})


async def test_a_step_open_when_the_store_fails_is_closed_as_aborted(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = BrokenStore(None, "complete_step")
    await store.begin_response("r", REQUEST)
    model, executor = scenario()
    with pytest.raises(LoopError):
        await run_response_loop(store, executor, CTX, model, request_id="r")
    (step,) = await all_steps(store)
    assert (step.state, step.error) == (StepState.CANCELED, {"type": "aborted"})


async def test_a_sub_agent_cancelled_mid_step_closes_its_own_open_step(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The top level asks its "helper" agent; the helper's model call is cancelled mid-stream.
    model = FakeModel(
        [
            Reply(body=chat(None, tool_calls=[tool_call("call_h", "helper", '{"input":"go"}')])),
            Reply(chunks=stream_text("a", "b", "c"), chunk_delay=5),
        ]
    )
    store = await new_store()
    executor = FakeExecutor(kinds={"helper": ToolKind.AGENT})
    with trio.move_on_after(7):
        await run_response_loop(store, executor, CTX, model, request_id="r")
    steps = await all_steps(store)
    assert len(steps) == 3  # the model call, the agent tool call, the helper's model call
    inner = steps[-1]
    assert inner.parent_step_id == steps[1].id
    assert (inner.state, inner.error) == (StepState.CANCELED, {"type": "canceled"})


class UncancellableStore(MemoryStore):
    async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
        await trio.lowlevel.checkpoint()
        raise StoreError(StoreErrorKind.STORAGE, "disk on fire")


async def test_a_step_the_store_cannot_close_is_logged_with_the_traceback(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = UncancellableStore()
    await store.begin_response("r", REQUEST)
    model = FakeModel(Reply(chunks=sse({"choices": []}), chunk_delay=5))
    with caplog.at_level(logging.WARNING, logger="onwards_trio.loop"):
        with trio.move_on_after(1):
            await run_response_loop(store, FakeExecutor(), CTX, model, request_id="r")
    (step,) = await all_steps(store)
    (record,) = [r for r in caplog.records if r.name == "onwards_trio.loop"]
    assert record.getMessage() == f"could not cancel step {step.id}"
    assert record.exc_info is not None and "disk on fire" in str(record.exc_info[1])


class UnfinishableStore(MemoryStore):
    async def finish_response(self, request_id: str, status: Any, output: Any = None) -> None:
        await trio.lowlevel.checkpoint()
        raise StoreError(StoreErrorKind.STORAGE, "disk on fire")


async def test_a_response_the_store_cannot_finish_is_logged_with_the_traceback(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = UnfinishableStore()
    await store.begin_response("r", REQUEST)
    model = FakeModel(Reply(chunks=sse({"choices": []}), chunk_delay=5))
    with caplog.at_level(logging.WARNING, logger="onwards_trio.loop"):
        with trio.move_on_after(1):
            await run_response_loop(store, FakeExecutor(), CTX, model, request_id="r")
    (record,) = [r for r in caplog.records if r.name == "onwards_trio.loop"]
    assert record.getMessage() == "could not finish response r"
    assert record.exc_info is not None and "disk on fire" in str(record.exc_info[1])
