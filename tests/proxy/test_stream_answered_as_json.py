"""An upstream that answers a stream request with one plain JSON body (it ignored
``stream: true``): the client gets that body untouched, and the usage in it settles the
request's token reservation, as for any JSON answer."""

from __future__ import annotations

import httpx
import orjson
import trio

from tests.support import FakeUpstream, Reply, chat_completion, serve_app, start_gateway

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_a_json_answer_to_a_stream_request_is_relayed_and_settles_its_tokens(
    nursery: trio.Nursery,
) -> None:
    answer = chat_completion(usage=USAGE)
    pool = {
        "providers": [{"url": await serve_app(nursery, FakeUpstream(Reply(body=answer)))}],
        "token_limit": {"tokens": 100_000, "window_secs": 1e9},  # no refill to speak of
    }
    _, url = await start_gateway(nursery, {"targets": {"m": pool}})
    # no stream_options: the gateway asks the upstream for the usage itself
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=body)
        second = await client.post("/v1/chat/completions", json=body)
    for r in (first, second):
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.content == answer
    # each reserved the same estimate; the first's was settled down to the 8 tokens it used
    left = [int(r.headers["x-ratelimit-remaining-tokens"]) for r in (first, second)]
    assert left[1] == left[0] - 8


async def test_a_json_answer_without_usage_to_a_stream_request_is_relayed_byte_for_byte(
    nursery: trio.Nursery,
) -> None:
    answer = chat_completion(usage=None)  # "usage":null, as some upstreams write it
    pool = {
        "providers": [{"url": await serve_app(nursery, FakeUpstream(Reply(body=answer)))}],
        "token_limit": {"tokens": 100_000, "window_secs": 1e9},
    }
    _, url = await start_gateway(nursery, {"targets": {"m": pool}})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.content == answer
    assert orjson.loads(r.content)["usage"] is None
