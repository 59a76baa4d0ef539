"""The transparent proxy over real sockets: routing, request shaping, relay, errors."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from contextlib import aclosing
from functools import partial
from typing import Any, Literal

import httpx
import orjson
import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"


def body(model: str = "gpt-4", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def gateway_with(
    nursery: trio.Nursery, targets: dict[str, Any], **config: Any
) -> tuple[str, httpx.AsyncClient]:
    _, url = await start_gateway(nursery, {"targets": targets, **config})
    client = httpx.AsyncClient(base_url=url, timeout=10)
    return url, client


async def test_routes_each_alias_to_its_upstream(nursery: trio.Nursery) -> None:
    a, b = (
        FakeUpstream(Reply(body=chat_completion("from a"))),
        FakeUpstream(Reply(body=chat_completion("from b"))),
    )
    url_a, url_b = await serve_app(nursery, a), await serve_app(nursery, b)
    _, client = await gateway_with(nursery, {"gpt-4": {"url": url_a}, "claude": {"url": url_b}})
    async with client:
        ra = await client.post(CHAT, json=body("gpt-4"))
        rb = await client.post(CHAT, json=body("claude"))
    assert ra.json()["choices"][0]["message"]["content"] == "from a"
    assert rb.json()["choices"][0]["message"]["content"] == "from b"
    assert (len(a.requests), len(b.requests)) == (1, 1)


async def test_unknown_model_is_404_in_the_onwards_envelope(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(nursery, {"gpt-4": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.post(CHAT, json=body("nope"))
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "The model `nope` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    assert up.requests == []


@pytest.mark.parametrize("payload", [b"{}", b"not json", b"", b'{"model": 3}', b"[1]"])
async def test_missing_model_is_400(nursery: trio.Nursery, payload: bytes) -> None:
    _, client = await gateway_with(nursery, {"gpt-4": {"url": "http://127.0.0.1:9"}})
    async with client:
        r = await client.post(CHAT, content=payload)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"
    assert r.json()["error"]["param"] == "model"


async def test_model_override_header_wins_over_body(nursery: trio.Nursery) -> None:
    header, bodyup = FakeUpstream(), FakeUpstream()
    _, client = await gateway_with(
        nursery,
        {
            "header-model": {"url": await serve_app(nursery, header), "onwards_key": "hk"},
            "body-model": {"url": await serve_app(nursery, bodyup)},
        },
    )
    async with client:
        r = await client.post(
            CHAT, json=body("body-model"), headers={"model-override": "header-model"}
        )
    assert r.status_code == 200
    assert len(header.requests) == 1 and bodyup.requests == []
    assert header.requests[0].headers["authorization"] == "Bearer hk"
    assert "model-override" not in header.requests[0].headers


async def test_get_with_model_override_is_forwarded(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(body=b'{"object":"model","id":"x"}'))
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.get("/v1/models/x", headers={"model-override": "m"})
    assert r.status_code == 200
    assert up.requests[0].method == "GET" and up.requests[0].path == "/v1/models/x"


async def test_body_passes_through_byte_for_byte(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(nursery, {"gpt-4": {"url": await serve_app(nursery, up)}})
    raw = b'{ "messages" : [ ], "zeta":1.50, "model":"gpt-4" ,"alpha": "\\u00e9" }'
    async with client:
        await client.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert up.requests[0].body == raw


async def test_onwards_model_rewrites_only_the_model(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(
        nursery, {"gpt-4": {"url": await serve_app(nursery, up), "onwards_model": "real-model"}}
    )
    async with client:
        await client.post(CHAT, json=body("gpt-4", temperature=0.7))
    sent = up.requests[0].json()
    assert sent["model"] == "real-model"
    assert sent["temperature"] == 0.7 and sent["messages"] == body()["messages"]


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("/v1", "/v1/chat/completions", "/v1/chat/completions"),
        ("", "/v1/chat/completions", "/v1/chat/completions"),
        ("/v2", "/v1/chat/completions", "/v2/v1/chat/completions"),
        ("/v1", "/v1x/something", "/v1/v1x/something"),
        ("", "/v1/v1/something", "/v1/v1/something"),
        ("/v1", "/v1/chat/completions?stream=true&x=%20", "/v1/chat/completions"),
        ("/openai/v1", "/openai/v1/models/a", "/openai/v1/models/a"),
    ],
)
async def test_upstream_url_joining(
    nursery: trio.Nursery, base: str, path: str, expected: str
) -> None:
    up = FakeUpstream()
    upstream = await serve_app(nursery, up)
    _, client = await gateway_with(nursery, {"m": {"url": upstream + base}})
    async with client:
        r = await client.post(path, json=body("m"))
    assert r.status_code == 200
    assert up.requests[0].path == expected
    if "?" in path:
        assert up.requests[0].query == path.split("?", 1)[1]


async def raw_post(url: str, path: str, payload: bytes) -> bytes:
    """POST with the request line exactly as given (httpx would normalise the path)."""
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    async with stream:
        await stream.send_all(
            b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\nconnection: close\r\n\r\n"
            + payload
        )
        data = b""
        with trio.fail_after(5):
            while not _complete(data) and (chunk := await stream.receive_some()):
                data += chunk
    return data


def _complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value)
    return False


async def test_request_path_cannot_change_the_upstream_host(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    upstream = await serve_app(nursery, up)
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": upstream + "/v1"}}})
    answer = await raw_post(url, "//evil.example/x", orjson.dumps(body("m")))
    assert answer.startswith(b"HTTP/1.1 200")
    assert up.requests[0].path == "/v1//evil.example/x"
    assert up.requests[0].headers["host"] == upstream.removeprefix("http://")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1/./x",
        "/v1/%252e%252e/admin",  # for an upstream that decodes twice
        "/v1/%25252E./admin",
        "/v1/..\\admin",  # for an upstream that reads a backslash as a slash
        "/v1/..%5cadmin",
    ],
)
async def test_dot_segments_are_refused(nursery: trio.Nursery, path: str) -> None:
    up = FakeUpstream()
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": await serve_app(nursery, up)}}})
    answer = await raw_post(url, path, orjson.dumps(body("m")))
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"code":"bad_request"' in answer
    assert up.requests == []


async def test_upstream_auth_header_name_and_prefix(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    upstream = await serve_app(nursery, up)
    _, client = await gateway_with(
        nursery,
        {
            "default": {"url": upstream, "onwards_key": "sk-1"},
            "named": {
                "url": upstream,
                "onwards_key": "k2",
                "upstream_auth_header_name": "X-API-Key",
            },
            "prefixed": {
                "url": upstream,
                "onwards_key": "t3",
                "upstream_auth_header_prefix": "ApiKey ",
            },
            "bare": {"url": upstream, "onwards_key": "p4", "upstream_auth_header_prefix": ""},
            "nokey": {"url": upstream},
        },
    )
    async with client:
        for alias in ("default", "named", "prefixed", "bare", "nokey"):
            await client.post(CHAT, json=body(alias), headers={"authorization": "Bearer client"})
    h = [r.headers for r in up.requests]
    assert h[0]["authorization"] == "Bearer sk-1"
    assert h[1]["x-api-key"] == "Bearer k2" and "authorization" not in h[1]
    assert h[2]["authorization"] == "ApiKey t3"
    assert h[3]["authorization"] == "p4"
    assert "authorization" not in h[4]


async def test_hop_by_hop_browser_and_credential_headers_are_stripped(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    dropped = {
        "x-api-key": "k",
        "api-key": "k",
        "proxy-authorization": "p",
        "te": "trailers",
        "sec-fetch-site": "cross-site",
        "sec-ch-ua-platform": "Linux",
        "origin": "https://x",
        "referer": "https://x/",
        "cookie": "a=b",
        "if-none-match": "x",
        # what the client claims about its route: only a trusted front proxy may say that
        "forwarded": "for=1.2.3.4",
        "x-forwarded-for": "1.2.3.4",
        "x-forwarded-host": "evil.example",
        "x-real-ip": "1.2.3.4",
        # some servers read underscores as dashes
        "transfer_encoding": "chunked",
        "content_length": "5",
    }
    kept = {
        "accept": "application/json",
        "user-agent": "ua/1",
        "x-stainless-lang": "python",
        "anthropic-version": "2023-06-01",
        "openai-organization": "org",
    }
    async with client:
        await client.post(CHAT, json=body("m"), headers={**dropped, **kept})
    got = up.requests[0].headers
    assert not set(dropped) & set(got)
    assert all(got[k] == v for k, v in kept.items())
    assert got["x-forwarded-proto"] == "https"


async def test_forwarding_headers_pass_only_behind_a_trusted_proxy(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up)}}, trust_forwarded_headers=True
    )
    sent = {"x-forwarded-for": "1.2.3.4", "forwarded": "for=1.2.3.4", "x-forwarded-proto": "http"}
    async with client:
        await client.post(CHAT, json=body("m"), headers=sent)
    got = up.requests[0].header_list
    assert ("x-forwarded-for", "1.2.3.4") in got and ("forwarded", "for=1.2.3.4") in got
    assert [v for k, v in got if k == "x-forwarded-proto"] == ["https"]  # ours, once


async def test_headers_the_client_names_in_connection_are_not_forwarded(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    headers = {"connection": "keep-alive, X-Hop", "x-hop": "1", "x-end": "2"}
    async with client:
        await client.post(CHAT, json=body("m"), headers=headers)
    got = up.requests[0].headers
    assert "x-hop" not in got and got["x-end"] == "2"


async def test_models_lists_aliases_without_calling_upstreams(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    upstream = await serve_app(nursery, up)
    _, client = await gateway_with(nursery, {"a": {"url": upstream}, "b": {"url": upstream}})
    async with client:
        r1 = await client.get("/v1/models")
        r2 = await client.get("/models")
    assert r1.status_code == 200
    data = r1.json()
    assert data["object"] == "list"
    assert sorted(m["id"] for m in data["data"]) == ["a", "b"]
    assert all(m["object"] == "model" and m["owned_by"] == "None" for m in data["data"])
    assert r2.json()["data"] == data["data"] or len(r2.json()["data"]) == 2
    assert up.requests == []


async def test_streaming_first_chunk_arrives_before_upstream_finishes(
    nursery: trio.Nursery,
) -> None:
    chunks = sse(
        {"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]}
    )
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.5)
    )
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    received: list[bytes] = []
    async with client, client.stream("POST", CHAT, json=body("m", stream=True)) as r:
        assert r.headers["content-type"] == "text/event-stream"
        async for chunk in r.aiter_raw():
            received.append(chunk)
            if len(received) == 1:
                # the upstream is still sleeping before its second chunk
                assert up.active == 1 and up.finished == 0
    assert b"".join(received) == b"".join(chunks)
    with trio.fail_after(5):
        while up.active:
            await trio.sleep(0.01)
    assert up.finished == 1


# The built-in server cancels the relay from its connection's reader; under hypercorn a
# watcher task does (asgi.CancelOnDisconnect): both must close the upstream at once.
@pytest.mark.parametrize("server", ["onwards", "hypercorn"])
async def test_client_disconnect_mid_stream_closes_the_upstream_stream(
    nursery: trio.Nursery, server: Literal["onwards", "hypercorn"]
) -> None:
    chunks = [b"data: {}\n\n"] * 50
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.05)
    )
    gateway = Gateway(parse_config({"targets": {"m": {"url": await serve_app(nursery, up)}}}))
    info = await nursery.start(partial(gateway.serve, "127.0.0.1", 0, server=server))
    client = httpx.AsyncClient(base_url=info.url, timeout=10)
    async with (
        client,
        client.stream("POST", CHAT, json=body("m", stream=True)) as r,
        aclosing(r.aiter_raw()) as chunks_in,  # type: ignore[type-var]
    ):
        async for _ in chunks_in:
            break  # leave after the first chunk
    with trio.fail_after(5):
        while up.active:
            await trio.sleep(0.01)
    assert up.finished == 0
    assert up.disconnected == 1


async def test_upstream_breaking_a_stream_ends_it_with_an_error_event(
    nursery: trio.Nursery,
) -> None:
    chunks = [b"data: {}\n\n"] * 5
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, fail_after=2)
    )
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.post(CHAT, json=body("m", stream=True))
    assert r.status_code == 200
    assert r.text.startswith("data: {}\n\ndata: {}\n\n")
    last = r.text.strip().split("\n\n")[-1]
    assert orjson.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_stream_error"


async def test_body_over_the_limit_is_413(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up)}}, body_limit_bytes=1000
    )
    async with client:
        r = await client.post(CHAT, json=body("m", pad="x" * 2000))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert up.requests == []


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_over_the_limit_that_arrives_in_pieces_is_413(
    nursery: trio.Nursery, framing: str
) -> None:
    """Each piece is under the limit; only their sum is over it (the size check must hold for
    every body message, not only the first)."""
    up = FakeUpstream()
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up)}}, body_limit_bytes=1000
    )
    payload = orjson.dumps(body("m", pad="x" * 3000))

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 300):
            yield payload[i : i + 300]
            await trio.sleep(0.02)  # separate writes: separate body messages at the gateway

    headers = {"content-type": "application/json"}
    if framing == "content-length":
        headers["content-length"] = str(len(payload))
    async with client:
        r = await client.post(CHAT, content=pieces(), headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert up.requests == []


async def test_unreachable_upstream_is_502(nursery: trio.Nursery) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    _, client = await gateway_with(nursery, {"m": {"url": f"http://127.0.0.1:{port}"}})
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "internal_error"


async def test_upstream_header_timeout_is_504(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(body=chat_completion(), delay=3))
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up), "request_timeout_secs": 0.2}}
    )
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "gateway_timeout"


async def test_a_header_timeout_on_a_reused_connection_is_504_once_then_a_fresh_one_serves(
    nursery: trio.Nursery,
) -> None:
    # The timeout aborts the pooled connection (the gateway's watchdog task); the request
    # must not be retried on a fresh one as if the server had closed an idle connection.
    slow = Reply(body=chat_completion(), delay=3)
    up = FakeUpstream([Reply(body=chat_completion()), slow, Reply(body=chat_completion())])
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up), "request_timeout_secs": 0.3}}
    )
    async with client:
        first = await client.post(CHAT, json=body("m"))
        started = trio.current_time()
        timed_out = await client.post(CHAT, json=body("m"))
        elapsed = trio.current_time() - started
        last = await client.post(CHAT, json=body("m"))
    assert [first.status_code, timed_out.status_code, last.status_code] == [200, 504, 200]
    assert 0.3 <= elapsed < 2.5
    assert len(up.requests) == 3


async def test_upstream_errors_pass_through_with_status(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(status=422, body=b'{"error":{"message":"bad temperature"}}'))
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 422
    assert r.json() == {"error": {"message": "bad temperature"}}


async def test_compressed_upstream_bodies_pass_through_untouched(nursery: trio.Nursery) -> None:
    packed = gzip.compress(chat_completion("zipped"))
    up = FakeUpstream(
        Reply(
            body=packed,
            headers=[(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
        )
    )
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.post(CHAT, json=body("m"), headers={"accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert r.json()["choices"][0]["message"]["content"] == "zipped"  # httpx decoded it
    assert up.requests[0].headers["accept-encoding"] == "gzip"


async def test_no_compression_is_requested_when_the_client_did_not_ask(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream()
    _, url = await start_gateway(nursery, {"targets": {"m": {"url": await serve_app(nursery, up)}}})
    async with httpx.AsyncClient(base_url=url, headers={"accept-encoding": "identity"}) as client:
        await client.post(CHAT, json=body("m"))
    assert up.requests[0].headers.get("accept-encoding") == "identity"


async def test_upstream_connections_are_reused(nursery: trio.Nursery) -> None:
    ports: list[int] = []
    up = FakeUpstream()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ports.append(scope["client"][1])
        await up(scope, receive, send)

    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, app)}})
    async with client:
        for _ in range(5):
            assert (await client.post(CHAT, json=body("m"))).status_code == 200
    assert len(ports) == 5 and len(set(ports)) == 1


@pytest.mark.parametrize("server", ["onwards", "hypercorn"])
async def test_upstream_connections_are_reused_after_streams(
    nursery: trio.Nursery, server: Literal["onwards", "hypercorn"]
) -> None:
    """A stream read to its end hands its connection back for the next request (the built-in
    server relays streams in a loop of their own: it must end the body the same way)."""
    ports: list[int] = []
    chunks = sse(*({"choices": [{"delta": {"content": str(i)}}]} for i in range(3)))
    up = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.01)
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ports.append(scope["client"][1])
        await up(scope, receive, send)

    url = await serve_app(nursery, app)
    gateway = Gateway(parse_config({"targets": {"m": {"url": url}}}))
    info = await nursery.start(partial(gateway.serve, "127.0.0.1", 0, server=server))
    async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
        for _ in range(3):
            r = await client.post(CHAT, json=body("m", stream=True))
            assert r.content == b"".join(chunks)
    assert len(ports) == 3 and len(set(ports)) == 1


async def test_gateway_serves_inside_a_callers_nursery_and_stops_with_it() -> None:
    up = FakeUpstream()
    async with trio.open_nursery() as outer:
        upstream = await serve_app(outer, up)
        async with trio.open_nursery() as nursery:
            _, url = await start_gateway(nursery, {"targets": {"m": {"url": upstream}}})
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.post(CHAT, json=body("m"))).status_code == 200
            nursery.cancel_scope.cancel()
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(base_url=url) as client:
                await client.post(CHAT, json=body("m"))
        outer.cancel_scope.cancel()


async def test_a_bug_in_a_handler_answers_json_500_not_a_traceback(nursery: trio.Nursery) -> None:
    gateway, url = await start_gateway(nursery, {"targets": {"m": {"url": "http://127.0.0.1:9"}}})

    async def broken(*args: Any) -> int:
        raise RuntimeError("boom")

    gateway.responses.handle = broken  # type: ignore[method-assign,assignment]
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/v1/responses/resp_x")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "boom" not in r.text


async def test_a_failing_response_filter_answers_json_500(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    gateway, url = await start_gateway(
        nursery, {"targets": {"m": {"url": await serve_app(nursery, up)}}}
    )

    def factory(ctx: Any) -> Any:
        async def explode(reply: Any) -> Any:
            raise ValueError("filter bug")

        return explode

    gateway.proxy.filters.insert(0, factory)
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.post(CHAT, json=body("m"))
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"


async def test_trace_is_refused_so_no_upstream_key_can_be_echoed(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    _, client = await gateway_with(
        nursery, {"m": {"url": await serve_app(nursery, up), "onwards_key": "sk-secret"}}
    )
    async with client:
        r = await client.request("TRACE", CHAT, headers={"model-override": "m"})
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert up.requests == []


async def test_hop_by_hop_response_headers_are_not_relayed(nursery: trio.Nursery) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"connection", b"x-hop"),
        (b"x-hop", b"1"),
        (b"trailer", b"x-t"),
        (b"proxy-authenticate", b"Basic realm=upstream"),
        (b"x-kept", b"2"),
    ]
    up = FakeUpstream(Reply(body=chat_completion(), headers=headers))
    _, client = await gateway_with(nursery, {"m": {"url": await serve_app(nursery, up)}})
    async with client:
        r = await client.post(CHAT, json=body("m"))
    assert r.headers["x-kept"] == "2"
    assert "x-hop" not in r.headers and "trailer" not in r.headers
    assert "proxy-authenticate" not in r.headers
