"""The tools a loop offers come from its executor, asked with the request's context; when
that listing fails, the failed response says so and why."""

from __future__ import annotations

from typing import Any

import pytest

from onwards_trio._loop.run import LoopError
from onwards_trio._loop.steps import Complete
from onwards_trio._loop.tools import RequestContext
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop import CTX, run
from tests.loop.test_loop_helpers import FakeExecutor, scripted


async def test_the_executor_lists_the_tools_for_the_requests_context() -> None:
    asked: list[Any] = []

    class Listing(FakeExecutor):
        async def tools(self, ctx: RequestContext) -> Any:
            asked.append(ctx)
            return await super().tools(ctx)

    await run(MemoryStore(scripted([Complete({})])), Listing())
    assert asked == [CTX]


async def test_a_failed_listing_is_named_in_the_failed_response() -> None:
    class NoTools(FakeExecutor):
        async def tools(self, ctx: RequestContext) -> Any:
            raise RuntimeError("registry down")

    store = MemoryStore(scripted([Complete({})]))
    with pytest.raises(LoopError) as info:
        await run(store, NoTools())
    assert "tools() failed: registry down" in str(info.value)
    rec = await store.get_response("r")
    assert rec is not None
    assert "tools() failed: registry down" in rec.output["error"]["message"]
