"""The failed answer a gateway may report after its fallbacks (the last upstream's error) is
read up to 64 KiB and no further: the gateway answers with those bytes, in order, as soon as
it has them, without waiting for the rest of a body that may never end."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from onwards_trio._transport.asgi import serve_lifespan
from tests.support import serve_app, start_gateway

LIMIT = 64 * 1024


def pieces() -> list[bytes]:
    """64 KiB in 17 pieces, each of its own letter: sixteen that make it one byte short, and
    the last byte alone."""
    out = [bytes([ord("a") + i]) * 4096 for i in range(16)]
    out[-1] = out[-1][:-1]
    return [*out, b"z"]


class StallingUpstream:
    """Answers 503 with a chunked body: the pieces, then nothing (the connection stays open)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        for piece in pieces():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await trio.sleep(0.02)  # each piece its own read
        await trio.sleep_forever()


async def test_a_failed_answer_is_reported_from_its_first_64_kib_without_the_rest(
    nursery: trio.Nursery,
) -> None:
    pool = {
        "providers": [{"url": await serve_app(nursery, StallingUpstream())}],
        "fallback": {"enabled": True, "on_status": [5]},
    }
    _, url = await start_gateway(nursery, {"targets": {"m": pool}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        with trio.fail_after(20):  # the upstream never ends its body
            r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503
    assert r.content == b"".join(pieces())
    assert len(r.content) == LIMIT
