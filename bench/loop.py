"""Loop overhead per model step, in-memory and SQLite stores (``python bench/loop.py``).

A fake chat-completions upstream runs on loopback (hypercorn, 127.0.0.1:0). We time:

* ``http``: one raw model call through :class:`HttpModelTransport` (POST, read, parse): the
  floor any model step pays;
* ``loop``: responses of ``STEPS`` model steps each through ``run_response_loop``; the time
  per step minus ``http`` is the loop's overhead (store writes, transition, events);
* the same with an in-process transport (no sockets), which isolates the loop's own cost.

Goals (issue 4): < 1 ms loop overhead per model step (memory store), < 3 ms per persisted SQLite
step. Streaming runs forward every chunk as Open Responses events to a consumer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from onwards_trio._loop.model import HttpModelTransport, ModelResponse
from onwards_trio._loop.run import LoopConfig, open_response_stream, run_response_loop
from onwards_trio._loop.steps import (
    AppendSteps,
    Complete,
    MultiStepStore,
    NextAction,
    StepDescriptor,
)
from onwards_trio._loop.tools import NoOpToolExecutor, RequestContext
from onwards_trio._loop.transition import ScopeView
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._stores.sqlite import SqliteStore
from onwards_trio._transport.asgi import serve_lifespan

STEPS = 5  # model steps per response
RESPONSES = 200
CONFIG = LoopConfig(max_response_iterations=STEPS + 1)
CTX = RequestContext(model="m")

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The answer is 42. " * 20},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 100, "total_tokens": 150},
    }
)


def _sse_body(n_chunks: int = 20) -> bytes:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        c = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(c) + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": f"tok{i} "}) for i in range(n_chunks)]
    parts.append(chunk({}, "stop"))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


SSE_BODY = _sse_body()


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return
    while (await receive()).get("more_body"):
        pass
    stream = scope["path"] == "/stream"
    body = SSE_BODY if stream else COMPLETION
    ctype = b"text/event-stream" if stream else b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LocalTransport:
    """In-process transport: the same bytes, no sockets."""

    def __init__(self, stream: bool) -> None:
        self.body = SSE_BODY if stream else COMPLETION
        self.ctype = b"text/event-stream" if stream else b"application/json"

    @asynccontextmanager
    async def open(self, payload: bytes, *, stream: bool) -> AsyncIterator[ModelResponse]:
        async def body() -> AsyncIterator[bytes]:
            yield self.body

        yield ModelResponse(200, [(b"content-type", self.ctype)], body())


def n_model_steps(stream: bool) -> Callable[[ScopeView], NextAction]:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}

    def transition(view: ScopeView) -> NextAction:
        if len(view.chain) < STEPS:
            return AppendSteps([StepDescriptor.model_call(request)])
        return Complete({"steps": len(view.chain)})

    return transition


async def time_http(transport: HttpModelTransport, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        async with transport.open(COMPLETION, stream=False) as resp:
            buf = b""
            async for chunk in resp.body:
                buf += chunk
            orjson.loads(buf)
    return (time.perf_counter() - start) / n


async def time_loop(
    make_store: Callable[[], MultiStepStore], transport: Any, stream: bool, n: int
) -> float:
    """Seconds per model step over ``n`` responses; streaming runs have a consumer."""
    store = make_store()
    executor = NoOpToolExecutor()
    start = time.perf_counter()
    for i in range(n):
        rid = f"r{i}"
        if stream:
            async with open_response_stream(
                store, executor, CTX, transport, request_id=rid, config=CONFIG
            ) as recv:
                async for _ in recv:
                    pass
        else:
            await run_response_loop(store, executor, CTX, transport, request_id=rid, config=CONFIG)
    elapsed = time.perf_counter() - start
    if isinstance(store, SqliteStore):
        await store.aclose()
    return elapsed / (n * STEPS)


def _ms(x: float) -> str:
    return f"{x * 1000:7.3f} ms"


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="onwards-bench-"))
    counter = iter(range(1_000_000))

    def memory() -> MultiStepStore:
        return MemoryStore(n_model_steps(stream=False))

    def sqlite(stream: bool) -> Callable[[], MultiStepStore]:
        return lambda: SqliteStore(tmp / f"bench{next(counter)}.db", n_model_steps(stream))

    def memory_s() -> MultiStepStore:
        return MemoryStore(n_model_steps(stream=True))

    async with trio.open_nursery() as nursery:
        cfg = Config()
        cfg.bind = ["127.0.0.1:0"]
        cfg.accesslog = None
        cfg.errorlog = None
        (url,) = await nursery.start(serve, upstream_app, cfg)
        async with httpx.AsyncClient(timeout=30) as client:
            http = HttpModelTransport(str(url) + "/chat", None, client)
            http_s = HttpModelTransport(str(url) + "/stream", None, client)
            # warm-up: connections, imports, sqlite file creation
            await time_http(http, 50)
            await time_loop(memory, http, False, 10)
            await time_loop(sqlite(False), http, False, 10)

            rounds: dict[str, list[float]] = {}
            runs: tuple[tuple[str, Callable[[], Awaitable[float]]], ...] = (
                ("http", lambda: time_http(http, RESPONSES)),
                ("mem", lambda: time_loop(memory, http, False, RESPONSES // 2)),
                ("sql", lambda: time_loop(sqlite(False), http, False, RESPONSES // 2)),
                (
                    "mem_local",
                    lambda: time_loop(memory, LocalTransport(False), False, RESPONSES),
                ),
                (
                    "sql_local",
                    lambda: time_loop(sqlite(False), LocalTransport(False), False, RESPONSES // 2),
                ),
                ("mem_s", lambda: time_loop(memory_s, http_s, True, RESPONSES // 4)),
                ("sql_s", lambda: time_loop(sqlite(True), http_s, True, RESPONSES // 4)),
                (
                    "mem_s_local",
                    lambda: time_loop(memory_s, LocalTransport(True), True, RESPONSES // 2),
                ),
            )
            for _ in range(3):  # interleave to spread noise evenly
                for name, coro in runs:
                    rounds.setdefault(name, []).append(await coro())
        nursery.cancel_scope.cancel()

    r = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"onwards_trio loop benchmark ({STEPS} model steps per response, median of 3 rounds)")
    print(f"  raw model call over loopback HTTP (POST+read+parse): {_ms(r['http'])}")
    print("  per model step                      total      loop overhead")
    rows = (
        ("memory store, loopback HTTP", r["mem"], r["mem"] - r["http"]),
        ("SQLite store, loopback HTTP", r["sql"], r["sql"] - r["http"]),
        ("memory store, in-process model", r["mem_local"], r["mem_local"]),
        ("SQLite store, in-process model", r["sql_local"], r["sql_local"]),
        ("memory, streamed 20 chunks + consumer", r["mem_s"], None),
        ("SQLite, streamed 20 chunks + consumer", r["sql_s"], None),
        ("memory, streamed, in-process model", r["mem_s_local"], r["mem_s_local"]),
    )
    for label, total, overhead in rows:
        extra = _ms(overhead) if overhead is not None else "      -"
        print(f"  {label:38s}{_ms(total)}   {extra}")
    mem_ok = r["mem"] - r["http"] < 1e-3
    sql_ok = r["sql"] - r["http"] < 3e-3
    print(f"  goal < 1 ms per model step (memory): {'met' if mem_ok else 'NOT met'}")
    print(f"  goal < 3 ms per persisted SQLite step: {'met' if sql_ok else 'NOT met'}")


if __name__ == "__main__":
    trio.run(main)
