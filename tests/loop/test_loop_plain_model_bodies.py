"""A :class:`ModelTransport` may give its body as any async iterator of bytes: one without an
``aclose`` (not a generator) is read like any other."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson

from onwards_trio._loop.model import ModelResponse
from onwards_trio._loop.steps import StepState
from onwards_trio._stores.memory import MemoryStore
from tests.loop.test_loop import run
from tests.loop.test_loop_helpers import chat, model_then_complete


class Chunks:
    """An async iterator and nothing more."""

    def __init__(self, *chunks: bytes) -> None:
        self._chunks = list(chunks)

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)


class PlainModel:
    @asynccontextmanager
    async def open(self, payload: bytes, *, stream: bool) -> AsyncIterator[ModelResponse]:
        raw = orjson.dumps(chat("plain"))
        headers = [(b"content-type", b"application/json")]
        yield ModelResponse(200, headers, Chunks(raw[:10], raw[10:]))


async def test_a_model_body_without_aclose_is_read_whole() -> None:
    store = MemoryStore(model_then_complete({"model": "m", "messages": []}))
    result = await run(store, model=PlainModel())
    assert result["choices"][0]["message"]["content"] == "plain"
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.COMPLETED
