"""Cancellation: the consumer leaves at every event and every store boundary, and each time the
store ends clean (no step pending/processing, the response's final state written) and no work
is left running.

The scenario is the default Open Responses loop: a streamed model call asking for two server
tools (a fan-out), the two tools, then a streamed answer. Fakes only, under ``autojump_clock``,
except the SQLite cases, which use the real clock (worker threads and autojump do not mix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._loop.events import LoopEvent, LoopEventKind
from onwards_trio._loop.run import (
    DisconnectPolicy,
    LoopConfig,
    LoopError,
    open_response_stream,
    run_response_loop,
)
from onwards_trio._loop.steps import MultiStepStore, ResponseStatus, StepState
from onwards_trio._loop.tools import RequestContext
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._stores.sqlite import SqliteStore
from tests.loop.test_loop_helpers import FakeExecutor, FakeModel, Reply, chunk, sse, stream_text

CTX = RequestContext(model="m")
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True}
N_EVENTS = 22  # created, in_progress, 8 function-call, 4 tool-output, 7 message, completed


def tool_call_chunks() -> list[bytes]:
    calls = [
        {
            "index": 0,
            "id": "call_a",
            "type": "function",
            "function": {"name": "slow", "arguments": ""},
        },
        {
            "index": 1,
            "id": "call_b",
            "type": "function",
            "function": {"name": "slow", "arguments": ""},
        },
    ]
    return sse(
        chunk({"role": "assistant", "tool_calls": calls[:1]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":1}'}}]}),
        chunk({"tool_calls": calls[1:]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"x":2}'}}]}),
        chunk({}, "tool_calls"),
    )


def scenario(delay: float = 1.0) -> tuple[FakeModel, FakeExecutor]:
    model = FakeModel(
        [
            Reply(chunks=tool_call_chunks(), chunk_delay=delay / 2),
            Reply(chunks=stream_text("Hello", " world"), chunk_delay=delay / 2),
        ]
    )
    executor = FakeExecutor({"slow": "done"}, delay=delay)
    return model, executor


async def new_store() -> MemoryStore:
    store = MemoryStore()
    await store.begin_response("r", REQUEST)
    return store


async def all_steps(store: MultiStepStore, scope: str | None = None) -> list[Any]:
    out = []
    for step in await store.list_chain("r", scope):
        out.append(step)
        out.extend(await all_steps(store, step.id))
    return out


async def assert_clean(
    store: MultiStepStore, model: FakeModel, executor: FakeExecutor
) -> ResponseStatus:
    steps = await all_steps(store)
    assert all(s.state.is_terminal for s in steps), [s.state for s in steps]
    rec = await store.get_response("r")
    assert rec is not None and rec.status.is_terminal
    if rec.status is ResponseStatus.COMPLETED:
        assert all(s.state is StepState.COMPLETED for s in steps)
    assert model.active == 0 and model.closed == len(model.requests)
    assert executor.active == 0
    return rec.status


async def test_scenario_emits_the_expected_events(autojump_clock: trio.abc.Clock) -> None:
    store = await new_store()
    model, executor = scenario()
    async with open_response_stream(store, executor, CTX, model, request_id="r") as recv:
        events = [e async for e in recv]
    assert len(events) == N_EVENTS
    assert events[-1].kind is LoopEventKind.COMPLETED
    assert await assert_clean(store, model, executor) is ResponseStatus.COMPLETED


@pytest.mark.parametrize("k", range(N_EVENTS))
async def test_cancelling_the_consumer_after_each_event_cancels_the_loop(
    k: int, autojump_clock: trio.abc.Clock
) -> None:
    store = await new_store()
    model, executor = scenario()
    received: list[LoopEvent] = []
    with trio.CancelScope() as consumer:
        async with open_response_stream(
            store, executor, CTX, model, request_id="r", buffer_size=0
        ) as recv:
            async for ev in recv:
                received.append(ev)
                if len(received) == k + 1:
                    consumer.cancel()
    assert [e.sequence for e in received] == list(range(k + 1))  # delivery stopped at once
    status = await assert_clean(store, model, executor)
    if k < N_EVENTS - 2:  # the last two events come after the work finished
        assert status is ResponseStatus.CANCELLED


@pytest.mark.parametrize("k", range(0, N_EVENTS, 3))
async def test_consumer_cancelled_loop_in_service_nursery_goes_on(
    k: int, autojump_clock: trio.abc.Clock
) -> None:
    store = await new_store()
    model, executor = scenario()
    received: list[LoopEvent] = []
    async with trio.open_nursery() as service:
        with trio.CancelScope() as consumer:
            async with open_response_stream(
                store, executor, CTX, model, request_id="r", buffer_size=0, nursery=service
            ) as recv:
                async for ev in recv:
                    received.append(ev)
                    if len(received) == k + 1:
                        consumer.cancel()
    assert len(received) == k + 1
    assert await assert_clean(store, model, executor) is ResponseStatus.COMPLETED
    assert len(await all_steps(store)) == 4  # model, two tools, model


@pytest.mark.parametrize("k", range(0, N_EVENTS - 2, 3))
async def test_cancel_policy_stops_upstream_work_when_the_consumer_leaves(
    k: int, autojump_clock: trio.abc.Clock
) -> None:
    store = await new_store()
    model, executor = scenario()
    config = LoopConfig(on_disconnect=DisconnectPolicy.CANCEL)
    async with (
        trio.open_nursery() as service,
        open_response_stream(
            store,
            executor,
            CTX,
            model,
            request_id="r",
            buffer_size=0,
            nursery=service,
            config=config,
        ) as recv,
    ):
        n = 0
        async for _ in recv:
            n += 1
            if n == k + 1:
                break
    assert await assert_clean(store, model, executor) is ResponseStatus.CANCELLED
    assert len(model.requests) <= 2


async def test_leaving_early_without_a_nursery_lets_the_loop_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = await new_store()
    model, executor = scenario()
    async with open_response_stream(store, executor, CTX, model, request_id="r") as recv:
        async for _ in recv:
            break  # delivery stops; the default policy lets the work finish
    assert await assert_clean(store, model, executor) is ResponseStatus.COMPLETED


async def test_cancel_mid_stream_closes_the_upstream_and_cancels_the_step(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = await new_store()
    model, executor = scenario()
    with trio.CancelScope() as consumer:
        async with open_response_stream(store, executor, CTX, model, request_id="r") as recv:
            async for ev in recv:
                if ev.kind is LoopEventKind.OUTPUT_TEXT_DELTA:
                    consumer.cancel()
    await assert_clean(store, model, executor)
    steps = await all_steps(store)
    assert [s.state for s in steps] == [
        StepState.COMPLETED,
        StepState.COMPLETED,
        StepState.COMPLETED,
        StepState.CANCELED,
    ]


BOUNDARIES = [
    (method, n)
    for method, count in (
        ("next_action_for", 3),
        ("record_step", 4),
        ("mark_step_processing", 4),
        ("complete_step", 4),
    )
    for n in range(1, count + 1)
]


class CancellingStore:
    """Wraps a store; cancels ``scope`` when ``method`` is entered for the ``n``-th time (the
    call itself then meets the cancellation at its first checkpoint) or, with ``after=True``,
    right after it returns."""

    def __init__(self, inner: Any, method: str, n: int, after: bool) -> None:
        self.inner = inner
        self.method = method
        self.n = n
        self.after = after
        self.count = 0
        self.scope = trio.CancelScope()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            hit = self.count == self.n
            if hit and not self.after:
                self.scope.cancel()
            result = await attr(*args, **kwargs)
            if hit and self.after:
                self.scope.cancel()
            return result

        return hooked


@pytest.mark.parametrize("after", [False, True], ids=["entering", "returned"])
@pytest.mark.parametrize(("method", "n"), BOUNDARIES)
async def test_cancel_at_every_store_boundary(
    method: str, n: int, after: bool, autojump_clock: trio.abc.Clock
) -> None:
    inner = await new_store()
    store = CancellingStore(inner, method, n, after)
    model, executor = scenario()
    with store.scope:
        await run_response_loop(store, executor, CTX, model, request_id="r")
    assert store.scope.cancelled_caught
    assert await assert_clean(inner, model, executor) is ResponseStatus.CANCELLED


@pytest.mark.parametrize(
    ("method", "n"),
    [("record_step", 2), ("mark_step_processing", 3), ("complete_step", 1), ("complete_step", 4)],
)
async def test_cancel_at_store_boundaries_with_sqlite(method: str, n: int, tmp_path: Path) -> None:
    inner = SqliteStore(tmp_path / "c.db")
    try:
        await inner.begin_response("r", REQUEST)
        store = CancellingStore(inner, method, n, False)
        model, executor = scenario(delay=0.01)
        with trio.fail_after(10):
            with store.scope:
                await run_response_loop(store, executor, CTX, model, request_id="r")
        assert await assert_clean(inner, model, executor) is ResponseStatus.CANCELLED
    finally:
        await inner.aclose()


async def test_shielded_clean_up_has_its_own_deadline(autojump_clock: trio.abc.Clock) -> None:
    class HangingCancel(MemoryStore):
        async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
            await trio.sleep_forever()
            raise AssertionError

    store = HangingCancel()
    await store.begin_response("r", REQUEST)
    model, executor = scenario()
    config = LoopConfig(persist_timeout=3)
    start = trio.current_time()
    with trio.move_on_after(0.1):
        await run_response_loop(store, executor, CTX, model, request_id="r", config=config)
    assert 3 <= trio.current_time() - start < 4  # cancelled at 0.1, clean-up gave up at +3


async def test_cancellation_is_not_swallowed(autojump_clock: trio.abc.Clock) -> None:
    store = await new_store()
    model, executor = scenario()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await run_response_loop(store, executor, CTX, model, request_id="r")
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.CANCELLED


async def test_loop_error_is_not_raised_by_the_stream_helper(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()  # no request recorded: the default transition fails the response
    model, executor = scenario()
    async with open_response_stream(store, executor, CTX, model, request_id="r") as recv:
        events = [e async for e in recv]
    assert [e.kind for e in events][-1] is LoopEventKind.FAILED
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.FAILED
    with pytest.raises(LoopError):
        await run_response_loop(store, executor, CTX, model, request_id="r2")
