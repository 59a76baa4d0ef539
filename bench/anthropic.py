"""What the Anthropic Messages adapter adds per streamed event.

Sans-I/O, no sockets: a Chat Completions stream of ``--events`` content chunks (one SSE event
each, as an upstream writes them) is fed chunk by chunk through

* a pass-through that only iterates the chunks (what a relay does per chunk), and
* :class:`~onwards_trio._anthropic.stream.StreamTranslator` (decode, translate, encode),

and the difference divided by the event count is the CPU the translation adds per event. A
second figure feeds the same stream in 1 KiB network reads (events cut anywhere), the shape
the translator sees from a busy upstream.

End to end (one process, loopback sockets): bench/strict.py's fake upstream streams
``--events`` chat chunks through the gateway to an httpx client, once as a Chat Completions
stream relayed verbatim and once as ``/v1/messages`` translated; the difference per chunk is
what a client of the adapter pays (upstream, gateway and client share the CPU).

Run: ``python bench/anthropic.py [--events 5000] [--rounds 5]`` (also part of
``nox -s bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import httpx
import orjson
import trio
from hypercorn.trio import serve
from strict import stream_once, upstream_app  # bench/strict.py: the same upstream and reader

from onwards_trio import Gateway, parse_config
from onwards_trio._anthropic.stream import StreamTranslator
from onwards_trio._app.gateway import hypercorn_config


def chunk(delta: dict[str, object]) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def best_us(feed_all: Callable[[], None], n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        feed_all()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


async def end_to_end(n: int, rounds: int) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    messages = {**chat, "max_tokens": 10}
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, upstream_app(n), hypercorn_config("127.0.0.1", 0))
        config = {"targets": {"m": {"url": binds[0], "anthropic": {"adapter": True}}}}
        info = await nursery.start(Gateway(parse_config(config)).serve, "127.0.0.1", 0)
        cases = {
            "chat pass-through": ("/v1/chat/completions", chat),
            "/v1/messages": ("/v1/messages", messages),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        async with httpx.AsyncClient(base_url=info.url, timeout=60) as client:
            for path, body in cases.values():
                await stream_once(client, path, body)  # warm the connections
            for _ in range(rounds):  # interleaved, so drifting load hits both alike
                for name, (path, body) in cases.items():
                    times[name].append((await stream_once(client, path, body))[0])
        results = {name: statistics.median(values) for name, values in times.items()}
        nursery.cancel_scope.cancel()
    base = results["chat pass-through"]
    print(f"end to end over loopback, {n} chunks per stream, median of {rounds}:")
    for name, seconds in results.items():
        extra = "" if seconds is base else f"  (+{(seconds - base) / n * 1e6:.2f})"
        per = seconds / n * 1e6
        print(f"  {name:<18} {seconds * 1000:8.1f} ms/stream  {per:6.2f} us/chunk{extra}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    n, rounds = args.events, args.rounds
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": "token "}) for _ in range(n - 1)]
    whole = b"".join(events)
    reads = [whole[i : i + 1024] for i in range(0, len(whole), 1024)]

    def passthrough() -> None:
        for c in events:
            if not c:
                raise AssertionError

    def translate(chunks: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            t = StreamTranslator(message_id="msg_bench", model="alias")
            for c in chunks:
                t.feed(c)
            t.close()

        return run

    base = best_us(passthrough, n, rounds)
    per_event = best_us(translate(events), n, rounds)
    per_read = best_us(translate(reads), n, rounds)
    print(f"anthropic stream translation, {n} events of {len(events[1])} B, best of {rounds}:")
    print(f"  pass-through (iterate only)          {base:7.2f} us/event")
    print(f"  translator, one event per chunk      {per_event:7.2f} us/event")
    print(f"  translator, 1 KiB reads              {per_read:7.2f} us/event")
    print(f"  added per streamed event             {per_event - base:7.2f} us")
    print()
    trio.run(end_to_end, min(n, 2000), rounds)


if __name__ == "__main__":
    main()
