"""``/v1/messages`` end to end: the official ``anthropic`` SDK against the gateway on
loopback, over fake Chat Completions upstreams; each test asserts what the upstream received
and what the SDK parsed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import trio

from onwards_trio import Gateway
from onwards_trio._ops.metrics import Metrics, install_metrics

from ..support import FakeUpstream, Reply, serve_app, sse, start_gateway

SDK_TIMEOUT = 20.0
SSE_HEADERS = [(b"content-type", b"text/event-stream")]


# -- fake upstream answers ------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **choice: Any) -> Reply:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "upstream-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    return Reply(body=orjson.dumps(body))


def text_reply(text: str = "Hello there") -> Reply:
    return completion({"role": "assistant", "content": text})


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}],
    }


USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


def streamed(*chunks: dict[str, Any], **reply: Any) -> Reply:
    return Reply(headers=SSE_HEADERS, chunks=sse(*chunks, USAGE_CHUNK), **reply)


def text_stream(first: str, *rest: str, finish: str = "stop") -> Reply:
    deltas = [chunk({"role": "assistant", "content": first})]
    deltas += [chunk({"content": piece}) for piece in rest]
    return streamed(*deltas, chunk({}, finish))


RAW_STREAM = {
    "model": "claude",
    "max_tokens": 10,
    "stream": True,
    "messages": [{"role": "user", "content": "Hi"}],
}


def body_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    """The error body the SDK parsed."""
    assert isinstance(exc.body, dict)
    return exc.body


# -- harness --------------------------------------------------------------------------------------

_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while _clients:
        _clients.pop().close()


def make_client(url: str, api_key: str = "sk-test") -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=url, api_key=api_key, timeout=SDK_TIMEOUT, max_retries=0)
    _clients.append(client)
    return client


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "targets": {
            "claude": {"url": upstream_url + "/v1", "anthropic": {"adapter": True}},
            "native": {"url": upstream_url + "/v1"},
        },
        **extra,
    }


async def start(
    nursery: trio.Nursery, upstream: FakeUpstream, **extra: Any
) -> tuple[Gateway, anthropic.Anthropic, str]:
    url = await serve_app(nursery, upstream)
    gateway, gw_url = await start_gateway(nursery, config(url, **extra))
    return gateway, make_client(gw_url), gw_url


async def sdk(fn: Callable[[], Any]) -> Any:
    """Run a (blocking) SDK call in a worker thread, bounded."""
    with trio.fail_after(SDK_TIMEOUT + 5):
        return await trio.to_thread.run_sync(fn)


def _params(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "claude",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}],
        **kwargs,
    }


def create(client: anthropic.Anthropic, **kwargs: Any) -> Callable[[], Any]:
    params = _params(kwargs)
    return lambda: client.messages.create(**params)


def final_message(client: anthropic.Anthropic, **kwargs: Any) -> Callable[[], Any]:
    params = _params(kwargs)

    def run() -> Any:
        with client.messages.stream(**params) as stream:
            return stream.get_final_message()

    return run


async def raw_events(gw_url: str, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """POST a streamed request without the SDK; return (event, data) pairs as sent."""
    events = []
    async with httpx.AsyncClient(timeout=SDK_TIMEOUT) as http:
        r = await http.post(
            gw_url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    for block in r.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], orjson.loads(lines["data"])))
    return events


# -- create ---------------------------------------------------------------------------------------


async def test_create_sends_a_chat_request_and_returns_a_message(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply("Hello there"))
    _, client, _ = await start(nursery, upstream)
    msg = await sdk(
        create(
            client,
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
            ],
            metadata={"user_id": "u-1"},
            extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
        )
    )
    (req,) = upstream.requests
    assert req.path == "/v1/chat/completions"
    sent = req.json()
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How are you?"},
    ]
    assert (sent["model"], sent["max_tokens"], sent["user"]) == ("claude", 100, "u-1")
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.5, 0.9, 40)
    assert "stream" not in sent
    assert msg.id.startswith("msg_")
    assert msg.model == "claude"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello there"
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)


async def test_usage_splits_cached_input_tokens(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_reply()))
    msg = await sdk(create(client))
    assert msg.usage.input_tokens == 8  # 12 prompt tokens, 4 of them read from the cache
    assert msg.usage.cache_read_input_tokens == 4
    assert msg.usage.cache_creation_input_tokens == 0
    assert msg.usage.output_tokens == 5


async def test_client_keys_and_versions_are_not_forwarded(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    await sdk(create(client, extra_headers={"anthropic-beta": "some-future-beta-2099"}))
    headers = upstream.requests[0].headers
    assert not {"x-api-key", "authorization", "anthropic-version", "anthropic-beta"} & set(headers)


async def test_images_become_image_url_parts(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"},
    ]
    await sdk(create(client, messages=[{"role": "user", "content": content}]))
    assert upstream.requests[0].json()["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What are these?"},
    ]


async def test_documents_become_file_and_text_parts(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}
    text = {"type": "text", "media_type": "text/plain", "data": "plain words"}
    content = [
        {"type": "document", "source": pdf, "title": "report.pdf"},
        {"type": "document", "source": text, "title": "Notes"},
    ]
    await sdk(create(client, messages=[{"role": "user", "content": content}]))
    assert upstream.requests[0].json()["messages"][0]["content"] == [
        {
            "type": "file",
            "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"},
        },
        {"type": "text", "text": "Notes\n\nplain words"},
    ]


# -- tools ----------------------------------------------------------------------------------------

WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def tool_call_reply() -> Reply:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    return completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls")


async def test_tool_use_round_trip_with_tool_result(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream([tool_call_reply(), text_reply("It is sunny.")])
    _, client, _ = await start(nursery, upstream)
    first = await sdk(
        create(
            client,
            tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        )
    )
    sent = upstream.requests[0].json()
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "Weather for a city",
            },
        }
    ]
    assert (sent["tool_choice"], sent["parallel_tool_calls"]) == ("required", False)
    assert first.stop_reason == "tool_use"
    (use,) = first.content
    assert (use.type, use.id, use.name, use.input) == (
        "tool_use",
        "call_1",
        "get_weather",
        {"city": "Paris"},
    )
    result = {
        "type": "tool_result",
        "tool_use_id": use.id,
        "is_error": True,
        "content": [{"type": "text", "text": "service down"}],
    }
    second = await sdk(
        create(
            client,
            tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": first.content},
                {"role": "user", "content": [result, {"type": "text", "text": "Try again"}]},
            ],
        )
    )
    assert upstream.requests[1].json()["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Error: service down"},
        {"role": "user", "content": "Try again"},
    ]
    assert second.content[0].text == "It is sunny."


async def test_tool_results_come_first_with_their_images_in_a_user_message(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    png = {"type": "base64", "media_type": "image/png", "data": "iVBO"}
    calls = [
        {"type": "tool_use", "id": "a", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "b", "name": "get_weather", "input": {}},
    ]
    results = [
        {"type": "text", "text": "Both done"},
        {"type": "tool_result", "tool_use_id": "a", "content": "plain"},
        {
            "type": "tool_result",
            "tool_use_id": "b",
            "content": [{"type": "text", "text": "chart:"}, {"type": "image", "source": png}],
        },
    ]
    await sdk(
        create(
            client,
            tools=[WEATHER],
            messages=[
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": calls},
                {"role": "user", "content": results},
            ],
        )
    )
    assert upstream.requests[0].json()["messages"][2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "plain"},
        {"role": "tool", "tool_call_id": "b", "content": "chart:"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "text", "text": "Both done"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
async def test_tool_choice_maps_to_chat(
    nursery: trio.Nursery, choice: dict[str, Any], expected: Any
) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    await sdk(create(client, tools=[WEATHER], tool_choice=choice))
    assert upstream.requests[0].json()["tool_choice"] == expected


async def test_streamed_tool_call_arrives_as_input_json(nursery: trio.Nursery) -> None:
    head = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "get_weather"}}
    upstream = FakeUpstream(
        streamed(
            chunk({"role": "assistant", "content": "Let me check."}),
            chunk({"tool_calls": [head]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
            chunk({}, "tool_calls"),
        )
    )
    _, client, _ = await start(nursery, upstream)
    msg = await sdk(final_message(client, tools=[WEATHER]))
    assert [b.type for b in msg.content] == ["text", "tool_use"]
    assert msg.content[1].input == {"city": "Oslo"}
    assert msg.content[1].id == "call_9"
    assert msg.stop_reason == "tool_use"


# -- streaming ------------------------------------------------------------------------------------


async def test_stream_sends_the_anthropic_event_sequence(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_stream("Hel", "lo"))
    _, _, gw_url = await start(nursery, upstream)
    events = await raw_events(gw_url, RAW_STREAM)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas == [{"type": "text_delta", "text": "Hel"}, {"type": "text_delta", "text": "lo"}]
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert (end["usage"]["input_tokens"], end["usage"]["output_tokens"]) == (9, 3)
    sent = upstream.requests[0].json()
    assert (sent["stream"], sent["stream_options"]) == (True, {"include_usage": True})


async def test_sdk_stream_accumulates_text_and_usage(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_stream("Hi ", "you", finish="length")))
    msg = await sdk(final_message(client))
    assert msg.content[0].text == "Hi you"
    assert msg.stop_reason == "max_tokens"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (9, 3)


async def test_stream_request_answered_in_one_body_still_streams(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_reply("whole")))
    msg = await sdk(final_message(client))
    assert msg.content[0].text == "whole"
    assert msg.stop_reason == "end_turn"


async def test_unasked_stream_is_assembled_into_one_message(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_stream("as ", "one")))
    msg = await sdk(create(client))
    assert msg.content[0].text == "as one"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (9, 3)


async def test_cut_stream_raises_in_the_sdk(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(
        Reply(
            headers=SSE_HEADERS,
            chunks=sse(
                chunk({"role": "assistant", "content": "partial"}), chunk({"content": "more"})
            ),
            fail_after=1,
        )
    )
    _, client, _ = await start(nursery, upstream)
    with pytest.raises(anthropic.APIStatusError) as info:
        await sdk(final_message(client))
    assert "ended unexpectedly" in str(info.value)


async def test_error_object_inside_a_stream_raises_with_its_message(
    nursery: trio.Nursery,
) -> None:
    error = {"error": {"message": "model overloaded", "type": "server_error"}}
    upstream = FakeUpstream(
        Reply(headers=SSE_HEADERS, chunks=sse(chunk({"content": "par"}), error, done=False))
    )
    _, client, _ = await start(nursery, upstream)
    with pytest.raises(anthropic.APIStatusError) as info:
        await sdk(final_message(client))
    assert "model overloaded" in str(info.value)


async def test_streamed_request_refused_upstream_raises_the_status(nursery: trio.Nursery) -> None:
    body = b'{"error": {"message": "upstream exploded"}}'
    _, client, _ = await start(nursery, FakeUpstream(Reply(status=500, body=body)))
    with pytest.raises(anthropic.InternalServerError) as info:
        await sdk(final_message(client))
    assert body_of(info.value)["error"] == {"type": "api_error", "message": "upstream exploded"}


async def test_client_leaving_mid_stream_closes_the_upstream_stream(
    nursery: trio.Nursery,
) -> None:
    pieces = [chunk({"content": "tok "})] * 50
    upstream = FakeUpstream(Reply(headers=SSE_HEADERS, chunks=sse(*pieces), chunk_delay=0.05))
    _, _, gw_url = await start(nursery, upstream)
    async with (
        httpx.AsyncClient(timeout=SDK_TIMEOUT) as http,
        http.stream("POST", gw_url + "/v1/messages", json=RAW_STREAM) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("event: content_block_delta"):
                break  # leave once text flows
    with trio.fail_after(10):
        while upstream.active:
            await trio.sleep(0.01)
    assert (upstream.finished, upstream.disconnected) == (0, 1)


async def test_stream_without_a_finish_reason_is_reported_cut(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(
        Reply(headers=SSE_HEADERS, chunks=sse(chunk({"content": "partial"}), done=False))
    )
    _, _, gw_url = await start(nursery, upstream)
    name, data = (await raw_events(gw_url, RAW_STREAM))[-1]
    assert name == "error"
    assert data["type"] == "error"
    assert data["error"]["type"] == "api_error"


# -- thinking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "budget", "effort"), [(False, 8192, "medium"), (True, 2048, "low")]
)
async def test_thinking_budget_becomes_effort_and_reasoning_a_thinking_block(
    nursery: trio.Nursery, stream: bool, budget: int, effort: str
) -> None:
    if stream:
        reply = streamed(
            chunk({"role": "assistant", "reasoning_content": "6 times "}),
            chunk({"reasoning_content": "7"}),
            chunk({"content": "42"}),
            chunk({}, "stop"),
        )
    else:
        reply = completion({"role": "assistant", "content": "42", "reasoning_content": "6 times 7"})
    upstream = FakeUpstream(reply)
    _, client, _ = await start(nursery, upstream)
    call = final_message if stream else create
    msg = await sdk(
        call(client, max_tokens=20000, thinking={"type": "enabled", "budget_tokens": budget})
    )
    assert upstream.requests[0].json()["reasoning_effort"] == effort
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "6 times 7"
    assert msg.content[1].text == "42"


async def test_earlier_thinking_blocks_are_not_sent_upstream(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    history = [
        {"type": "thinking", "thinking": "hmm", "signature": ""},
        {"type": "text", "text": "Answer"},
    ]
    await sdk(
        create(
            client,
            messages=[
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": history},
                {"role": "user", "content": "Q2"},
            ],
        )
    )
    assert upstream.requests[0].json()["messages"][1] == {"role": "assistant", "content": "Answer"}


# -- stop sequences -------------------------------------------------------------------------------


async def test_stop_sequences_are_sent_and_the_matched_one_reported(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(
        completion({"role": "assistant", "content": "one two"}, stop_reason="END")
    )
    _, client, _ = await start(nursery, upstream)
    msg = await sdk(create(client, stop_sequences=["END", "STOP"]))
    assert upstream.requests[0].json()["stop"] == ["END", "STOP"]
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END")


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "refusal": "I can't help with that."},
        {"role": "assistant", "content": "I can't help with that."},
    ],
)
async def test_refusals_stop_with_refusal(nursery: trio.Nursery, message: dict[str, Any]) -> None:
    finish = "stop" if "refusal" in message else "content_filter"
    _, client, _ = await start(nursery, FakeUpstream(completion(message, finish)))
    msg = await sdk(create(client))
    assert msg.stop_reason == "refusal"
    assert msg.content[0].text == "I can't help with that."


# -- errors ---------------------------------------------------------------------------------------


async def test_invalid_request_is_a_400_naming_the_field(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    bad = [
        {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        await sdk(create(client, messages=bad))
    assert body_of(info.value)["type"] == "error"
    assert body_of(info.value)["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.type" in info.value.message
    assert upstream.requests == []


async def test_missing_max_tokens_is_a_400(nursery: trio.Nursery) -> None:
    _, _, gw_url = await start(nursery, FakeUpstream(text_reply()))
    async with httpx.AsyncClient(timeout=SDK_TIMEOUT) as http:
        r = await http.post(
            gw_url + "/v1/messages",
            json={"model": "claude", "messages": [{"role": "user", "content": "Hi"}]},
        )
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: required field missing",
    }


async def test_upstream_errors_keep_status_in_the_anthropic_envelope(nursery: trio.Nursery) -> None:
    body = orjson.dumps({"error": {"message": "slow down", "type": "rate_limit", "code": None}})
    _, client, _ = await start(nursery, FakeUpstream(Reply(status=429, body=body)))
    with pytest.raises(anthropic.RateLimitError) as info:
        await sdk(create(client))
    assert info.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


async def test_unknown_alias_is_a_404_not_found_error(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_reply()))
    with pytest.raises(anthropic.NotFoundError) as info:
        await sdk(create(client, model="nope"))
    assert body_of(info.value)["error"]["type"] == "not_found_error"


# -- auth -----------------------------------------------------------------------------------------


async def test_x_api_key_is_a_client_key(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, _, gw_url = await start(nursery, upstream, auth={"global_keys": ["sk-good"]})
    body = {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}
    async with httpx.AsyncClient(timeout=SDK_TIMEOUT) as http:
        good = await http.post(gw_url + "/v1/messages", json=body, headers={"x-api-key": "sk-good"})
        bad = await http.post(gw_url + "/v1/messages", json=body, headers={"x-api-key": "sk-bad"})
    assert good.status_code == 200
    assert bad.status_code == 401
    assert bad.json()["error"]["type"] == "authentication_error"
    assert len(upstream.requests) == 1


async def test_sdk_key_is_checked(nursery: trio.Nursery) -> None:
    url = await serve_app(nursery, FakeUpstream(text_reply()))
    _, gw_url = await start_gateway(nursery, config(url, auth={"global_keys": ["sk-good"]}))
    await sdk(create(make_client(gw_url, "sk-good")))
    with pytest.raises(anthropic.AuthenticationError):
        await sdk(create(make_client(gw_url, "sk-bad")))


# -- pipeline -------------------------------------------------------------------------------------


async def test_failover_reaches_the_next_provider(nursery: trio.Nursery) -> None:
    broken = FakeUpstream(Reply(status=503, body=b'{"error": {"message": "down"}}'))
    healthy = FakeUpstream(text_reply("from the second"))
    first, second = await serve_app(nursery, broken), await serve_app(nursery, healthy)
    cfg = {
        "targets": {
            "claude": {
                "providers": [{"url": first + "/v1"}, {"url": second + "/v1"}],
                "strategy": "priority",
                "fallback": {"enabled": True, "on_status": [503]},
                "anthropic": {"adapter": True},
            }
        }
    }
    _, gw_url = await start_gateway(nursery, cfg)
    msg = await sdk(create(make_client(gw_url)))
    assert msg.content[0].text == "from the second"
    assert len(broken.requests) == len(healthy.requests) == 1


async def test_rate_limit_answers_429_rate_limit_error(nursery: trio.Nursery) -> None:
    url = await serve_app(nursery, FakeUpstream(text_reply()))
    cfg = {
        "targets": {
            "claude": {
                "url": url + "/v1",
                "anthropic": {"adapter": True},
                "rate_limit": {"requests_per_second": 0.001, "burst_size": 1},
            }
        }
    }
    _, gw_url = await start_gateway(nursery, cfg)
    client = make_client(gw_url)
    await sdk(create(client))
    with pytest.raises(anthropic.RateLimitError) as info:
        await sdk(create(client))
    assert body_of(info.value)["error"]["type"] == "rate_limit_error"


async def test_provider_model_and_reasoning_budget_apply(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    url = await serve_app(nursery, upstream)
    provider = {
        "url": url + "/v1",
        "onwards_model": "qwen3",
        "reasoning": {"style": "thinking_token_budget"},
    }
    cfg = {"targets": {"claude": {"providers": [provider], "anthropic": {"adapter": True}}}}
    _, gw_url = await start_gateway(nursery, cfg)
    await sdk(
        create(
            make_client(gw_url),
            max_tokens=9000,
            thinking={"type": "enabled", "budget_tokens": 5000},
        )
    )
    sent = upstream.requests[0].json()
    assert (sent["model"], sent["thinking_token_budget"]) == ("qwen3", 5000)
    assert "reasoning_effort" not in sent


async def test_requests_and_upstream_calls_are_counted(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    gateway, client, _ = await start(nursery, upstream)
    metrics = install_metrics(gateway, Metrics())
    await sdk(create(client))
    http = {"method": "POST", "status": "200", "endpoint": "/v1/messages"}
    upstream_labels = {"alias": "claude", "provider": "0", "status": "200"}
    with trio.fail_after(5):
        while not metrics.registry.get_sample_value("onwards_http_requests_total", http):
            await trio.sleep(0.005)
    assert (
        metrics.registry.get_sample_value("onwards_upstream_requests_total", upstream_labels) == 1
    )


async def test_effort_the_provider_refuses_is_a_400_before_any_call(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    url = await serve_app(nursery, upstream)
    provider = {"url": url + "/v1", "reasoning": {"efforts": {"low": "low"}}}
    cfg = {"targets": {"claude": {"providers": [provider], "anthropic": {"adapter": True}}}}
    _, gw_url = await start_gateway(nursery, cfg)
    thinking = {"type": "enabled", "budget_tokens": 20000}
    with pytest.raises(anthropic.BadRequestError) as info:
        await sdk(create(make_client(gw_url), max_tokens=30000, thinking=thinking))
    assert body_of(info.value)["error"] == {
        "type": "invalid_request_error",
        "message": "The reasoning effort 'high' is not supported by this model.",
    }
    assert upstream.requests == []


# -- count_tokens, models, passthrough ------------------------------------------------------------


async def test_count_tokens_estimates_without_calling_upstream(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply())
    _, client, _ = await start(nursery, upstream)
    short = await sdk(
        lambda: client.messages.count_tokens(
            model="claude", messages=[{"role": "user", "content": "Hi"}]
        )
    )
    long = await sdk(
        lambda: client.messages.count_tokens(
            model="claude", messages=[{"role": "user", "content": "word " * 400}], tools=[WEATHER]
        )
    )
    assert 0 < short.input_tokens < long.input_tokens
    assert 400 <= long.input_tokens <= 800
    assert upstream.requests == []


async def test_models_in_anthropic_shape(nursery: trio.Nursery) -> None:
    _, client, _ = await start(nursery, FakeUpstream(text_reply()))
    page = await sdk(lambda: client.models.list())
    assert [m.id for m in page.data] == ["claude", "native"]
    assert page.data[0].type == "model"


async def test_native_alias_passes_messages_through_untouched(nursery: trio.Nursery) -> None:
    native = orjson.dumps(
        {
            "id": "msg_native",
            "type": "message",
            "role": "assistant",
            "model": "native",
            "content": [{"type": "text", "text": "from upstream"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )
    upstream = FakeUpstream(Reply(body=native))
    _, client, _ = await start(nursery, upstream)
    msg = await sdk(create(client, model="native"))
    (req,) = upstream.requests
    assert req.path == "/v1/messages"
    assert req.json()["messages"] == [{"role": "user", "content": "Hi"}]
    assert req.headers["anthropic-version"]
    assert (msg.id, msg.content[0].text) == ("msg_native", "from upstream")


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_native_alias_gets_the_request_bytes_verbatim(
    nursery: trio.Nursery, path: str
) -> None:
    raw = b'{"model": "native",  "max_tokens": 5, "messages": [], "anything": {"kept": true}}'
    upstream = FakeUpstream(Reply(body=b'{"input_tokens": 3}'))
    _, _, gw_url = await start(nursery, upstream)
    headers = {"content-type": "application/json", "anthropic-version": "2099-01-01"}
    async with httpx.AsyncClient(timeout=SDK_TIMEOUT) as http:
        r = await http.post(gw_url + path, content=raw, headers=headers)
    assert (r.status_code, r.content) == (200, b'{"input_tokens": 3}')
    (req,) = upstream.requests
    assert (req.path, req.body, req.headers["anthropic-version"]) == (path, raw, "2099-01-01")


async def test_strict_mode_serves_adapter_aliases_only(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_reply("strict hello"))
    _, client, _ = await start(nursery, upstream, strict_mode=True)
    msg = await sdk(create(client))
    assert msg.content[0].text == "strict hello"
    with pytest.raises(anthropic.NotFoundError):
        await sdk(create(client, model="native"))
    with pytest.raises(anthropic.BadRequestError):
        await sdk(create(client, messages=[{"role": "system", "content": "x"}]))


async def test_strict_mode_streams_through_the_closed_chat_schema(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(text_stream("typed ", "stream"))
    _, client, _ = await start(nursery, upstream, strict_mode=True)
    msg = await sdk(final_message(client))
    assert msg.content[0].text == "typed stream"
    assert (msg.stop_reason, msg.usage.output_tokens) == ("end_turn", 3)
