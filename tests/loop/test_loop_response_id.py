"""The id a response's events carry: ``resp_`` and the request id, never the prefix twice."""

from __future__ import annotations

import pytest
import trio

from onwards_trio import MemoryStore
from onwards_trio._loop.run import open_response_stream
from tests.loop.test_loop_cancel import CTX, REQUEST
from tests.loop.test_loop_helpers import FakeExecutor, FakeModel, Reply, stream_text


@pytest.mark.parametrize(
    ("request_id", "shown"), [("abc123", "resp_abc123"), ("resp_abc123", "resp_abc123")]
)
async def test_the_response_id_has_the_resp_prefix_once(
    request_id: str, shown: str, autojump_clock: trio.abc.Clock
) -> None:
    store = MemoryStore()
    await store.begin_response(request_id, REQUEST)
    model = FakeModel(Reply(chunks=stream_text("hi")))
    async with open_response_stream(
        store, FakeExecutor(), CTX, model, request_id=request_id
    ) as recv:
        events = [e async for e in recv]
    assert {e.data["response"]["id"] for e in events if "response" in e.data} == {shown}
