"""A traced request's token usage is read off its path (the body kept, read with a batch: the
access writer's or the span export's), and every span still carries its own request's figures,
equal to what the upstream reported and to its access line."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any, ClassVar

import httpx
import pytest
import trio

from onwards_trio import Gateway, parse_config
from onwards_trio._ops import logs as _logging
from onwards_trio._ops.access import AccessWriter, LaterUsage
from onwards_trio._ops.logs import RedactionFilter, configure_logging
from onwards_trio._ops.tracing import _HOLD, _SpanQueue
from onwards_trio._proxy.usage import UsageKeeper
from tests.ops.otlp_receiver import otlp_receiver
from tests.support import FakeUpstream, Recorded, Reply, chat_completion, serve_app

CHAT = "/v1/chat/completions"
REQUESTS = 6

pytestmark = pytest.mark.usefixtures("fast_otel_export")


@pytest.fixture(params=["info", "warning"], ids=["access-log-on", "access-log-off"])
def access_output(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    """The gateway's log output, with access lines (and their batch writer) on or off."""
    root = logging.getLogger("onwards_trio")
    saved = (list(root.handlers), root.level, root.propagate)
    saved_state = (_logging._installed, _logging._guard, _logging._writer)
    stream = io.StringIO()
    configure_logging(request.param, stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    _logging._installed, _logging._guard, _logging._writer = saved_state


def _script(request: Recorded) -> Reply:
    """Each request's usage is its own: the n in its prompt, 2n out, n // 2 cached."""
    n = int(request.json()["messages"][0]["content"])
    usage = {
        "prompt_tokens": n,
        "completion_tokens": 2 * n,
        "prompt_tokens_details": {"cached_tokens": n // 2},
    }
    return Reply(body=chat_completion("done", usage=usage))


async def test_each_span_carries_its_own_requests_usage_read_off_the_request_path(
    nursery: trio.Nursery, access_output: io.StringIO
) -> None:
    upstream = FakeUpstream(_script)
    async with otlp_receiver() as receiver:
        config = {
            "targets": {"gpt": {"url": await serve_app(nursery, upstream)}},
            "telemetry": {"endpoint": receiver.url},
        }
        gateway = Gateway(parse_config(config))
        assert gateway.metrics is None  # no token counters: only the line and the spans read it
        info = await nursery.start(gateway.serve, "127.0.0.1", 0)
        async with (
            httpx.AsyncClient(base_url=info.url, timeout=10) as client,
            trio.open_nursery() as senders,
        ):
            for n in range(1, REQUESTS + 1):
                body: dict[str, Any] = {
                    "model": "gpt",
                    "messages": [{"role": "user", "content": str(10 * n)}],
                }
                senders.start_soon(partial(client.post, CHAT, json=body))
        with trio.fail_after(10):
            spans = await receiver.wait_for(2 * REQUESTS)
    servers = [s for s in spans if s.kind == "server"]
    assert len(servers) == REQUESTS
    got = []
    for server in servers:
        (attempt,) = server.children(spans)
        figures = [
            (
                span.attributes["gen_ai.usage.input_tokens"],
                span.attributes["gen_ai.usage.output_tokens"],
                span.attributes["gen_ai.usage.cache_read.input_tokens"],
            )
            for span in (server, attempt)
        ]
        assert figures[0] == figures[1]
        got.append(figures[0])
    assert sorted(got) == [(10 * n, 20 * n, 5 * n) for n in range(1, REQUESTS + 1)]
    if not logging.getLogger("onwards_trio.access").isEnabledFor(logging.INFO):
        assert "onwards_trio.access" not in access_output.getvalue()
        return
    with trio.fail_after(10):
        while len(lines := _access_lines(access_output)) < REQUESTS:
            await trio.sleep(0.01)
    logged = sorted(
        (int(ln.split("input_tokens=")[1].split()[0]), ln.split("input_tokens=")[1].split()[1:])
        for ln in lines
    )
    assert logged == [
        (10 * n, [f"output_tokens={20 * n}", f"cached_tokens={5 * n}"])
        for n in range(1, REQUESTS + 1)
    ]


def _access_lines(output: io.StringIO) -> list[str]:
    return [ln for ln in output.getvalue().splitlines() if "onwards_trio.access" in ln]


def _kept(n: int) -> UsageKeeper:
    keeper = UsageKeeper()
    keeper.feed(b'{"id":"x","usage":{"prompt_tokens":%d,"completion_tokens":1}}' % n)
    return keeper


def test_queued_requests_wait_for_the_access_writer_then_are_read_when_they_must() -> None:
    """Requests whose usage is a kept body go into the export queue as their bodies are read
    by the access writer (in the order they ended), not read twice; a batch to export, or too
    many waiting, makes the tracer read the rest itself."""
    queue = _SpanQueue(2048, 512)
    bodies = [_kept(n) for n in range(40)]
    queue.later = [((n,), body) for n, body in enumerate(bodies)]  # type: ignore[misc]
    UsageKeeper.read_all(list(bodies[:25]))  # the writer's batch: the first 25 requests
    queue.settle()
    assert [entry[:3] for entry in queue.spans if entry] == [(n, n, 1) for n in range(25)]
    assert len(queue.later) == 15 and not any(hasattr(b, "found") for b in bodies[25:])
    queue.settle(force=True)
    assert [entry[:3] for entry in queue.spans if entry] == [(n, n, 1) for n in range(40)]
    assert queue.later == [] and len(queue.spans) == 80  # two spans each


def test_too_many_waiting_bodies_are_read_by_the_tracer() -> None:
    queue = _SpanQueue(2048, 512)
    queue.later = [((n,), _kept(n)) for n in range(_HOLD)]  # type: ignore[misc]
    queue.settle()  # nobody read them (the access log is off): not held any longer
    assert [entry[:2] for entry in queue.spans if entry] == [(n, n) for n in range(_HOLD)]


class _CountedKeeper(UsageKeeper):
    """A keeper whose reads are counted (each body's, by whoever reads it)."""

    reads: ClassVar[list[int]] = []

    @classmethod
    def read_all(cls, bodies: list[LaterUsage]) -> None:
        cls.reads.extend(map(id, bodies))
        super().read_all(bodies)


async def test_a_body_the_tracer_read_first_is_not_read_again_by_the_access_writer() -> None:
    """The access writer waits long for its batch; a span that cannot wait reads the body
    itself, and the writer then takes the figures it found instead of reading it again."""
    _CountedKeeper.reads = []
    bodies = []
    for n in range(40):
        keeper = _CountedKeeper()
        keeper.feed(b'{"id":"x","usage":{"prompt_tokens":%d,"completion_tokens":1}}' % n)
        bodies.append(keeper)
    out = io.StringIO()
    writer = AccessWriter(logging.StreamHandler(out), json=False, guard=RedactionFilter())
    queue = _SpanQueue(2048, 512)
    queue.later = [((n,), body) for n, body in enumerate(bodies[:30])]  # type: ignore[misc]
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for n, body in enumerate(bodies):
            writer.add(("POST", CHAT, 200, 0.01, "gpt", 0, 10, 20, 1, None, body, 1e9 + n))
        queue.settle(force=True)  # the spans of the first 30: read now, by the tracer
        with trio.fail_after(10):
            while out.getvalue().count("\n") < len(bodies):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert sorted(_CountedKeeper.reads) == sorted(map(id, bodies))  # each read once
    counts = [line.split("input_tokens=")[1].split()[:2] for line in out.getvalue().splitlines()]
    assert counts == [[str(n), "output_tokens=1"] for n in range(len(bodies))]
