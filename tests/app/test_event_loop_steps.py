"""Requests whose handling costs a lot of Python work never hold the event loop: no single
step of any task runs longer than 100 ms while the gateway handles them.

Measured with a Trio instrument that reads the event-loop thread's CPU clock
(``time.thread_time``) before and after every task step. CPU time, not wall time: on a loaded
2-core machine a step can be descheduled for any length of time, which says nothing about
the gateway; the CPU a step burns is what every other request waits for, and it does not
depend on the load. Work handed to ``trio.to_thread`` runs on another thread's clock."""

from __future__ import annotations

import time
from typing import Any

import orjson
import trio

from tests.app.test_request_limits import adapter_reply, exchange, post
from tests.support import FakeUpstream, serve_app, start_gateway

STEP_LIMIT = 0.100


class LongestStep(trio.abc.Instrument):
    """The longest task step seen (event-loop thread CPU seconds) and whose it was."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.task = ""
        self._began = time.thread_time()  # the step that adds the instrument ends first

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        spent = time.thread_time() - self._began
        if spent > self.longest:
            self.longest, self.task = spent, task.name


async def adapter_gateway(nursery: trio.Nursery) -> int:
    url = await serve_app(nursery, FakeUpstream(adapter_reply))
    targets = {"m": {"url": url + "/v1", "open_responses": {"adapter": True}}}
    _, gw = await start_gateway(nursery, {"targets": targets})
    return int(gw.rsplit(":", 1)[1])


def responses_body(items: list[Any]) -> bytes:
    return orjson.dumps({"model": "m", "store": False, "input": items})


async def measured(port: int, request: bytes) -> tuple[int, bytes, LongestStep]:
    steps = LongestStep()
    trio.lowlevel.add_instrument(steps)
    try:
        status, _, body = await exchange(port, request)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return status, body, steps


async def test_a_request_of_900000_input_items_never_holds_the_loop(
    nursery: trio.Nursery,
) -> None:
    """The issue's case: 29 MB of 900,000 messages held the loop 68 s. It is refused now (its
    objects are counted in the raw bytes before anything is parsed)."""
    port = await adapter_gateway(nursery)
    request = post(responses_body([{"role": "user", "content": "hi"}] * 900_000))
    request = request.replace(b"/v1/chat/completions", b"/v1/responses", 1)
    status, body, steps = await measured(port, request)
    assert status == 400 and b"too many objects and arrays" in body
    assert steps.longest < STEP_LIMIT, f"{steps.task}: {steps.longest * 1000:.0f} ms"
