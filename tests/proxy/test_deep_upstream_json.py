"""Upstream JSON nested deeper than the gateway can write back (orjson reads 1024 levels,
writes 254) through sanitisation and strict mode: a clean 502 in the route's envelope, or an
error event inside a stream; never a 500, a traceback or the raw body.

The deep value sits in ``choices[].logprobs``, which both modes copy verbatim (anything they
drop never has to be written, so it cannot fail)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import trio

from tests.proxy.test_strict_http import SSE_HEADERS, body, exchange
from tests.support import Reply

# mode -> (target keys, top-level config keys)
MODES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "sanitize": ({"sanitize_response": True}, {}),
    "strict": ({}, {"strict_mode": True}),
}


def completion(depth: int, *, chunk: bool = False) -> bytes:
    """A completion (or chunk) whose ``logprobs`` nests ``depth`` arrays deep (built as bytes:
    orjson cannot write it either)."""
    deep = b"[" * depth + b"1" + b"]" * depth
    kind, part = (b"chat.completion.chunk", b"delta") if chunk else (b"chat.completion", b"message")
    return (
        b'{"id":"c","object":"'
        + kind
        + b'","created":1,"model":"m","choices":[{"index":0,"'
        + part
        + b'":{"role":"assistant","content":"hi"},"finish_reason":"stop","logprobs":'
        + deep
        + b"}]}"
    )


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("mode", MODES)
async def test_nesting_the_gateway_can_write_is_relayed(nursery: trio.Nursery, mode: str) -> None:
    target, config = MODES[mode]
    r, _ = await exchange(nursery, Reply(body=completion(200)), target, config=config)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"


@pytest.mark.parametrize("depth", [300, 2000])  # readable but not writable; not even readable
@pytest.mark.parametrize("mode", MODES)
async def test_a_body_nested_too_deeply_is_a_clean_502(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, mode: str, depth: int
) -> None:
    target, config = MODES[mode]
    r, _ = await exchange(nursery, Reply(body=completion(depth)), target, config=config)
    assert r.status_code == 502
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and b"[[[" not in r.content
    assert no_errors_logged(caplog)


@pytest.mark.parametrize("depth", [300, 2000])
@pytest.mark.parametrize("mode", MODES)
async def test_a_streamed_chunk_nested_too_deeply_ends_the_stream_with_an_error_event(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, mode: str, depth: int
) -> None:
    """The head (200) is out before the chunk arrives: the stream ends with one error event."""
    target, config = MODES[mode]
    good = b"data: " + completion(2, chunk=True) + b"\n\n"
    bad = b"data: " + completion(depth, chunk=True) + b"\n\n"
    reply = Reply(headers=SSE_HEADERS, chunks=[good, bad, good, b"data: [DONE]\n\n"])
    r, _ = await exchange(nursery, reply, target, config=config, json=body(stream=True))
    events = [orjson.loads(e[6:]) for e in r.content.split(b"\n\n") if e]
    assert r.status_code == 200 and len(events) == 2
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    assert events[1]["error"]["code"] == "upstream_stream_error"
    assert no_errors_logged(caplog)
