"""Fakes for the loop tests (no tests here): a scriptable in-process model transport, a tool
executor, scripted transitions and a store that breaks on demand.

Everything here only uses Trio primitives, so it runs under ``autojump_clock``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio

from onwards_trio._loop.events import LoopEvent
from onwards_trio._loop.model import ModelResponse
from onwards_trio._loop.steps import (
    AppendSteps,
    Complete,
    MultiStepStore,
    NextAction,
    StepDescriptor,
    StoreError,
    StoreErrorKind,
)
from onwards_trio._loop.tools import RequestContext, ToolError, ToolKind, ToolSchema
from onwards_trio._loop.transition import ScopeView
from onwards_trio._stores.memory import MemoryStore

__all__ = [
    "BrokenStore",
    "FakeExecutor",
    "FakeModel",
    "Reply",
    "chat",
    "chunk",
    "collect",
    "scripted",
    "sse",
    "stream_text",
    "tool_call",
]


def chat(
    content: str | None = "hi",
    *,
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    finish: str | None = None,
    usage: Mapping[str, Any] | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    if reasoning:
        message["reasoning_content"] = reasoning
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish or ("tool_calls" if tool_calls else "stop"),
            }
        ],
        "usage": dict(usage)
        if usage
        else {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def tool_call(call_id: str, name: str, arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chunk(delta: Mapping[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
        **extra,
    }


def sse(*payloads: Any, done: bool = True) -> list[bytes]:
    out = [b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads]
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def stream_text(*parts: str) -> list[bytes]:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in parts]
    chunks.append(chunk({}, "stop"))
    chunks.append(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": len(parts),
                "total_tokens": 3 + len(parts),
            },
        }
    )
    return sse(*chunks)


@attrs.define
class Reply:
    """One scripted model answer: a JSON body, or SSE ``chunks`` sent ``chunk_delay`` apart."""

    body: Any = None
    status: int = 200
    chunks: Sequence[bytes] | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    raise_exc: BaseException | None = None


class FakeModel:
    """A :class:`ModelTransport` answering from a script (a list consumed in order, the last
    one repeated, or a function of the request)."""

    def __init__(self, script: Reply | Sequence[Reply] | Callable[[Any], Reply]) -> None:
        self.script = script
        self.requests: list[Any] = []
        self.streams: list[bool] = []
        self.active = 0
        self.max_active = 0
        self.closed = 0
        self._i = 0

    def _next(self, request: Any) -> Reply:
        s = self.script
        if isinstance(s, Reply):
            return s
        if callable(s):
            return s(request)
        reply = s[min(self._i, len(s) - 1)]
        self._i += 1
        return reply

    @asynccontextmanager
    async def open(self, payload: bytes, *, stream: bool) -> AsyncIterator[ModelResponse]:
        request = orjson.loads(payload)
        self.requests.append(request)
        self.streams.append(stream)
        reply = self._next(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await trio.sleep(reply.delay)
            if reply.raise_exc is not None:
                raise reply.raise_exc
            if reply.chunks is not None:
                chunks = list(reply.chunks)
                headers = [(b"content-type", b"text/event-stream")]
            else:
                raw = reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
                chunks = [raw]
                headers = [(b"content-type", b"application/json")]

            async def body() -> AsyncIterator[bytes]:
                for n, c in enumerate(chunks):
                    if n and reply.chunk_delay:
                        await trio.sleep(reply.chunk_delay)
                    yield c

            yield ModelResponse(reply.status, headers, body())
        finally:
            self.active -= 1
            self.closed += 1


Handler = Callable[[Any], Awaitable[Any]] | Any


class FakeExecutor:
    """Tools by name: a value, an exception to raise, or an async function of the args."""

    def __init__(
        self,
        handlers: Mapping[str, Handler] | None = None,
        *,
        kinds: Mapping[str, ToolKind] | None = None,
        delay: float = 0.0,
        idempotent: frozenset[str] = frozenset(),
    ) -> None:
        self.handlers = dict(handlers or {})
        self.kinds = dict(kinds or {})
        self.idempotent = idempotent
        self.delay = delay
        self.calls: list[tuple[str, str, Any]] = []
        self.active = 0
        self.max_active = 0
        self.finished = 0

    async def tools(self, ctx: RequestContext) -> Sequence[ToolSchema]:
        names = set(self.handlers) | set(self.kinds)
        return [
            ToolSchema(
                n,
                description=f"the {n} tool",
                kind=self.kinds.get(n, ToolKind.HTTP),
                idempotent=n in self.idempotent,
            )
            for n in sorted(names)
        ]

    async def execute(self, name: str, tool_call_id: str, args: Any, ctx: RequestContext) -> Any:
        self.calls.append((name, tool_call_id, args))
        if name not in self.handlers:
            raise ToolError.not_found(name)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await trio.sleep(self.delay)
            h = self.handlers[name]
            if isinstance(h, BaseException):
                raise h
            result = await h(args) if callable(h) else h
            self.finished += 1
            return result
        finally:
            self.active -= 1


def scripted(
    actions: Sequence[NextAction] | Callable[[ScopeView], NextAction],
) -> Callable[[ScopeView], NextAction]:
    """A transition that plays ``actions`` in order (then repeats the last), or a function."""
    if callable(actions):
        return actions
    state = {"i": 0}

    def transition(view: ScopeView) -> NextAction:
        i = state["i"]
        state["i"] += 1
        return actions[min(i, len(actions) - 1)]

    return transition


def model_then_complete(request: Any, payload: Any = None) -> Callable[[ScopeView], NextAction]:
    """One model step, then ``Complete`` with ``payload`` (default: the model's answer)."""

    def transition(view: ScopeView) -> NextAction:
        if not view.chain:
            return AppendSteps([StepDescriptor.model_call(request)])
        return Complete(payload if payload is not None else view.chain[-1].response_payload)

    return transition


class BrokenStore(MemoryStore):
    """A memory store whose ``method`` raises ``StoreError`` from its ``after``-th call on."""

    def __init__(self, transition: Any, method: str, after: int = 0) -> None:
        super().__init__(transition)
        self.broken_method = method
        self.after = after
        self.calls = 0

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if name != object.__getattribute__(self, "broken_method"):
            return attr

        async def broken(*args: Any, **kwargs: Any) -> Any:
            n = object.__getattribute__(self, "calls")
            object.__setattr__(self, "calls", n + 1)
            if n >= object.__getattribute__(self, "after"):
                raise StoreError(StoreErrorKind.STORAGE, "disk on fire")
            return await attr(*args, **kwargs)

        return broken


async def collect(recv: trio.MemoryReceiveChannel[LoopEvent]) -> list[LoopEvent]:
    return [ev async for ev in recv]


def store_of(store: MultiStepStore) -> MemoryStore:
    assert isinstance(store, MemoryStore)
    return store
