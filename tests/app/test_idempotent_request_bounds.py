"""A request with an ``Idempotency-Key`` is read within the same bounds as any other, over raw
loopback sockets: the read deadline, the early 413 on a declared length, the global body
budget. (Its body was once read with the size limit alone: a body trickled a byte at a time
held its buffer for ever.)"""

from __future__ import annotations

import orjson
import trio

from tests.app.test_request_limits import answer, chat, gateway, post

KEY = b"idempotency-key: k-1\r\n"


async def test_a_keyed_body_trickled_past_the_deadline_is_a_408(nursery: trio.Nursery) -> None:
    port, up = await gateway(nursery, body_timeout_secs=0.5, store={"kind": "memory"})
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(chat(), extra=KEY)[:-5])
        status, _, body = await answer(s)
    assert status == 408 and orjson.loads(body)["error"]["code"] == "request_timeout"
    assert up.requests == []


async def test_a_keyed_declared_length_over_the_limit_is_refused_before_any_continue(
    nursery: trio.Nursery,
) -> None:
    port, up = await gateway(nursery, body_limit_bytes=1000, store={"kind": "memory"})
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(b"", length=1_000_000_000, extra=KEY + b"expect: 100-continue\r\n"))
        with trio.fail_after(10):
            data = await s.receive_some()
    assert data.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in data
    assert up.requests == []


async def test_keyed_bodies_read_at_once_share_the_body_budget(nursery: trio.Nursery) -> None:
    """Two slow keyed uploads that each fit the per-request limit but not the budget
    together: the second is refused (503, retry) while the first still completes."""
    port, up = await gateway(nursery, body_buffer_limit_bytes=150_000, store={"kind": "memory"})
    body = b'{"model":"m","pad":"' + b"x" * 99_980 + b'"}'
    first_request = post(body, extra=KEY)
    second_request = post(body, extra=b"idempotency-key: k-2\r\n")
    async with (
        await trio.open_tcp_stream("127.0.0.1", port) as first,
        await trio.open_tcp_stream("127.0.0.1", port) as second,
    ):
        await first.send_all(first_request[:-20_000])
        await trio.sleep(0.2)  # let the gateway take those bytes
        await second.send_all(second_request[:-20_000])
        status, headers, _ = await answer(second)
        assert status == 503 and headers["retry-after"] == "1"
        await first.send_all(first_request[-20_000:])
        assert (await answer(first))[0] == 200
    assert len(up.requests) == 1
