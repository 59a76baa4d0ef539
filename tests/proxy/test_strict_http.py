"""Strict mode over real sockets: typed routes, request validation, response coercion, error
standardisation and trust (reference 3.Q-3.W; SPEC §2.4, §2.8)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from onwards_trio import Gateway, parse_config
from onwards_trio._proxy.pipeline import ProxyRequest
from onwards_trio._proxy.strict import ResponsesHook, handle_strict
from onwards_trio._transport.asgi import Receive, Scope, Send, send_json
from tests.proxy.test_sanitize import chunk
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


def body(model: str = "gpt-4", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


async def gateway_client(
    nursery: trio.Nursery, targets: dict[str, Any], **config: Any
) -> httpx.AsyncClient:
    """A client of a gateway serving ``targets`` (and the other ``config`` keys)."""
    _, url = await start_gateway(nursery, {"targets": targets, **config})
    return httpx.AsyncClient(base_url=url, timeout=10)


async def exchange(
    nursery: trio.Nursery, reply: Reply, target: dict[str, Any], /, **req: Any
) -> tuple[httpx.Response, FakeUpstream]:
    """One request (``CHAT`` with :func:`body` unless ``path`` / ``json`` say otherwise) through
    a gateway whose alias ``gpt-4`` is ``target`` in front of an upstream answering ``reply``.
    A ``config`` keyword holds extra top-level config keys."""
    up = FakeUpstream(reply)
    url = await serve_app(nursery, up)
    config = req.pop("config", {})
    async with await gateway_client(nursery, {"gpt-4": {"url": url, **target}}, **config) as c:
        r = await c.post(req.pop("path", CHAT), json=req.pop("json", body()), **req)
    return r, up


async def client_for(
    nursery: trio.Nursery, targets: dict[str, Any], **config: Any
) -> httpx.AsyncClient:
    return await gateway_client(nursery, targets, strict_mode=True, **config)


async def one(
    nursery: trio.Nursery, reply: Reply, target: dict[str, Any] | None = None, **req: Any
) -> tuple[httpx.Response, FakeUpstream]:
    return await exchange(nursery, reply, target or {}, config={"strict_mode": True}, **req)


async def plain(nursery: trio.Nursery) -> tuple[httpx.AsyncClient, FakeUpstream]:
    up = FakeUpstream()
    client = await client_for(nursery, {"gpt-4": {"url": await serve_app(nursery, up)}})
    return client, up


def events(content: bytes) -> list[Any]:
    out = []
    for e in content.split(b"\n\n"):
        if e.startswith(b"data: ") and e != b"data: [DONE]":
            out.append(orjson.loads(e[6:]))
    return out


# --- routes -------------------------------------------------------------------------------


async def test_unknown_paths_are_json_404(nursery: trio.Nursery) -> None:
    client, up = await plain(nursery)
    async with client:
        r = await client.get("/unknown/endpoint")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    assert up.requests == []


async def test_models_endpoint_is_served(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.get("/models")
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "gpt-4"


async def test_wrong_method_on_a_typed_route_is_json_405(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.get(CHAT)
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"


# --- request validation ---------------------------------------------------------------------


async def test_wrong_content_type_is_415(nursery: trio.Nursery) -> None:
    client, up = await plain(nursery)
    async with client:
        r = await client.post(
            CHAT, content=orjson.dumps(body()), headers={"content-type": "text/plain"}
        )
    assert r.status_code == 415
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert up.requests == []


async def test_malformed_json_is_400(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post(CHAT, content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "Malformed JSON" in r.json()["error"]["message"]


async def test_schema_error_is_422_naming_the_field(nursery: trio.Nursery) -> None:
    client, up = await plain(nursery)
    async with client:
        r = await client.post(CHAT, json={"model": "gpt-4", "messages": [{"content": "x"}]})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "messages[0].role"
    assert up.requests == []


async def test_body_over_the_limit_is_413(nursery: trio.Nursery) -> None:
    up = FakeUpstream()
    url = await serve_app(nursery, up)
    async with await client_for(nursery, {"gpt-4": {"url": url}}, body_limit_bytes=100) as c:
        r = await c.post(CHAT, json=body(padding="x" * 500))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


async def test_completions_reject_missing_model(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post("/v1/completions", json={"prompt": "Say hello"})
    assert r.status_code == 422


async def test_forwarded_request_is_reserialised_and_scrubbed(nursery: trio.Nursery) -> None:
    r, up = await one(
        nursery,
        Reply(body=chat_completion()),
        json=body(id="chatcmpl-forged", temperature=None, custom_param=1),
        headers={"accept-encoding": "gzip, br"},
    )
    assert r.status_code == 200
    sent = up.requests[0]
    assert "accept-encoding" not in sent.headers
    assert sent.headers["content-type"] == "application/json"
    forwarded = sent.json()
    assert "id" not in forwarded and "temperature" not in forwarded
    assert forwarded["custom_param"] == 1


async def test_gateway_errors_reach_the_client_unchanged(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    async with client:
        r = await client.post(CHAT, json=body("nope"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# --- chat completions -----------------------------------------------------------------------


async def test_chat_unknown_fields_removed_model_rewritten(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(model="gpt-4-turbo-2024-04-09", provider="p", cost=1))
    r, _ = await one(nursery, reply, {"onwards_model": "gpt-4-turbo-2024-04-09"})
    data = r.json()
    assert data["model"] == "gpt-4" and data["id"] == "chatcmpl-test"
    assert "provider" not in data and "cost" not in data
    assert b"2024-04-09" not in r.content
    assert int(r.headers["content-length"]) == len(r.content)


async def test_chat_backfills_sparse_answers(nursery: trio.Nursery) -> None:
    reply = Reply(body=b'{"choices":[{"message":{"content":"Hello from downstream"}}]}')
    r, _ = await one(nursery, reply)
    data = r.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from downstream",
    }


async def test_sanitize_flag_does_not_double_sanitise(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion("Hello!", provider_metadata={"x": 1}))
    r, _ = await one(nursery, reply, {"sanitize_response": True})
    data = r.json()
    assert data["choices"][0]["message"]["content"] == "Hello!"
    assert "provider_metadata" not in data and "usage" in data
    assert "system_fingerprint" not in data  # strict omits nulls; non-strict would emit them


async def test_streaming_chat_is_sanitised_per_event(nursery: trio.Nursery) -> None:
    chunks = [
        b": provider=custom-llm cost=0.001 trace_id=xyz-123\n\n",
        *sse(chunk("Hel", provider="p"), {"choices": [{"delta": {"content": "lo"}}]}),
    ]
    reply = Reply(headers=SSE_HEADERS, chunks=chunks)
    r, _ = await one(nursery, reply, json=body(stream=True))
    assert r.headers["content-type"] == "text/event-stream"
    assert b"provider" not in r.content and b"trace_id" not in r.content
    assert r.content.endswith(b"data: [DONE]\n\n")
    first, second = events(r.content)
    assert first["model"] == second["model"] == "gpt-4"
    assert second["id"].startswith("chatcmpl-") and second["object"] == "chat.completion.chunk"


async def test_stream_request_answered_with_json_is_not_swallowed(nursery: trio.Nursery) -> None:
    r, _ = await one(nursery, Reply(body=chat_completion("plain")), json=body(stream=True))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "plain"


async def test_malformed_stream_chunk_ends_with_an_error_event(nursery: trio.Nursery) -> None:
    chunks = [*sse(chunk("a"), done=False), b'data: {"choices": 7}\n\n', *sse(chunk("b"))]
    r, _ = await one(nursery, Reply(headers=SSE_HEADERS, chunks=chunks), json=body(stream=True))
    parsed = events(r.content)
    assert len(parsed) == 2 and parsed[1]["error"]["code"] == "upstream_stream_error"
    assert b"[DONE]" not in r.content


async def test_untrusted_error_in_a_stream_is_standardised(nursery: trio.Nursery) -> None:
    chunks = sse(chunk("a"), {"error": {"message": "OOM on GPU 3", "code": 503}})
    r, _ = await one(nursery, Reply(headers=SSE_HEADERS, chunks=chunks), json=body(stream=True))
    assert r.status_code == 200
    assert b"OOM" not in r.content
    assert events(r.content)[1]["error"]["message"] == "Service unavailable"


async def test_trusted_error_in_a_stream_is_forwarded(nursery: trio.Nursery) -> None:
    chunks = sse(chunk("a"), {"error": {"message": "Input too long", "code": 400}})
    reply = Reply(headers=SSE_HEADERS, chunks=chunks)
    r, _ = await one(nursery, reply, {"trusted": True}, json=body(stream=True))
    assert events(r.content)[1]["error"]["message"] == "Input too long"


# --- upstream errors and trust --------------------------------------------------------------


async def test_untrusted_400_is_standardised(nursery: trio.Nursery) -> None:
    leak = b'{"error":{"message":"Database postgresql failed","internal_trace_id":"t"}}'
    r, _ = await one(nursery, Reply(status=400, body=leak))
    assert r.status_code == 400
    assert r.json() == {
        "error": {
            "message": "Invalid request",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


async def test_coerced_json_body_is_labelled_json(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(), headers=[(b"content-type", b"text/plain")])
    r, _ = await one(nursery, reply)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)


async def test_untrusted_html_500_becomes_json(nursery: trio.Nursery) -> None:
    reply = Reply(
        status=500,
        body=b"<html><body>trace</body></html>",
        headers=[(b"content-type", b"text/html")],
    )
    r, _ = await one(nursery, reply)
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "Internal server error",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("upstream", "client"), [(401, 502), (402, 502), (403, 502), (451, 502), (408, 504)]
)
async def test_untrusted_account_class_errors_are_masked(
    nursery: trio.Nursery, upstream: int, client: int
) -> None:
    r, _ = await one(nursery, Reply(status=upstream, body=b'{"error":"invalid api key sk-..."}'))
    assert r.status_code == client
    assert b"sk-" not in r.content


async def test_trusted_error_is_returned_verbatim(nursery: trio.Nursery) -> None:
    original = b'{"error":{"code":"internal_error","metadata":{"region":"eu-west-3"}}}'
    r, _ = await one(nursery, Reply(status=500, body=original), {"trusted": True})
    assert r.status_code == 500 and r.content == original


async def test_trusted_streaming_request_error_is_verbatim(nursery: trio.Nursery) -> None:
    original = b'{"error":{"message":"too many streams","type":"provider_error"}}'
    r, _ = await one(
        nursery, Reply(status=429, body=original), {"trusted": True}, json=body(stream=True)
    )
    assert r.status_code == 429 and r.content == original


async def test_provider_trust_overrides_the_pool(nursery: trio.Nursery) -> None:
    original = b'{"error":{"message":"provider specific error","provider_trace":"x"}}'
    up_t, up_u = (
        FakeUpstream(Reply(status=429, body=original)),
        FakeUpstream(Reply(status=429, body=original)),
    )
    targets = {
        "t": {"providers": [{"url": await serve_app(nursery, up_t), "trusted": True}]},
        "u": {
            "providers": [{"url": await serve_app(nursery, up_u), "trusted": False}],
            "trusted": True,
        },
    }
    async with await client_for(nursery, targets) as client:
        rt = await client.post(CHAT, json=body("t"))
        ru = await client.post(CHAT, json=body("u"))
    assert rt.content == original
    assert ru.json()["error"]["message"] == "Rate limit exceeded"


async def test_model_override_cannot_borrow_trust(nursery: trio.Nursery) -> None:
    trusted = FakeUpstream(Reply(status=500, body=b'{"trusted_detail":1}'))
    untrusted = FakeUpstream(Reply(status=500, body=b'{"untrusted_metadata":1}'))
    targets = {
        "trusted-pool": {"url": await serve_app(nursery, trusted), "trusted": True},
        "untrusted-pool": {"url": await serve_app(nursery, untrusted)},
    }
    async with await client_for(nursery, targets) as client:
        r = await client.post(
            CHAT, json=body("trusted-pool"), headers={"model-override": "untrusted-pool"}
        )
    assert len(untrusted.requests) == 1
    assert b"untrusted_metadata" not in r.content


async def test_trusted_success_is_still_sanitised(nursery: trio.Nursery) -> None:
    reply = Reply(body=chat_completion(provider_metadata={"x": 1}))
    r, _ = await one(nursery, reply, {"trusted": True})
    assert "provider_metadata" not in r.json() and r.json()["model"] == "gpt-4"


# --- completions, embeddings, responses -----------------------------------------------------


async def test_completions_go_to_the_completions_endpoint(nursery: trio.Nursery) -> None:
    reply = Reply(
        body=b'{"id":"cmpl-abc123","object":"text_completion","created":1,'
        b'"model":"m-internal","choices":[{"text":"Hello!","index":0}],'
        b'"provider":"x"}'
    )
    r, up = await one(
        nursery,
        reply,
        path="/v1/completions",
        json={"model": "gpt-4", "prompt": ["Hello", "World"]},
    )
    assert up.requests[0].path == "/v1/completions"
    assert up.requests[0].json()["prompt"] == ["Hello", "World"]
    assert r.json() == {
        "id": "cmpl-abc123",
        "object": "text_completion",
        "created": 1,
        "model": "gpt-4",
        "choices": [{"text": "Hello!", "index": 0}],
    }


async def test_completions_without_text_are_502(nursery: trio.Nursery) -> None:
    r, _ = await one(
        nursery,
        Reply(body=b'{"choices":[{"index":0}]}'),
        path="/v1/completions",
        json={"model": "gpt-4"},
    )
    assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"


async def test_completions_streaming_format(nursery: trio.Nursery) -> None:
    chunks = sse({"choices": [{"text": "Hello"}], "model": "x"}, {"choices": [{"text": " world"}]})
    r, _ = await one(
        nursery,
        Reply(headers=SSE_HEADERS, chunks=chunks),
        path="/v1/completions",
        json={"model": "gpt-4", "prompt": "p", "stream": True},
    )
    a, b = events(r.content)
    assert (a["object"], a["choices"][0]["text"], b["choices"][0]["text"]) == (
        "text_completion",
        "Hello",
        " world",
    )
    assert a["id"] == b["id"] and a["id"].startswith("cmpl-")


async def test_embeddings_are_coerced(nursery: trio.Nursery) -> None:
    reply = Reply(
        body=orjson.dumps(
            {
                "object": "list",
                "model": "text-embedding-3-small-internal",
                "provider": "p",
                "data": [{"object": "embedding", "embedding": [0.1, 0.2], "index": 0}],
                "usage": {"prompt_tokens": 8, "total_tokens": 8, "cost": 1},
            }
        )
    )
    r, _ = await one(nursery, reply, path="/v1/embeddings", json={"model": "gpt-4", "input": "x"})
    data = r.json()
    assert data["model"] == "gpt-4" and "provider" not in data
    assert data["data"][0]["embedding"] == [0.1, 0.2]
    assert data["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert int(r.headers["content-length"]) == len(r.content)


RESP_REQ = {
    "model": "gpt-4",
    "input": [
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "web_search", "query": "latest news", "max_results": 10},
    ],
    "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {}}],
}


async def test_responses_passthrough_is_forwarded_and_coerced(nursery: trio.Nursery) -> None:
    reply = Reply(
        body=b'{"id":"resp_abc123","output":[],"model":"gpt-4o-2024-05-13",'
        b'"status":"completed","provider":"x","internal_trace_id":"t"}'
    )
    r, up = await one(nursery, reply, path="/v1/responses", json=RESP_REQ)
    sent = up.requests[0]
    assert sent.path == "/v1/responses"
    forwarded = sent.json()
    assert forwarded["input"][1] == RESP_REQ["input"][1]
    assert "id" not in forwarded["input"][0] and "status" not in forwarded["input"][0]
    assert forwarded["tools"][0]["parameters"] == {"additionalProperties": False}
    data = r.json()
    assert (data["id"], data["model"], data["object"]) == ("resp_abc123", "gpt-4", "response")
    assert "provider" not in data and "internal_trace_id" not in data
    assert data["tool_choice"] == "auto" and data["parallel_tool_calls"] is True


async def test_responses_streaming_is_sanitised(nursery: trio.Nursery) -> None:
    chunks = [
        b"event: response.created\n",
        b"data: "
        + orjson.dumps(
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {
                    "id": "resp-123",
                    "model": "gpt-4o-2024-08-06",
                    "output": [],
                    "custom_field": 1,
                },
            }
        )
        + b"\n\n",
        b"event: response.output_text.delta\ndata: "
        + orjson.dumps(
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "delta": "Hello",
                "item_id": "msg_1",
            }
        )
        + b"\n\n",
        b"data: "
        + orjson.dumps(
            {"type": "response.completed", "sequence_number": 2, "response": {"output": []}}
        )
        + b"\n\n",
    ]
    r, _ = await one(
        nursery,
        Reply(headers=SSE_HEADERS, chunks=chunks),
        path="/v1/responses",
        json={**RESP_REQ, "stream": True},
    )
    created, delta, completed = events(r.content)
    assert created["response"]["model"] == "gpt-4" and created["response"]["id"] == "resp-123"
    assert created["response"]["status"] == "in_progress"
    assert "custom_field" not in created["response"]
    assert delta == {
        "type": "response.output_text.delta",
        "sequence_number": 1,
        "delta": "Hello",
        "item_id": "msg_1",
    }
    assert completed["response"]["status"] == "completed"
    assert b"event:" not in r.content


async def test_responses_untrusted_error_is_standardised(nursery: trio.Nursery) -> None:
    r, _ = await one(
        nursery,
        Reply(status=500, body=b'{"error":{"code":"oom_error"}}'),
        path="/v1/responses",
        json=RESP_REQ,
    )
    assert r.json()["error"]["message"] == "Internal server error"
    assert b"oom" not in r.content


async def test_responses_request_with_nested_tool_is_422(nursery: trio.Nursery) -> None:
    client, _ = await plain(nursery)
    tool = {"type": "function", "function": {"name": "f"}}
    async with client:
        r = await client.post("/v1/responses", json={**RESP_REQ, "tools": [tool]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "tools[0].name"


async def test_sse_answer_to_a_plain_request_is_sanitised_as_a_stream(
    nursery: trio.Nursery,
) -> None:
    reply = Reply(headers=SSE_HEADERS, chunks=sse(chunk("Hello", provider="custom-provider")))
    r, _ = await one(nursery, reply)
    assert r.headers["content-type"] == "text/event-stream"
    assert b"custom-provider" not in r.content and r.content.endswith(b"data: [DONE]\n\n")
    assert events(r.content)[0]["model"] == "gpt-4"


async def test_forwarded_to_the_fixed_path_without_query(nursery: trio.Nursery) -> None:
    r, up = await one(nursery, Reply(body=chat_completion()), path=CHAT + "?debug=1&x=2")
    assert r.status_code == 200
    assert (up.requests[0].path, up.requests[0].query) == (CHAT, "")


async def test_sanitize_flag_wins_over_trust_for_errors(nursery: trio.Nursery) -> None:
    reply = Reply(status=400, body=b'{"error":{"message":"provider detail"}}')
    r, _ = await one(nursery, reply, {"trusted": True, "sanitize_response": True})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "upstream_error"


async def hooked(
    nursery: trio.Nursery, hook: ResponsesHook
) -> tuple[httpx.AsyncClient, FakeUpstream]:
    up = FakeUpstream(Reply(body=b'{"id":"resp_up","output":[]}'))
    config = {"targets": {"gpt-4": {"url": await serve_app(nursery, up)}}, "strict_mode": True}
    gateway = Gateway(parse_config(config))

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with gateway.running():  # owns (and finally closes) the upstream connections
            task_status.started()
            await trio.sleep_forever()

    await nursery.start(run)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await handle_strict(gateway, scope, receive, send, responses=hook)
        else:
            await gateway(scope, receive, send)

    return httpx.AsyncClient(base_url=await serve_app(nursery, app), timeout=10), up


async def test_responses_hook_gets_the_validated_request(nursery: trio.Nursery) -> None:
    seen: list[ProxyRequest] = []

    async def hook(request: ProxyRequest, receive: Receive, send: Send) -> int | None:
        seen.append(request)
        await send_json(send, 200, {"id": "resp_adapter"})
        return 200

    client, up = await hooked(nursery, hook)
    async with client:
        r = await client.post("/v1/responses", json={**RESP_REQ, "id": "forged"})
    assert r.json() == {"id": "resp_adapter"}
    assert up.requests == []
    assert "id" not in seen[0].json and seen[0].json["input"][0]["type"] == "message"


async def test_responses_hook_can_decline_to_passthrough(nursery: trio.Nursery) -> None:
    async def hook(request: ProxyRequest, receive: Receive, send: Send) -> int | None:
        return None

    client, up = await hooked(nursery, hook)
    async with client:
        r = await client.post("/v1/responses", json=RESP_REQ)
        await trio.testing.wait_all_tasks_blocked()  # let the handler finish its clean-up
    assert r.json()["id"] == "resp_up" and r.json()["model"] == "gpt-4"
    assert len(up.requests) == 1


async def test_completions_accept_a_missing_prompt(nursery: trio.Nursery) -> None:
    reply = Reply(body=b'{"choices":[{"text":"ok"}]}')
    r, up = await one(nursery, reply, path="/v1/completions", json={"model": "gpt-4"})
    assert r.status_code == 200 and up.requests[0].json() == {"model": "gpt-4"}


async def test_completions_untrusted_error_is_generic(nursery: trio.Nursery) -> None:
    reply = Reply(status=500, body=b'{"error":"OOM on GPU 3","provider":"custom-llm"}')
    r, _ = await one(nursery, reply, path="/v1/completions", json={"model": "gpt-4"})
    assert r.status_code == 500
    assert b"OOM" not in r.content and b"custom-llm" not in r.content


async def test_trusted_responses_success_is_still_sanitised(nursery: trio.Nursery) -> None:
    reply = Reply(body=b'{"id":"resp_1","output":[],"provider_metadata":{"a":1}}')
    r, _ = await one(nursery, reply, {"trusted": True}, path="/v1/responses", json=RESP_REQ)
    data = r.json()
    assert "provider_metadata" not in data and data["object"] == "response"
    assert int(r.headers["content-length"]) == len(r.content)


@pytest.mark.parametrize(
    ("path", "request_body", "status", "original"),
    [
        (
            "/v1/embeddings",
            {"model": "gpt-4", "input": "x"},
            400,
            b'{"error":{"code":"context_length_exceeded","metadata":{"max_tokens":8192}}}',
        ),
        (
            "/v1/completions",
            {"model": "gpt-4"},
            400,
            b'{"error":{"message":"Context length exceeded","code":"context_length_exceeded"}}',
        ),
        (
            "/v1/responses",
            RESP_REQ,
            500,
            b'{"error":{"code":"oom_error","metadata":{"provider":"vllm"}}}',
        ),
    ],
)
async def test_trusted_error_on_every_route_is_verbatim(
    nursery: trio.Nursery, path: str, request_body: dict[str, Any], status: int, original: bytes
) -> None:
    reply = Reply(status=status, body=original)
    r, _ = await one(nursery, reply, {"trusted": True}, path=path, json=request_body)
    assert r.status_code == status and r.content == original


async def test_trusted_streaming_success_is_still_sanitised(nursery: trio.Nursery) -> None:
    reply = Reply(headers=SSE_HEADERS, chunks=sse(chunk("a", provider_metadata={"x": 1})))
    r, _ = await one(nursery, reply, {"trusted": True}, json=body(stream=True))
    assert b"provider_metadata" not in r.content and events(r.content)[0]["model"] == "gpt-4"


async def test_adapter_alias_is_served_by_the_responses_adapter(nursery: trio.Nursery) -> None:
    up = FakeUpstream(Reply(body=chat_completion("from the adapter", provider="leak")))
    target = {"url": await serve_app(nursery, up), "open_responses": {"adapter": True}}
    async with await client_for(nursery, {"gpt-4": target}, store={"kind": "memory"}) as client:
        r = await client.post("/v1/responses", json={"model": "gpt-4", "input": "hi"})
    assert r.status_code == 200
    assert r.json()["object"] == "response"
    assert b"from the adapter" in r.content and b"leak" not in r.content
    assert up.requests[0].path == "/v1/chat/completions"
