"""Logs during real requests over loopback: one access line each, and never a secret."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import httpx
import orjson
import pytest
import trio

from onwards_trio import Gateway, parse_config
from onwards_trio._ops import logs as _logging
from onwards_trio._ops.logs import configure_logging
from onwards_trio._ops.reload import config_secrets
from onwards_trio._proxy import pipeline
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"
CLIENT_KEY = "client-key-7f3a9c1e5b"
UPSTREAM_KEY = "upstream-key-4d8e2b6a0c"
PROMPT = "the-prompt-text-nobody-may-log"
COMPLETION = "the-completion-text-nobody-may-log"

# The gateway tells the access log which alias and provider served a request through
# note_request() (see docs/operations.md, "Wiring").


@pytest.fixture
def handler_output() -> Iterator[io.StringIO]:
    """The formatted output of the gateway's own handler, at debug level."""
    root = logging.getLogger("onwards_trio")
    saved = (
        list(root.handlers),
        root.level,
        root.propagate,
        _logging._installed,
        _logging._guard,
        _logging._writer,
    )
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    root.propagate = True  # let caplog see the raw records as well
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]
    _logging._installed, _logging._guard, _logging._writer = saved[3], saved[4], saved[5]


async def _traffic(nursery: trio.Nursery, up: FakeUpstream, **pool: Any) -> None:
    config = {
        "auth": {"global_keys": [CLIENT_KEY]},
        "targets": {
            "gpt-4": {"url": await serve_app(nursery, up), "onwards_key": UPSTREAM_KEY, **pool}
        },
    }
    _, url = await start_gateway(nursery, config)
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    messages = [{"role": "user", "content": PROMPT}]
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        r1 = await client.post(CHAT, json={"model": "gpt-4", "messages": messages})
        r2 = await client.post(CHAT, json={"model": "gpt-4", "messages": messages, "stream": True})
        r3 = await client.post(CHAT, json={"model": "nope", "messages": messages})
        r4 = await client.post(f"{CHAT}?api_key={CLIENT_KEY}", json={"model": "gpt-4"})
    assert [r1.status_code, r2.status_code, r3.status_code, r4.status_code] == [200, 200, 404, 200]
    assert COMPLETION in r1.text and COMPLETION in r2.text


async def _access_lines(stream: io.StringIO, n: int) -> list[str]:
    """The access lines, once ``n`` are there (a handler logs after its client got the reply)."""
    with trio.fail_after(5):
        while True:
            lines = [ln for ln in stream.getvalue().splitlines() if "onwards_trio.access" in ln]
            if len(lines) >= n:
                return lines
            await trio.sleep(0.01)


def _script(rec: Any) -> Reply:
    if b'"stream":true' in rec.body:
        return Reply(
            headers=[(b"content-type", b"text/event-stream")],
            chunks=sse({"choices": [{"index": 0, "delta": {"content": COMPLETION}}]}),
        )
    return Reply(body=chat_completion(COMPLETION))


async def test_no_secret_prompt_or_completion_in_any_log_record(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, handler_output: io.StringIO
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, every level: the raw records
    await _traffic(nursery, FakeUpstream(_script))
    assert len(await _access_lines(handler_output, 4)) == 4  # the traffic was logged ...
    # (access lines are written by the gateway's batch writer, the other lines via records)
    raw = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in (CLIENT_KEY, UPSTREAM_KEY, PROMPT, COMPLETION):
        assert secret not in raw  # ... and nothing private was
        assert secret not in handler_output.getvalue()


async def test_one_access_line_per_request(
    nursery: trio.Nursery, handler_output: io.StringIO
) -> None:
    await _traffic(nursery, FakeUpstream(_script))
    lines = await _access_lines(handler_output, 4)
    await trio.sleep(0.1)
    assert len(await _access_lines(handler_output, 4)) == 4
    assert all("method=POST path=/v1/chat/completions status=" in ln for ln in lines)
    assert sorted(ln.split("status=")[1].split()[0] for ln in lines) == ["200", "200", "200", "404"]
    assert not any("api_key" in ln for ln in lines)  # the query string is never logged
    assert all("duration_ms=" in ln for ln in lines)


# Under the built-in server the relay of a plain proxy request is cancelled through the
# connection's own scope (the cancellation leaves the handler); hypercorn's watcher task ends it
# quietly instead. Both must log the request as 499.
@pytest.mark.parametrize("server", ["onwards", "hypercorn"])
async def test_a_client_gone_before_the_answer_is_logged_as_499(
    nursery: trio.Nursery, handler_output: io.StringIO, server: Literal["onwards", "hypercorn"]
) -> None:
    up = FakeUpstream(Reply(body=chat_completion(COMPLETION), delay=30))
    config = {"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}
    gateway = Gateway(parse_config(config))
    info = await nursery.start(partial(gateway.serve, "127.0.0.1", 0, server=server))
    host, port = info.url.removeprefix("http://").rsplit(":", 1)
    payload = b'{"model":"gpt-4","messages":[]}'
    async with await trio.open_tcp_stream(host, int(port)) as client:
        await client.send_all(
            b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (CHAT.encode(), len(payload), payload)
        )
        with trio.fail_after(5):  # leave while the upstream still thinks
            while not up.active:
                await trio.sleep(0.01)
    (line,) = await _access_lines(handler_output, 1)
    assert "path=/v1/chat/completions status=499" in line and "alias=gpt-4" in line


async def test_access_line_names_alias_provider_and_sizes(
    nursery: trio.Nursery, handler_output: io.StringIO
) -> None:
    await _traffic(nursery, FakeUpstream(_script))
    lines = await _access_lines(handler_output, 4)
    served = [ln for ln in lines if "status=200" in ln]
    assert len(served) == 3
    assert all("alias=gpt-4 provider=0" in ln for ln in served)
    assert all("bytes_in=" in ln and "bytes_out=" in ln for ln in served)
    assert sum("stream=true" in ln.lower() for ln in lines) == 1


@pytest.mark.parametrize("server", ["onwards", "hypercorn"])
async def test_a_streamed_answer_is_counted_whole_on_its_access_line(
    nursery: trio.Nursery, handler_output: io.StringIO, server: Literal["onwards", "hypercorn"]
) -> None:
    """Every body byte the client got and the usage of the stream's final chunk, with each
    event arriving on its own (the built-in server writes them past the ASGI messages)."""
    usage = {"prompt_tokens": 12, "completion_tokens": 7}
    chunks = sse(
        *({"choices": [{"index": 0, "delta": {"content": c}}]} for c in "abc"),
        {"choices": [], "usage": usage},
    )
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.01)
    )
    gateway = Gateway(parse_config({"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}))
    info = await nursery.start(partial(gateway.serve, "127.0.0.1", 0, server=server))
    options = {"include_usage": True}
    async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
        request = {"model": "gpt-4", "messages": [], "stream": True, "stream_options": options}
        r = await client.post(CHAT, json=request)
    assert r.content == b"".join(chunks)
    (line,) = await _access_lines(handler_output, 1)
    assert f"bytes_out={len(r.content)} " in line
    assert "input_tokens=12 output_tokens=7" in line


async def test_strict_mode_access_line_names_alias_provider_and_size(
    nursery: trio.Nursery, handler_output: io.StringIO
) -> None:
    url = await serve_app(nursery, FakeUpstream(_script))
    _, gateway_url = await start_gateway(
        nursery, {"strict_mode": True, "targets": {"gpt-4": {"url": url}}}
    )
    messages = [{"role": "user", "content": PROMPT}]
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        r = await client.post(CHAT, json={"model": "gpt-4", "messages": messages})
    assert r.status_code == 200
    (line,) = await _access_lines(handler_output, 1)
    assert "alias=gpt-4 provider=0" in line and "bytes_in=" in line


def test_config_secrets_cover_client_and_upstream_keys() -> None:
    from onwards_trio import parse_config

    config = parse_config(
        {
            "auth": {"global_keys": [CLIENT_KEY], "key_definitions": {"k": {"key": "def-key-123"}}},
            "targets": {"a": {"url": "https://a", "onwards_key": UPSTREAM_KEY}},
        }
    )
    assert config_secrets(config) == {CLIENT_KEY, UPSTREAM_KEY, "def-key-123"}


async def _demo_gateway(nursery: trio.Nursery, tmp_path: Any) -> str:
    """The demo config (its upstream served too, a SQLite store in ``tmp_path``): the URL."""
    from onwards_trio._app.demo import demo_config, demo_upstream

    upstream = await serve_app(nursery, demo_upstream(delay=0))
    gateway = Gateway(demo_config(upstream, store_path=str(tmp_path / "r.sqlite3")))
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    return str(info.url)


async def test_responses_access_line_names_the_alias(
    nursery: trio.Nursery, handler_output: io.StringIO, tmp_path: Any
) -> None:
    url = await _demo_gateway(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post("/v1/responses", json={"model": "demo", "input": PROMPT})
    assert r.status_code == 200
    (line,) = await _access_lines(handler_output, 1)
    assert "path=/v1/responses" in line and "alias=demo" in line


async def test_messages_access_line_names_alias_provider_and_client_size(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, handler_output: io.StringIO
) -> None:
    caplog.set_level(logging.DEBUG)
    url = await serve_app(nursery, FakeUpstream(_script))
    config = {
        "auth": {"global_keys": [CLIENT_KEY]},
        "targets": {"claude": {"url": url, "anthropic": {"adapter": True}}},
    }
    _, gateway_url = await start_gateway(nursery, config)
    body = {"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": PROMPT}]}
    raw = orjson.dumps(body)
    headers = {"x-api-key": CLIENT_KEY, "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        r = await client.post("/v1/messages", content=raw, headers=headers)
    assert r.status_code == 200
    (line,) = await _access_lines(handler_output, 1)
    assert "path=/v1/messages" in line and "alias=claude provider=0" in line
    assert f"bytes_in={len(raw)}" in line
    logged = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert CLIENT_KEY not in logged and PROMPT not in logged


async def test_access_line_carries_the_token_usage(
    nursery: trio.Nursery, handler_output: io.StringIO
) -> None:
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    upstream = FakeUpstream(Reply(body=chat_completion(COMPLETION, usage=usage)))
    _, url = await start_gateway(
        nursery, {"targets": {"gpt-4": {"url": await serve_app(nursery, upstream)}}}
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post(CHAT, json={"model": "gpt-4", "messages": []})
    assert r.status_code == 200
    (line,) = await _access_lines(handler_output, 1)
    assert "input_tokens=12 output_tokens=7 cached_tokens=4" in line


async def _numbered_gateway(nursery: trio.Nursery) -> str:
    """A gateway whose upstream answers its n-th request with usage n in, 2n out."""
    answers = iter(range(1, 100))

    def script(request: Any) -> Reply:
        n = next(answers)
        usage = {"prompt_tokens": n, "completion_tokens": 2 * n, "total_tokens": 3 * n}
        return Reply(body=chat_completion(COMPLETION, usage=usage))

    up = FakeUpstream(script)
    _, url = await start_gateway(
        nursery, {"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}}
    )
    return url


async def test_access_lines_carry_a_plain_usage_read_with_their_batch(
    nursery: trio.Nursery, handler_output: io.StringIO
) -> None:
    """With only the access log wanting the usage, each body is handed to the line unread
    and its writer reads the batch's bodies together: every line still has its own figures."""
    url = await _numbered_gateway(nursery)
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as client,
        trio.open_nursery() as senders,
    ):
        for _ in range(6):
            senders.start_soon(partial(client.post, CHAT, json={"model": "gpt-4", "messages": []}))
    lines = await _access_lines(handler_output, 6)
    figures = sorted(
        (
            int(ln.split("input_tokens=")[1].split()[0]),
            ln.split("input_tokens=")[1].split(" ", 1)[1],
        )
        for ln in lines
    )
    assert figures == [(n, f"output_tokens={2 * n} cached_tokens=0") for n in range(1, 7)]


async def test_an_answer_that_came_whole_is_handed_to_its_line_without_a_keeper(
    nursery: trio.Nursery, handler_output: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual answer (its whole body with its head, only the access line reading its
    usage) gives the line its bytes: no keeper, no tap on the relay; the figures are its own."""

    def no_keeper() -> None:
        raise AssertionError("a keeper was made for a body that came whole")

    monkeypatch.setattr(pipeline, "UsageKeeper", no_keeper)
    url = await _numbered_gateway(nursery)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(3):
            r = await client.post(CHAT, json={"model": "gpt-4", "messages": []})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    lines = await _access_lines(handler_output, 3)
    assert [ln.split("input_tokens=")[1] for ln in lines] == [
        f"{n} output_tokens={2 * n} cached_tokens=0" for n in range(1, 4)
    ]


async def test_a_responses_access_line_sums_the_usage_of_every_model_call(
    nursery: trio.Nursery, handler_output: io.StringIO, tmp_path: Any
) -> None:
    url = await _demo_gateway(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.post(
            "/v1/responses", json={"model": "demo", "input": "what is the weather in Paris"}
        )
    assert r.status_code == 200
    body = r.json()
    assert any(item["type"] == "function_call" for item in body["output"])  # two model calls
    (line,) = await _access_lines(handler_output, 1)
    usage = body["usage"]
    assert f"input_tokens={usage['input_tokens']} output_tokens={usage['output_tokens']} " in line
