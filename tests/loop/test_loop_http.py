"""HttpModelTransport over real loopback HTTP (hypercorn on 127.0.0.1:0, real clock).

The fake upstream is a tiny ASGI app written here; it can hold a stream open between chunks so
the tests can prove deltas reach the consumer while the upstream is still sending.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import trio

from onwards_trio._loop.events import LoopEventKind
from onwards_trio._loop.model import HttpModelTransport
from onwards_trio._loop.run import open_response_stream, run_response_loop
from onwards_trio._loop.steps import ResponseStatus, StepState
from onwards_trio._loop.tools import RequestContext
from onwards_trio._stores.memory import MemoryStore
from onwards_trio._transport.asgi import read_body, serve_lifespan
from tests.loop.test_loop_helpers import FakeExecutor, model_then_complete, stream_text
from tests.support import serve_app

CTX = RequestContext(model="m")


class Upstream:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.release = trio.Event()
        self.disconnected = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        body = await read_body(receive, 1 << 20)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["path"], headers, orjson.loads(body)))
        path = scope["path"]
        if path == "/error":
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"upstream broke"})
            return
        if path == "/chat":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": b'{"output":"hello"}'})
            return
        chunks = stream_text("Hello", " world")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"".join(chunks[:2]), "more_body": True})
        try:
            if path == "/hang":
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.disconnected.set()
                return
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"".join(chunks[2:])})
        except trio.Cancelled:
            self.disconnected.set()
            raise


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[tuple[Upstream, str]]:
    app = Upstream()
    yield app, await serve_app(nursery, app)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def test_non_streaming_model_step_posts_json_with_bearer_key(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    app, url = upstream
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    store = MemoryStore(model_then_complete(request, {"final": True}))
    transport = HttpModelTransport(url + "/chat", "sk-test", client)
    result = await run_response_loop(store, FakeExecutor(), CTX, transport, request_id="r")
    assert result == {"final": True}
    ((path, headers, body),) = app.requests
    assert (path, body) == ("/chat", request)
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["content-type"] == "application/json"
    assert "accept" not in headers or headers["accept"] != "text/event-stream"
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.COMPLETED and step.response_payload == {"output": "hello"}


async def test_http_error_fails_the_step_with_status_and_body(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    _, url = upstream
    store = MemoryStore(model_then_complete({"model": "m"}, {"x": 1}))
    transport = HttpModelTransport(url + "/error", None, client)
    await run_response_loop(store, FakeExecutor(), CTX, transport, request_id="r")
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED
    assert step.error["message"] == "executor error: model call returned HTTP 500: upstream broke"


async def test_stream_deltas_arrive_while_the_upstream_is_still_sending(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    app, url = upstream
    store = MemoryStore()
    await store.begin_response("r", {"model": "m", "messages": [], "stream": True})
    transport = HttpModelTransport(url + "/stream", None, client)
    deltas = []
    with trio.fail_after(10):
        async with open_response_stream(
            store, FakeExecutor(), CTX, transport, request_id="r"
        ) as recv:
            async for ev in recv:
                if ev.kind is LoopEventKind.OUTPUT_TEXT_DELTA:
                    deltas.append(ev.data["delta"])
                    app.release.set()  # only now may the upstream finish
    assert deltas == ["Hello", " world"]
    assert app.requests[0][1]["accept"] == "text/event-stream"
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.COMPLETED
    assert rec.output["output"][0]["content"][0]["text"] == "Hello world"


async def test_cancelling_mid_stream_closes_the_upstream_connection(
    upstream: tuple[Upstream, str], client: httpx.AsyncClient
) -> None:
    app, url = upstream
    store = MemoryStore()
    await store.begin_response("r", {"model": "m", "messages": [], "stream": True})
    transport = HttpModelTransport(url + "/hang", None, client)
    with trio.fail_after(10):
        with trio.CancelScope() as consumer:
            async with open_response_stream(
                store, FakeExecutor(), CTX, transport, request_id="r"
            ) as recv:
                async for ev in recv:
                    if ev.kind is LoopEventKind.OUTPUT_TEXT_DELTA:
                        consumer.cancel()
        await app.disconnected.wait()
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.CANCELED
    rec = await store.get_response("r")
    assert rec is not None and rec.status is ResponseStatus.CANCELLED


async def test_connection_refused_fails_the_step(client: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = MemoryStore(model_then_complete({"model": "m"}, {"x": 1}))
    transport = HttpModelTransport(f"http://127.0.0.1:{port}/chat", None, client)
    assert await run_response_loop(store, FakeExecutor(), CTX, transport, request_id="r") == {
        "x": 1
    }
    (step,) = await store.list_chain("r", None)
    assert step.state is StepState.FAILED
    assert step.error["message"].startswith("executor error: model call HTTP error: ConnectError")
