"""The global body budget (``body_buffer_limit_bytes``) at its edge, over a raw socket: the
bytes of a body still arriving may fill the budget exactly, and one byte more is refused
with a 503 at once, without waiting for the rest of the body."""

from __future__ import annotations

import pytest
import trio

from tests.support import FakeUpstream, read_head, serve_app, start_gateway

BUDGET = 2_000


def body_of(length: int) -> bytes:
    head, tail = b'{"model":"m","messages":[{"role":"user","content":"', b'"}]}'
    return head + b"x" * (length - len(head) - len(tail)) + tail


async def gateway(
    nursery: trio.Nursery, body_timeout_secs: float | None = 120.0
) -> tuple[int, FakeUpstream]:
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up)}}
    config = {
        "targets": targets,
        "body_buffer_limit_bytes": BUDGET,
        "body_timeout_secs": body_timeout_secs,
    }
    _, url = await start_gateway(nursery, config)
    return int(url.rsplit(":", 1)[1]), up


def head_for(length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % length
    )


@pytest.mark.parametrize("body_timeout_secs", [120.0, None])  # with and without a read deadline
async def test_a_body_holding_one_byte_over_the_budget_is_refused_while_it_arrives(
    nursery: trio.Nursery, body_timeout_secs: float | None
) -> None:
    port, up = await gateway(nursery, body_timeout_secs)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        # the head promises 100 bytes more than are sent: the answer cannot wait for them
        await stream.send_all(head_for(BUDGET + 101) + b"x" * (BUDGET + 1))
        with trio.fail_after(10):
            answer = await read_head(stream)
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert up.requests == []


async def test_a_body_holding_exactly_the_budget_is_served(nursery: trio.Nursery) -> None:
    port, up = await gateway(nursery)
    payload = body_of(BUDGET + 1)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head_for(len(payload)) + payload[:BUDGET])
        # Not for the result (it is a 200 however the gateway's reads split the body): the
        # pause lets its read end exactly at the budget, the edge this test is about.
        await trio.sleep(0.3)
        await stream.send_all(payload[BUDGET:])
        with trio.fail_after(10):
            answer = await read_head(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert [r.body for r in up.requests] == [payload]
