"""Request limits and leak guards of the gateway, over raw loopback sockets: buffered bodies
(global budget, total deadline, early 413), JSON bounds, refused methods, upstream keys in
relayed bodies, cut-short upstream bodies, and hypercorn's framing guard."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.support import FakeUpstream, Recorded, Reply, chat_completion, serve_app, start_gateway
from tests.transport.raw import read_response

CHAT = b"/v1/chat/completions"


async def gateway(
    nursery: trio.Nursery, upstream: FakeUpstream | None = None, **config: Any
) -> tuple[int, FakeUpstream]:
    up = upstream or FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up), "onwards_key": "sk-upstream-secret"}}
    _, url = await start_gateway(nursery, {"targets": targets, **config})
    return int(url.rsplit(":", 1)[1]), up


def post(
    body: bytes, *, path: bytes = CHAT, extra: bytes = b"", length: int | None = None
) -> bytes:
    n = len(body) if length is None else length
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: x\r\nmodel-override: m\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n" % n + extra + b"\r\n" + body
    )


async def answer(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    """One content-length framed response."""
    data = b""
    with trio.fail_after(30):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = await stream.receive_some()
            assert chunk, "closed mid-body"
            rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(data)
        return await answer(s)


def chat(content: Any = "hi") -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})


# -- buffered bodies ----------------------------------------------------------------------------


async def test_bodies_read_at_once_share_one_budget(nursery: trio.Nursery) -> None:
    """Two slow uploads that each fit the per-request limit but not the budget together: the
    second is refused (503, retry) while the first still completes."""
    port, up = await gateway(nursery, body_buffer_limit_bytes=150_000)
    body = b'{"model":"m","pad":"' + b"x" * 99_980 + b'"}'
    async with (
        await trio.open_tcp_stream("127.0.0.1", port) as first,
        await trio.open_tcp_stream("127.0.0.1", port) as second,
    ):
        await first.send_all(post(body)[:-20_000])
        await trio.sleep(0.2)  # let the gateway take those bytes
        await second.send_all(post(body)[:-20_000])
        status, headers, refused = await answer(second)
        assert status == 503 and headers["retry-after"] == "1"
        assert orjson.loads(refused)["error"]["code"] == "service_unavailable"
        await first.send_all(post(body)[-20_000:])
        assert (await answer(first))[0] == 200
    assert len(up.requests) == 1


async def test_a_body_trickled_past_the_deadline_is_a_408(nursery: trio.Nursery) -> None:
    port, up = await gateway(nursery, body_timeout_secs=0.5)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(chat())[:-5])
        status, _, body = await answer(s)
    assert status == 408 and orjson.loads(body)["error"]["code"] == "request_timeout"
    assert up.requests == []


async def test_a_declared_length_over_the_limit_is_refused_before_any_continue(
    nursery: trio.Nursery,
) -> None:
    port, up = await gateway(nursery, body_limit_bytes=1000)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(b"", length=1_000_000_000, extra=b"expect: 100-continue\r\n"))
        with trio.fail_after(10):
            data = await s.receive_some()
    assert data.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in data
    assert up.requests == []


# -- JSON bounds ------------------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth - 1):
        value = [value]
    return [value]


@pytest.mark.parametrize("depth", [128, 129, 253, 254, 255, 1000])
async def test_json_nested_past_the_limit_is_a_400_never_a_500(
    nursery: trio.Nursery, depth: int
) -> None:
    """orjson reads 1024 levels but writes 254: without a bound, a deep body failed later
    (re-serialised for an onwards_model, or stored) as a 500."""
    up = FakeUpstream()
    targets = {"m": {"url": await serve_app(nursery, up), "onwards_model": "upstream-m"}}
    _, url = await start_gateway(nursery, {"targets": targets})
    port = int(url.rsplit(":", 1)[1])
    body = b'{"model":"m","messages":[],"deep":' + b"[" * (depth - 1) + b"1" + b"]" * (depth - 1)
    body += b"}"  # depth - 1 arrays inside the top-level object: ``depth`` levels in all
    status, _, answer_body = await exchange(port, post(body))
    if depth <= 128:
        assert status == 200 and len(up.requests) == 1
    else:
        assert status == 400 and b"nested too deeply" in answer_body
        assert up.requests == []


async def test_a_body_of_too_many_json_values_is_refused_unparsed(nursery: trio.Nursery) -> None:
    port, up = await gateway(nursery)
    body = b'{"model":"m","input":[' + b",".join([b'{"role":"user","content":"a"}'] * 100_001)
    status, _, answer_body = await exchange(port, post(body + b"]}", path=b"/v1/responses"))
    assert status == 400 and b"too many objects and arrays" in answer_body
    assert up.requests == []


def adapter_reply(rec: Recorded) -> Reply:
    return Reply(body=chat_completion(f"saw {len(rec.json()['messages'])} messages"))


@pytest.mark.parametrize(("items", "status"), [(600, 200), (10_001, 400)])
async def test_responses_input_is_bounded_and_long_inputs_still_convert(
    nursery: trio.Nursery, items: int, status: int
) -> None:
    """600 items take the worker-thread path and come out whole; past 10,000: a 400."""
    up = FakeUpstream(adapter_reply)
    url = await serve_app(nursery, up)
    targets = {"m": {"url": url + "/v1", "open_responses": {"adapter": True}}}
    _, gw = await start_gateway(nursery, {"targets": targets})
    port = int(gw.rsplit(":", 1)[1])
    body = orjson.dumps(
        {"model": "m", "store": False, "input": [{"role": "user", "content": "a"}] * items}
    )
    got, _, answer_body = await exchange(port, post(body, path=b"/v1/responses"))
    assert got == status
    if status == 200:
        assert orjson.loads(answer_body)["output"][0]["content"][0]["text"] == "saw 600 messages"
    else:
        assert orjson.loads(answer_body)["error"]["param"] == "input"
        assert up.requests == []


# -- methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"TRACE", b"trace", b"TRACK", b"Track", b"CONNECT"])
async def test_echoing_and_tunnelling_methods_never_reach_an_upstream(
    nursery: trio.Nursery, method: bytes
) -> None:
    """405 from the gateway, or 400 from the built-in server (llhttp reads methods in upper
    case only); either way the upstream, and its key, are never involved."""
    port, up = await gateway(nursery)
    request = method + b" /v1/chat/completions HTTP/1.1\r\nhost: x\r\nmodel-override: m\r\n\r\n"
    status, _, _ = await exchange(port, request)
    assert status in (400, 405) and up.requests == []


# -- what comes back --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 401])
async def test_the_upstream_key_is_masked_in_relayed_bodies(
    nursery: trio.Nursery, status: int
) -> None:
    def echo(rec: Recorded) -> Reply:
        quoted = f"Incorrect API key provided: {rec.headers['authorization']}"
        return Reply(status=status, body=orjson.dumps({"error": {"message": quoted}}))

    port, up = await gateway(nursery, FakeUpstream(echo))
    got, headers, body = await exchange(port, post(chat()))
    assert got == status and b"sk-upstream-secret" not in body
    assert b"Bearer " + b"*" * len("sk-upstream-secret") in body
    assert int(headers["content-length"]) == len(body)
    assert up.requests[0].headers["authorization"] == "Bearer sk-upstream-secret"


async def relayed(port: int) -> bytes:
    """The body of the answer to one chat request, chunked framing undone."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(chat()))
        with trio.fail_after(30):
            return (await read_response(s, bytearray()))[1]


@pytest.mark.parametrize("cuts", [[3], [3, 11], list(range(1, 18))])
async def test_a_key_split_across_upstream_chunks_is_masked(
    nursery: trio.Nursery, cuts: list[int]
) -> None:
    """The upstream writes its echo cut at ``cuts`` (offsets into the key; the last case: one
    byte of it per chunk), spaced out so that each part arrives on its own."""
    text = b'{"error":{"message":"Incorrect API key provided: sk-upstream-secret."}}'
    at = [text.index(b"sk-upstream") + cut for cut in cuts]
    parts = [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]
    reply = Reply(status=401, chunks=parts, chunk_delay=0.01)
    port, _ = await gateway(nursery, FakeUpstream(reply))
    body = await relayed(port)
    assert b"sk-upstream-secret" not in body and b"*" * len("sk-upstream-secret") in body
    assert b"Incorrect API key provided: " in body and b'."}}' in body


async def test_a_body_ending_in_the_start_of_the_key_is_relayed_whole(
    nursery: trio.Nursery,
) -> None:
    """The tail kept back in case the key follows is sent when the body ends instead."""
    text = b"a" * 100 + b"sk-upstream-sec"
    reply = Reply(chunks=[text[:-3], text[-3:]], headers=[(b"content-type", b"text/plain")])
    port, _ = await gateway(nursery, FakeUpstream(reply))
    assert await relayed(port) == text


@pytest.mark.parametrize(
    ("targets", "where"),
    [
        ({"m": {"url": "http://a", "onwards_key": "EMPTY"}}, "$.targets.m"),
        (
            {"m": [{"url": "http://a"}, {"url": "http://b", "onwards_key": "none"}]},
            "$.targets.m[1]",
        ),
        (
            {"m": {"providers": [{"url": "http://a", "onwards_key": "k"}]}},
            "$.targets.m.providers[0]",
        ),
    ],
)
def test_a_key_too_short_to_mask_is_a_config_warning(targets: Any, where: str) -> None:
    """Keys under 8 characters are not masked (a local server's "none" would star innocent
    text in every answer); the operator is told so where the key is configured."""
    (warning,) = parse_config({"targets": targets}).warnings
    assert "not masked" in warning and warning.endswith(f"@ {where}.onwards_key")


async def test_a_key_too_short_to_mask_is_left_in_relayed_text(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(body=b'{"tool_choice":"none"}'))
    targets = {"m": {"url": await serve_app(nursery, up), "onwards_key": "none"}}
    _, url = await start_gateway(nursery, {"targets": targets})
    _, _, body = await exchange(int(url.rsplit(":", 1)[1]), post(chat()))
    assert body == b'{"tool_choice":"none"}'
    assert up.requests[0].headers["authorization"] == "Bearer none"


async def test_a_cut_short_upstream_body_logs_one_line_and_no_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    reply = Reply(chunks=[b'{"partial": ', b"more"], fail_after=1)
    port, _ = await gateway(nursery, FakeUpstream(reply))
    with caplog.at_level(logging.WARNING):
        async with await trio.open_tcp_stream("127.0.0.1", port) as s:
            await s.send_all(post(chat()))
            data = b""
            with trio.fail_after(30):
                while chunk := await s.receive_some():
                    data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and not data.endswith(b"0\r\n\r\n")
    cut = [r for r in caplog.records if "cut short" in r.getMessage()]
    assert len(cut) == 1 and cut[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- hypercorn ----------------------------------------------------------------------------------


async def test_under_hypercorn_content_length_with_transfer_encoding_is_refused(
    nursery: trio.Nursery,
) -> None:
    """h11 reads such a request as chunked and passes both headers on; behind a front end
    that frames by content-length that is request smuggling, so the gateway refuses it."""
    up = FakeUpstream()
    config: Mapping[str, Any] = {"targets": {"m": {"url": await serve_app(nursery, up)}}}
    gw = Gateway(parse_config(config))
    info = await nursery.start(partial(gw.serve, "127.0.0.1", 0, server="hypercorn"))
    port = int(info.url.rsplit(":", 1)[1])
    te = b"transfer-encoding: chunked\r\n"
    status, _, body = await exchange(port, post(b"0\r\n\r\n", extra=te))
    assert status == 400 and b"content-length and transfer-encoding" in body
    assert up.requests == []


@pytest.mark.parametrize(
    "pipelined",
    [
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET /v1/smuggled HTTP/1.1\r\nhost: x\r\nmodel-override: m\r\ncontent-length: 7\r\n\r\n"
        b"\r\n0\r\n\r\n",
        b"xyz\r\n\r\n",
    ],
)
async def test_under_hypercorn_bytes_pipelined_after_both_framings_never_reach_the_upstream(
    nursery: trio.Nursery, pipelined: bytes
) -> None:
    """The answer is the 400 or, depending on timing inside hypercorn, a close with none
    (docs/proxy.md): either way no request, smuggled or not, is forwarded."""
    up = FakeUpstream()
    config: Mapping[str, Any] = {"targets": {"m": {"url": await serve_app(nursery, up)}}}
    gw = Gateway(parse_config(config))
    info = await nursery.start(partial(gw.serve, "127.0.0.1", 0, server="hypercorn"))
    te = b"transfer-encoding: chunked\r\n"
    async with await trio.open_tcp_stream("127.0.0.1", int(info.url.rsplit(":", 1)[1])) as s:
        await s.send_all(post(b"0\r\n\r\n", extra=te) + pipelined)
        data = b""
        with trio.fail_after(30), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await s.receive_some():
                data += chunk
    assert data == b"" or (data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1") == 1)
    assert up.requests == []


# -- timeouts ---------------------------------------------------------------------------------


async def test_a_silent_upstream_gets_the_default_head_timeout(nursery: trio.Nursery) -> None:
    port, _ = await gateway(
        nursery,
        FakeUpstream(Reply(body=chat_completion(), delay=60)),
        default_request_timeout_secs=0.5,
    )
    status, _, body = await exchange(port, post(chat()))
    assert status == 504 and orjson.loads(body)["error"]["code"] == "gateway_timeout"


async def test_a_client_that_never_reads_releases_the_upstream(nursery: trio.Nursery) -> None:
    """Without a write timeout such a client held its permits and the upstream stream for
    ever; with it, the stream is cancelled once the socket buffers stay full that long."""
    endless = Reply(chunks=[b"x" * 65536] * 100_000, headers=[(b"content-type", b"text/plain")])
    up = FakeUpstream(endless)
    port, _ = await gateway(nursery, up, client_write_timeout_secs=0.5)
    async with await trio.open_tcp_stream("127.0.0.1", port) as s:
        await s.send_all(post(chat()))
        with trio.fail_after(60):
            while not up.disconnected:
                await trio.sleep(0.1)
    assert up.active == 0


# -- hostile upstream heads -------------------------------------------------------------------


async def raw_upstream(nursery: trio.Nursery, answer: bytes) -> str:
    """An upstream that answers every request with ``answer`` verbatim."""

    async def handler(stream: trio.SocketStream) -> None:
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            await stream.send_all(answer)
            await stream.send_eof()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: " + b"9" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: 1\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\x01b\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 600 Nope\r\ncontent-length: 0\r\n\r\n",
    ],
)
async def test_hostile_upstream_heads_are_a_502_never_relayed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, answer: bytes
) -> None:
    _, url = await start_gateway(
        nursery, {"targets": {"m": {"url": await raw_upstream(nursery, answer)}}}
    )
    status, _, body = await exchange(int(url.rsplit(":", 1)[1]), post(chat()))
    assert status == 502 and orjson.loads(body)["error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_upstream_204_loses_its_content_length(nursery: trio.Nursery) -> None:
    upstream = await raw_upstream(nursery, b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": upstream}}})
    async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as s:
        await s.send_all(post(chat()))
        with trio.fail_after(30):
            data = await s.receive_some()
    assert data.startswith(b"HTTP/1.1 204 ") and b"content-length" not in data.lower()
