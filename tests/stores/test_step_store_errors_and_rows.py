"""The step store (every backend) at its edges: what its errors say, what a response row keeps
when its loop begins again, that what it stores is a copy, and that each call is a checkpoint.
Then the memory store of one response (``private``), which keeps payloads as given.

Each test kills a mutant of ``_stores/memory.py`` that survived the rest of the suite
(docs/testing-quality.md)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from onwards_trio import MemoryStore
from onwards_trio._loop.steps import (
    MultiStepStore,
    ResponseStatus,
    StepDescriptor,
    StepState,
    StoreError,
    StoreErrorKind,
)
from tests.stores.test_store import store as store  # the fixture: memory, SQLite, PostgreSQL

CHAT = {"model": "m", "messages": [{"role": "user", "content": "a"}]}


async def test_an_unserialisable_result_is_refused_with_the_reason(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, StepDescriptor.model_call(CHAT))
    with pytest.raises(StoreError) as info:
        await store.complete_step(rec.id, {"x": object()})
    assert info.value.kind is StoreErrorKind.SERIALIZATION
    assert "not JSON serializable" in info.value.message


async def test_an_unknown_step_is_named_in_its_error(store: MultiStepStore) -> None:
    with pytest.raises(StoreError) as info:
        await store.get_step("step_nope")
    assert info.value.message == "step step_nope"


async def test_a_refused_move_names_the_step_and_its_state(store: MultiStepStore) -> None:
    rec = await store.record_step("a", None, None, StepDescriptor.model_call(CHAT))
    await store.mark_step_processing(rec.id)
    with pytest.raises(StoreError) as again:
        await store.mark_step_processing(rec.id)
    await store.complete_step(rec.id, {})
    with pytest.raises(StoreError) as done:
        await store.fail_step(rec.id, {})
    assert again.value.message == f"step {rec.id} is processing"
    assert done.value.message == f"step {rec.id} is completed"


async def test_an_unknown_response_is_named_in_its_error(store: MultiStepStore) -> None:
    with pytest.raises(StoreError) as info:
        await store.assemble_response("resp_nope")
    assert info.value.message == "resp_nope"


async def test_a_response_begun_again_without_a_request_keeps_its_request(
    store: MultiStepStore,
) -> None:
    # a resumed loop begins its response again with no request
    await store.begin_response("r", CHAT)
    await store.finish_response("r", ResponseStatus.FAILED, {"output": []})
    await store.begin_response("r", None)
    rec = await store.get_response("r")
    assert rec is not None
    assert (rec.id, rec.status, rec.request, rec.output) == (
        "r",
        ResponseStatus.IN_PROGRESS,
        CHAT,
        None,
    )


async def test_a_response_begun_again_with_a_request_takes_the_new_one(
    store: MultiStepStore,
) -> None:
    await store.begin_response("r", CHAT)
    await store.begin_response("r", {"model": "other", "messages": []})
    rec = await store.get_response("r")
    assert rec is not None and rec.request == {"model": "other", "messages": []}


async def test_a_stored_result_error_and_output_are_copies(store: MultiStepStore) -> None:
    one = await store.record_step("a", None, None, StepDescriptor.model_call(CHAT))
    two = await store.record_step("a", None, None, StepDescriptor.model_call(CHAT))
    result: dict[str, Any] = {"choices": [1]}
    error: dict[str, Any] = {"type": "boom"}
    output: dict[str, Any] = {"output": [1]}
    await store.complete_step(one.id, result)
    await store.fail_step(two.id, error)
    await store.finish_response("a", ResponseStatus.COMPLETED, output)
    result["choices"].append(2)
    error["type"] = "changed"
    output["output"].append(2)
    assert (await store.get_step(one.id)).response_payload == {"choices": [1]}
    assert (await store.get_step(two.id)).error == {"type": "boom"}
    assert await store.assemble_response("a") == {"output": [1]}


async def test_every_call_of_a_shared_store_is_a_checkpoint(store: MultiStepStore) -> None:
    # Trio's rule for a library's async calls: each one lets other tasks run and can be
    # cancelled, so a loop writing many steps cannot starve the rest of the gateway.
    with trio.testing.assert_checkpoints():
        rec = await store.record_step("a", None, None, StepDescriptor.model_call(CHAT))
    with trio.testing.assert_checkpoints():
        await store.mark_step_processing(rec.id)
    with trio.testing.assert_checkpoints():
        await store.complete_step(rec.id, {})
    with trio.testing.assert_checkpoints():
        await store.get_step(rec.id)
    with trio.testing.assert_checkpoints():
        await store.begin_response("a", CHAT)
    with trio.testing.assert_checkpoints():
        await store.get_response("a")


async def test_a_private_store_keeps_payloads_as_given_until_its_response_is_written() -> None:
    # One response's own store copies nothing: what cannot be serialised fails only when the
    # finished response is written (test_finished_writes), not at each step.
    steps = MemoryStore(private=True)
    payload = {"model": "m", "messages": [], "extra": object()}
    rec = await steps.record_step("a", None, None, StepDescriptor.model_call(payload))
    result = {"choices": [], "extra": object()}
    await steps.complete_step(rec.id, result)
    _, rows = steps.contents()
    ((request_id, step),) = rows
    assert (request_id, step.state) == ("a", StepState.COMPLETED)
    assert step.request_payload is payload and step.response_payload is result
