"""Non-strict ``sanitize_response`` over real sockets (reference 3.J; SPEC §2.5, §2.8)."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import httpx
import orjson
import trio

from tests.proxy.test_sanitize import chunk
from tests.proxy.test_strict_http import CHAT, SSE_HEADERS, body, exchange, gateway_client
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse


async def client_for(
    nursery: trio.Nursery, targets: dict[str, Any], **config: Any
) -> httpx.AsyncClient:
    return await gateway_client(nursery, targets, **config)


async def one(
    nursery: trio.Nursery, reply: Reply, target: dict[str, Any] | None = None, **req: Any
) -> tuple[httpx.Response, FakeUpstream]:
    return await exchange(nursery, reply, {"sanitize_response": True, **(target or {})}, **req)


async def test_non_streaming_removes_unknown_fields(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(custom_provider_field="x", another_unknown_field=1))
    r, _ = await one(nursery, reply)
    data = r.json()
    assert r.status_code == 200
    assert "custom_provider_field" not in data and "another_unknown_field" not in data
    assert data["choices"][0]["message"]["content"] == "hi"
    assert int(r.headers["content-length"]) == len(r.content)


async def test_non_streaming_rewrites_model_to_the_alias(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(model="gpt-4-turbo-2024-04-09"))
    r, up = await one(nursery, reply, {"onwards_model": "gpt-4-turbo-2024-04-09"})
    assert up.requests[0].json()["model"] == "gpt-4-turbo-2024-04-09"
    assert r.json()["model"] == "gpt-4"


async def test_streaming_removes_unknown_fields_and_keeps_done(nursery: trio.Nursery) -> None:
    reply = Reply(headers=SSE_HEADERS, chunks=sse(chunk("Hi", custom_field="leak")))
    r, _ = await one(nursery, reply, json=body(stream=True))
    assert b"custom_field" not in r.content
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert r.headers["content-type"] == "text/event-stream"


async def test_streaming_rewrites_model(nursery: trio.Nursery) -> None:
    reply = Reply(headers=SSE_HEADERS, chunks=sse(chunk("a"), chunk("b")))
    r, _ = await one(nursery, reply, json=body(stream=True))
    assert b'"model":"gpt-4"' in r.content and b"gpt-4-turbo" not in r.content


async def test_streaming_sse_events_split_across_network_chunks(nursery: trio.Nursery) -> None:
    raw = b"".join(sse(chunk("a", provider="leak"), chunk("b")))
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    r, _ = await one(nursery, Reply(headers=SSE_HEADERS, chunks=pieces), json=body(stream=True))
    assert r.content.count(b"data: ") == 3
    assert b"leak" not in r.content


async def test_disabled_sanitisation_passes_through(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(custom_provider_field="x"))
    r, _ = await one(nursery, reply, {"sanitize_response": False})
    assert r.json()["custom_provider_field"] == "x"


async def test_only_chat_completions_are_rewritten(nursery: trio.Nursery) -> None:
    reply = Reply(body=b'{"object":"list","data":[],"model":"m","custom_field":1}')
    r, _ = await one(nursery, reply, path="/v1/embeddings", json={"model": "gpt-4", "input": "x"})
    assert r.json()["custom_field"] == 1


async def test_pool_level_sanitisation_applies_to_its_providers(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(body=chat_completion(custom_provider_field="x")))
    url = await serve_app(nursery, up)
    pool = {"providers": [{"url": url}], "sanitize_response": True}
    async with await client_for(nursery, {"gpt-4": pool}) as client:
        r = await client.post(CHAT, json=body())
    assert "custom_provider_field" not in r.json()


async def test_4xx_error_body_is_replaced_and_status_kept(nursery: trio.Nursery) -> None:
    reply = Reply(status=422, body=b'{"error":{"message":"provider internals: db=pg-7"}}')
    r, _ = await one(nursery, reply)
    assert r.status_code == 422
    assert r.json() == {
        "error": {
            "message": "The upstream provider rejected the request.",
            "type": "invalid_request_error",
            "param": None,
            "code": "upstream_error",
        }
    }


async def test_5xx_error_body_is_replaced_and_status_kept(nursery: trio.Nursery) -> None:
    r, _ = await one(nursery, Reply(status=503, body=b"<html>upstream trace 0xdead</html>"))
    assert r.status_code == 503
    assert r.json()["error"] == {
        "message": "An internal error occurred. Please try again later.",
        "type": "internal_error",
        "param": None,
        "code": "internal_error",
    }


async def test_disabled_error_sanitisation_passes_through(nursery: trio.Nursery) -> None:
    reply = Reply(status=422, body=b'{"error":{"message":"provider detail"}}')
    r, _ = await one(nursery, reply, {"sanitize_response": False})
    assert r.json()["error"]["message"] == "provider detail"


async def test_untrusted_account_class_error_is_masked(nursery: trio.Nursery) -> None:
    r, _ = await one(nursery, Reply(status=401, body=b'{"error":"bad upstream key"}'))
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "internal_error"


async def test_trusted_provider_keeps_its_error_status(nursery: trio.Nursery) -> None:
    r, _ = await one(nursery, Reply(status=401, body=b"{}"), {"trusted": True})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "upstream_error"


async def test_configured_response_headers_survive_a_sanitised_error(
    nursery: trio.Nursery,
) -> None:
    reply = Reply(status=500, body=b"boom", headers=[(b"x-upstream-trace", b"abc")])
    r, _ = await one(nursery, reply, {"response_headers": {"Input-Price-Per-Token": "0.01"}})
    assert r.headers["input-price-per-token"] == "0.01"
    assert "x-upstream-trace" not in r.headers


async def test_gzip_json_body_is_decoded_and_sanitised(nursery: trio.Nursery) -> None:
    compressed = gzip.compress(chat_completion(custom_provider_field="x"))
    reply = Reply(
        body=compressed,
        headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
    )
    r, _ = await one(nursery, reply)
    assert r.status_code == 200
    assert "content-encoding" not in r.headers
    assert int(r.headers["content-length"]) == len(r.content)
    assert "custom_provider_field" not in orjson.loads(r.content)


async def test_gzip_sse_stream_is_decoded_and_sanitised(nursery: trio.Nursery) -> None:
    compressed = gzip.compress(b"".join(sse(chunk("a", provider="leak"), chunk("b"))))
    pieces = [compressed[i : i + 9] for i in range(0, len(compressed), 9)]
    headers = [*SSE_HEADERS, (b"content-encoding", b"gzip")]
    r, _ = await one(nursery, Reply(headers=headers, chunks=pieces), json=body(stream=True))
    assert "content-encoding" not in r.headers
    assert r.content.count(b"data: ") == 3 and b"leak" not in r.content


async def test_gzip_stream_cut_between_events_ends_with_an_error_event(
    nursery: trio.Nursery,
) -> None:
    gz = zlib.compressobj(wbits=31)
    first = gz.compress(b"".join(sse(chunk("a"), done=False))) + gz.flush(zlib.Z_SYNC_FLUSH)
    headers = [*SSE_HEADERS, (b"content-encoding", b"gzip")]
    reply = Reply(headers=headers, chunks=[first])  # the upstream stops after the first event
    r, _ = await one(nursery, reply, json=body(stream=True))
    events = [e for e in r.content.split(b"\n\n") if e]
    assert len(events) == 2
    assert orjson.loads(events[1][6:])["error"]["code"] == "upstream_stream_error"


async def test_brotli_success_body_is_refused_not_leaked(nursery: trio.Nursery) -> None:
    reply = Reply(
        body=b"\x8b\x02\x80opaque",
        headers=[(b"content-type", b"application/json"), (b"content-encoding", b"br")],
    )
    r, _ = await one(nursery, reply)
    assert r.status_code == 502
    assert b"opaque" not in r.content


async def test_unparseable_success_body_is_502(nursery: trio.Nursery) -> None:
    r, _ = await one(nursery, Reply(body=b'{"choices": "not a list", "model": "m"}'))
    assert r.status_code == 502


async def test_malformed_chunk_ends_the_stream_with_an_error_event(
    nursery: trio.Nursery,
) -> None:
    chunks = [*sse(chunk("a"), done=False), b"data: {broken\n\n", *sse(chunk("b"))]
    r, _ = await one(nursery, Reply(headers=SSE_HEADERS, chunks=chunks), json=body(stream=True))
    events = [e for e in r.content.split(b"\n\n") if e]
    assert len(events) == 2
    assert orjson.loads(events[1][6:])["error"]["code"] == "upstream_stream_error"


async def test_untrusted_error_inside_a_200_stream_is_standardised(
    nursery: trio.Nursery,
) -> None:
    chunks = sse(chunk("a"), {"error": {"message": "OOM on GPU 3", "code": 500}})
    r, _ = await one(nursery, Reply(headers=SSE_HEADERS, chunks=chunks), json=body(stream=True))
    assert r.status_code == 200
    assert b"OOM" not in r.content and b'"error"' in r.content
    assert r.content.endswith(b"data: [DONE]\n\n")


async def test_trusted_error_inside_a_200_stream_is_verbatim(nursery: trio.Nursery) -> None:
    chunks = sse(chunk("a"), {"error": {"message": "Input too long", "code": 400}})
    reply = Reply(headers=SSE_HEADERS, chunks=chunks)
    r, _ = await one(nursery, reply, {"trusted": True}, json=body(stream=True))
    assert b"Input too long" in r.content


async def test_success_body_that_breaks_off_is_a_502(nursery: trio.Nursery) -> None:
    whole = chat_completion()
    reply = Reply(chunks=[whole[:10], whole[10:]], fail_after=1)
    r, _ = await one(nursery, reply)
    assert r.status_code == 502  # not a 500: the upstream failed, not the gateway


async def test_error_body_that_breaks_off_is_still_replaced(nursery: trio.Nursery) -> None:
    reply = Reply(status=503, chunks=[b"secret internals", b"more"], fail_after=1)
    r, _ = await one(nursery, reply)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "internal_error"
    assert b"secret" not in r.content


async def test_dribbling_error_body_does_not_hang_the_answer(nursery: trio.Nursery) -> None:
    reply = Reply(status=500, chunks=[b"a"] * 100, chunk_delay=1.0)  # 100 s to finish
    with trio.fail_after(8):
        r, _ = await one(nursery, reply)
    assert r.status_code == 500


async def test_stored_completions_api_is_not_mangled(nursery: trio.Nursery) -> None:
    listing = b'{"object":"list","data":[{"id":"chatcmpl-1"}],"has_more":false}'
    up = FakeUpstream(Reply(body=listing))
    url = await serve_app(nursery, up)
    async with await client_for(nursery, {"gpt-4": {"url": url, "sanitize_response": True}}) as c:
        r = await c.get(CHAT, headers={"model-override": "gpt-4"})
    assert r.status_code == 200 and r.content == listing


async def test_configured_sse_event_cap_ends_the_stream_with_an_error_event(
    nursery: trio.Nursery,
) -> None:
    chunks = [*sse(chunk("a"), done=False), *sse(chunk("x" * 5000))]
    r, _ = await one(
        nursery,
        Reply(headers=SSE_HEADERS, chunks=chunks),
        json=body(stream=True),
        config={"sse_max_event_bytes": 1000},
    )
    events = [e for e in r.content.split(b"\n\n") if e]
    assert len(events) == 2
    assert orjson.loads(events[0][6:])["choices"][0]["delta"]["content"] == "a"
    assert "error" in orjson.loads(events[1][6:])
