"""What the Anthropic Messages adapter adds per streamed event.

Sans-I/O, no sockets: a Chat Completions stream of ``--events`` content chunks (one SSE event
each, as an upstream writes them) is fed chunk by chunk through

* a pass-through that only iterates the chunks (what a relay does per chunk), and
* :class:`~onwards_trio._anthropic.stream.StreamTranslator` (decode, translate, encode),

and the difference divided by the event count is the CPU the translation adds per event. A
second figure feeds the same stream in 1 KiB network reads (events cut anywhere), the shape
the translator sees from a busy upstream.

Run: ``python bench/anthropic.py [--events 5000] [--rounds 5]`` (also part of
``nox -s bench``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from onwards_trio._anthropic.stream import StreamTranslator


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


if __name__ == "__main__":
    main()
