"""Graceful shutdown: a drain with a grace period, then cancellation."""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from onwards_trio import Gateway, parse_config
from onwards_trio._ops.reload import GracefulShutdown
from tests.support import FakeUpstream, Reply, serve_app, sse

CHAT = "/v1/chat/completions"


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], **extra}


def stream_reply(n: int, delay: float) -> Reply:
    return Reply(
        headers=[(b"content-type", b"text/event-stream")],
        chunks=sse(*({"n": i} for i in range(n))),
        chunk_delay=delay,
    )


# -- the pieces, on a virtual clock --------------------------------------------------------------


async def test_cancels_after_the_grace_period(autojump_clock: trio.testing.MockClock) -> None:
    shutdown = GracefulShutdown(grace=5)
    finished_at: list[float] = []
    async with trio.open_nursery() as nursery:

        async def slow_request() -> None:
            try:
                await trio.sleep(100)
            finally:
                finished_at.append(trio.current_time())

        nursery.start_soon(slow_request)
        nursery.start_soon(shutdown.cancel_after_drain, nursery.cancel_scope)
        await trio.sleep(1)
        shutdown.request()
    assert finished_at == [pytest.approx(1 + 5 + 1)]  # grace plus the one-second margin


async def test_ends_as_soon_as_the_server_finished(autojump_clock: trio.testing.MockClock) -> None:
    shutdown = GracefulShutdown(grace=30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(shutdown.cancel_after_drain, nursery.cancel_scope)
        shutdown.request()
        await trio.sleep(2)  # the server drains in 2 s
        shutdown.finished()
        await trio.sleep(100)  # cancelled long before this ends
    assert trio.current_time() == pytest.approx(2)


async def test_serve_passes_the_trigger_and_marks_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shutdown = GracefulShutdown(grace=7)
    seen: dict[str, Any] = {}

    async def fake_serve(
        host: str,
        *,
        shutdown_trigger: Any,
        grace: float,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        seen.update(host=host, grace=grace)
        task_status.started("ready")
        await shutdown_trigger()

    async with trio.open_nursery() as nursery:
        assert await nursery.start(shutdown.serve, fake_serve, "h") == "ready"
        shutdown.request()
    assert seen == {"host": "h", "grace": 7}
    with trio.move_on_after(1) as scope:
        await shutdown._finished.wait()
    assert not scope.cancelled_caught


async def test_first_signal_drains_second_signal_stops_now() -> None:
    shutdown = GracefulShutdown(grace=60)
    with trio.CancelScope() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(shutdown.watch_signals, outer, (signal.SIGUSR1,))
            os.kill(os.getpid(), signal.SIGUSR1)
            with trio.fail_after(5):
                await shutdown.wait()
            assert not outer.cancel_called
            os.kill(os.getpid(), signal.SIGUSR1)
            await trio.sleep(5)
    assert outer.cancelled_caught


# -- the gateway app under hypercorn's drain, over loopback ------------------------------------


async def draining_gateway(
    nursery: trio.Nursery, reply: Reply, grace: float
) -> tuple[Gateway, GracefulShutdown, FakeUpstream, str]:
    """A gateway served by ``Gateway.serve`` under a :class:`GracefulShutdown`, in front of an
    upstream answering ``reply``; returns it, the shutdown, the upstream and the base URL."""
    up = FakeUpstream(reply)
    gateway = Gateway(parse_config({"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}))
    shutdown = GracefulShutdown(grace=grace)
    info = await nursery.start(shutdown.serve, gateway.serve, "127.0.0.1", 0)
    return gateway, shutdown, up, info.url


async def test_in_flight_stream_finishes_during_the_drain(nursery: trio.Nursery) -> None:
    _, shutdown, _, url = await draining_gateway(nursery, stream_reply(6, 0.05), grace=10)
    client = httpx.AsyncClient(base_url=url, timeout=10)
    async with client, client.stream("POST", CHAT, json=body(stream=True)) as r:
        chunks = r.aiter_bytes()
        received = await anext(chunks)
        shutdown.request()
        async for chunk in chunks:
            received += chunk
    assert received.endswith(b"data: [DONE]\n\n")
    assert received.count(b"data: ") == 7
    with trio.fail_after(5):
        await shutdown._finished.wait()  # the server returned once drained


async def test_no_new_connections_during_the_drain(nursery: trio.Nursery) -> None:
    _, shutdown, _, url = await draining_gateway(nursery, stream_reply(4, 0.2), grace=10)
    client = httpx.AsyncClient(base_url=url, timeout=10)
    async with client, client.stream("POST", CHAT, json=body(stream=True)) as r:
        chunks = r.aiter_bytes()
        await anext(chunks)
        shutdown.request()
        await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=2) as newcomer:
            with pytest.raises(httpx.TransportError):
                await newcomer.get("/v1/models")
        async for _ in chunks:
            pass


async def test_stream_longer_than_the_grace_is_cut_and_releases_its_slot(
    nursery: trio.Nursery,
) -> None:
    # 10 s of stream against a grace of 0.3 s
    gateway, shutdown, up, url = await draining_gateway(nursery, stream_reply(100, 0.1), grace=0.3)
    client = httpx.AsyncClient(base_url=url, timeout=10)
    async with client, client.stream("POST", CHAT, json=body(stream=True)) as r:
        chunks = r.aiter_bytes()
        await anext(chunks)
        started = trio.current_time()
        shutdown.request()
        with pytest.raises(httpx.RemoteProtocolError):  # a truncated body, honestly
            async for _ in chunks:
                pass
    assert trio.current_time() - started < 3
    with trio.fail_after(5):
        await shutdown._finished.wait()
    assert gateway.targets.table.pools["gpt-4"].providers[0].concurrency.active == 0
    with trio.fail_after(5):
        while up.active:
            await trio.sleep(0.01)  # the upstream call was cancelled too, not left running
