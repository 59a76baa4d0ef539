"""Requests whose handling costs a lot of Python work never hold the gateway's event loop:
no single step of any gateway task runs longer than 100 ms while they are handled, so no
other request waits longer than that for them.

Measured with a Trio instrument that reads the event-loop thread's CPU clock
(``time.thread_time``) before and after every step of the gateway's tasks (the test's own
client and fake upstream share the loop and are left out). CPU time, not wall time: on a
loaded 2-core machine a step can be descheduled for any length of time, which says nothing
about the gateway; the CPU a step burns is what every other request waits for, and it does
not depend on the load. Work handed to ``trio.to_thread`` runs on another thread's clock.

The collector's full passes walk every object alive in the process: in a test run that is the
whole suite's (thousands of test modules' objects, ~100 ms a pass on this machine kind). The
CLI freezes what is alive once the gateway listens (``gc.freeze()``), so its passes walk only
what came after; :func:`measured` does the same before each request."""

from __future__ import annotations

import gc
import time
from typing import Any

import orjson
import trio

from tests.app.test_request_limits import adapter_reply, exchange, post
from tests.support import FakeUpstream, serve_app, start_gateway

STEP_LIMIT = 0.100


class LongestStep(trio.abc.Instrument):
    """The longest step of a task under ``root`` (event-loop thread CPU seconds)."""

    def __init__(self, root: trio.lowlevel.Task) -> None:
        self.root = root
        self.longest = 0.0
        self.task = ""
        self._began = time.thread_time()  # the step that adds the instrument ends first

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        spent = time.thread_time() - self._began
        if spent > self.longest and self._under_root(task):
            self.longest, self.task = spent, task.name

    def _under_root(self, task: trio.lowlevel.Task | None) -> bool:
        while task is not None:
            if task is self.root:
                return True
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None
        return False


async def adapter_gateway(nursery: trio.Nursery) -> tuple[int, trio.lowlevel.Task]:
    """A gateway adapting ``/v1/responses`` for a fake upstream; its port and the task every
    one of its tasks descends from."""
    url = await serve_app(nursery, FakeUpstream(adapter_reply))
    targets = {"m": {"url": url + "/v1", "open_responses": {"adapter": True}}}

    async def run(task_status: trio.TaskStatus[tuple[int, trio.lowlevel.Task]]) -> None:
        async with trio.open_nursery() as inner:
            _, gw = await start_gateway(inner, {"targets": targets})
            task_status.started((int(gw.rsplit(":", 1)[1]), trio.lowlevel.current_task()))

    started: tuple[int, trio.lowlevel.Task] = await nursery.start(run)
    return started


def responses_request(items: list[Any]) -> bytes:
    body = orjson.dumps({"model": "m", "store": False, "input": items})
    return post(body).replace(b"/v1/chat/completions", b"/v1/responses", 1)


async def measured(
    port: int, root: trio.lowlevel.Task, request: bytes
) -> tuple[int, bytes, LongestStep]:
    steps = LongestStep(root)
    gc.freeze()  # as the CLI does once it listens: a full pass walks only the request's objects
    trio.lowlevel.add_instrument(steps)
    try:
        status, _, body = await exchange(port, request)
    finally:
        trio.lowlevel.remove_instrument(steps)
        gc.unfreeze()
    return status, body, steps


async def test_a_request_of_900000_input_items_never_holds_the_loop(
    nursery: trio.Nursery,
) -> None:
    """The issue's case: 29 MB of 900,000 messages held the loop 68 s. It is refused now (its
    objects are counted in the raw bytes before anything is parsed)."""
    port, root = await adapter_gateway(nursery)
    request = responses_request([{"role": "user", "content": "hi"}] * 900_000)
    status, body, steps = await measured(port, root, request)
    assert status == 400 and b"too many objects and arrays" in body
    print("LONGEST", steps.task, steps.longest)
    assert steps.longest < STEP_LIMIT, f"{steps.task}: {steps.longest * 1000:.0f} ms"


async def test_a_long_allowed_input_is_handled_off_the_loop(nursery: trio.Nursery) -> None:
    """At the item limit, each message of four parts (2 MB of JSON): parsing, converting and
    copying it took 90-180 ms steps on the loop; in worker threads the answer is whole and no
    step is long."""
    port, root = await adapter_gateway(nursery)
    parts = [{"type": "input_text", "text": f"part {i}"} for i in range(4)]
    request = responses_request([{"role": "user", "content": parts}] * 10_000)
    status, body, steps = await measured(port, root, request)
    assert status == 200, body
    assert orjson.loads(body)["output"][0]["content"][0]["text"] == "saw 10000 messages"
    print("LONGEST", steps.task, steps.longest)
    assert steps.longest < STEP_LIMIT, f"{steps.task}: {steps.longest * 1000:.0f} ms"
