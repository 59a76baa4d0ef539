"""hypercorn's ASGI lifespan handshake with the gateway: startup and shutdown are both
acknowledged, so hypercorn starts serving, stops promptly and logs no lifespan error.

A wrong or missing acknowledgement does not stop hypercorn from serving: it logs an error and
goes on without lifespan support, or waits out its startup/shutdown timeout and then fails.
So these tests watch hypercorn's error log and how long its shutdown takes."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

import onwards_trio as ot

CONFIG = {"targets": {"m": {"url": "http://127.0.0.1:9"}}}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_an_embedded_gateway_answers_hypercorns_lifespan_without_an_error() -> None:
    # Embedded in the application's own hypercorn, inside `gateway.running()`: the gateway
    # only acknowledges the lifespan messages, and hypercorn's error log stays empty.
    errors = logging.getLogger("test.hypercorn.lifespan")
    errors.propagate = False
    records = Records()
    errors.addHandler(records)
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = errors
    config.startup_timeout = config.shutdown_timeout = 5  # a missing answer fails fast
    gateway = ot.Gateway(ot.parse_config(CONFIG))
    app: Any = gateway  # hypercorn's app type is narrower than raw ASGI typing
    stop = trio.Event()
    try:
        with trio.fail_after(30):
            async with gateway.running(), trio.open_nursery() as nursery:
                serve = partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)
                binds = await nursery.start(serve)
                async with httpx.AsyncClient(timeout=10) as client:
                    models = await client.get(f"{binds[0]}/v1/models")
                stop.set()
    finally:
        errors.removeHandler(records)
    assert models.status_code == 200
    # hypercorn reached its shutdown handshake (it logs its own running/stopping lines)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING] == []


async def test_serve_with_hypercorn_returns_soon_after_its_shutdown_trigger() -> None:
    # hypercorn waits up to 60 s for the shutdown acknowledgement before it gives up
    gateway = ot.Gateway(ot.parse_config(CONFIG))
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            serve = partial(
                gateway.serve, "127.0.0.1", 0, shutdown_trigger=stop.wait, server="hypercorn"
            )
            info: ot.ServeInfo = await nursery.start(serve)
            async with httpx.AsyncClient(timeout=10) as client:
                models = await client.get(f"{info.url}/v1/models")
            stop.set()
    assert models.status_code == 200
