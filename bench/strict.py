"""What strict mode and ``sanitize_response`` cost per streamed chunk.

Two measurements:

1. **Sanitiser alone** (sans-io, no sockets): µs per SSE event for the framer, the non-strict
   chat sanitiser, the strict chat sanitiser and the strict Responses event sanitiser, against
   a pass-through that only iterates the chunks. This is the CPU the feature adds per chunk.
2. **End to end** (one process, loopback sockets): a fake upstream streams ``--events`` chat
   chunks (one network write each) through the gateway to an httpx client, with the target
   configured as pass-through, ``sanitize_response: true`` and ``strict_mode: true``. The
   difference to pass-through divided by the event count is the added cost per chunk as a
   client sees it (upstream, gateway and client share the CPU, so figures are relative).

Run: ``python bench/strict.py [--events 2000] [--rounds 5]`` (also part of ``nox -s bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import trio
from hypercorn.trio import serve

from onwards_trio import Gateway, parse_config
from onwards_trio._app.gateway import hypercorn_config
from onwards_trio._proxy.sanitize import StreamSanitizer, generic_error_body, sanitize_chat_chunk
from onwards_trio._proxy.strict import (
    chat_chunk_coercer,
    response_event_coercer,
    sse_error_formatter,
)
from onwards_trio._transport.asgi import serve_lifespan
from onwards_trio._transport.sse import SSEFramer

CHAT_CHUNK = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "upstream-model-2024-08-06",
        "system_fingerprint": "fp_1",
        "provider": "SomeProvider",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "token "},
                "finish_reason": None,
                "logprobs": None,
                "native_finish_reason": None,
            }
        ],
    }
)
RESPONSE_EVENT = orjson.dumps(
    {
        "type": "response.output_text.delta",
        "sequence_number": 7,
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": "token ",
    }
)


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


# --- 1. sans-io -----------------------------------------------------------------------------


def per_event_us(
    make: Callable[[], Callable[[bytes], Any]], chunks: list[bytes], rounds: int
) -> float:
    best = float("inf")
    for _ in range(rounds):
        feed = make()
        start = time.perf_counter()
        for c in chunks:
            feed(c)
        best = min(best, time.perf_counter() - start)
    return best / len(chunks) * 1e6


def sansio(n: int, rounds: int) -> None:
    chat = [event(CHAT_CHUNK)] * n
    resp = [event(RESPONSE_EVENT)] * n

    def passthrough() -> Callable[[bytes], Any]:
        return lambda c: c

    def framer() -> Callable[[bytes], Any]:
        return SSEFramer().feed

    def nonstrict() -> Callable[[bytes], Any]:
        return StreamSanitizer(
            lambda o: sanitize_chat_chunk(o, "alias"), lambda o: generic_error_body(500)
        ).feed

    def strict_chat() -> Callable[[bytes], Any]:
        return StreamSanitizer(
            chat_chunk_coercer("alias", lambda: "chatcmpl-x"), sse_error_formatter(False)
        ).feed

    def strict_responses() -> Callable[[bytes], Any]:
        return StreamSanitizer(
            response_event_coercer("alias", lambda: "resp_x"), sse_error_formatter(False)
        ).feed

    base = per_event_us(passthrough, chat, rounds)
    print(f"sanitiser alone, {n} events of {len(chat[0])} B, best of {rounds}:")
    print(f"  pass-through (iterate only)     {base:7.2f} us/event")
    for name, make, data in (
        ("SSE framing only", framer, chat),
        ("sanitize_response (non-strict)", nonstrict, chat),
        ("strict chat chunk", strict_chat, chat),
        ("strict responses event", strict_responses, resp),
    ):
        us = per_event_us(make, data, rounds)
        print(f"  {name:<31} {us:7.2f} us/event  (+{us - base:.2f})")


# --- 2. end to end --------------------------------------------------------------------------


def upstream_app(n: int) -> Any:
    chunk = event(CHAT_CHUNK)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for _ in range(n):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


async def stream_once(
    client: httpx.AsyncClient,
    path: str = "/v1/chat/completions",
    body: dict[str, Any] | None = None,
) -> tuple[float, int]:
    """One streamed request read to its end: (seconds, bytes). Also used by bench/anthropic.py."""
    if body is None:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    start = time.perf_counter()
    size = 0
    async with client.stream("POST", path, json=body) as r:
        async for data in r.aiter_raw():
            size += len(data)
    return time.perf_counter() - start, size


async def end_to_end(n: int, rounds: int) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, upstream_app(n), hypercorn_config("127.0.0.1", 0))
        upstream = binds[0]
        results: dict[str, float] = {}
        modes: dict[str, dict[str, Any]] = {
            "pass-through": {"targets": {"m": {"url": upstream}}},
            "sanitize_response": {"targets": {"m": {"url": upstream, "sanitize_response": True}}},
            "strict_mode": {"targets": {"m": {"url": upstream}}, "strict_mode": True},
        }
        for name, config in modes.items():
            gateway = Gateway(parse_config(config))
            info = await nursery.start(gateway.serve, "127.0.0.1", 0)
            async with httpx.AsyncClient(base_url=info.url, timeout=60) as client:
                await stream_once(client)  # warm the connections
                times = [(await stream_once(client))[0] for _ in range(rounds)]
            results[name] = statistics.median(times)
        nursery.cancel_scope.cancel()
    base = results["pass-through"]
    print(f"end to end over loopback, {n} chunks per stream, median of {rounds}:")
    for name, seconds in results.items():
        per = seconds / n * 1e6
        extra = "" if name == "pass-through" else f"  (+{(seconds - base) / n * 1e6:.2f})"
        print(f"  {name:<18} {seconds * 1000:8.1f} ms/stream  {per:6.2f} us/chunk{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sansio(max(args.events, 20000), args.rounds)
    print()
    trio.run(end_to_end, args.events, args.rounds)


if __name__ == "__main__":
    main()
