"""``Idempotency-Key`` through the gateway, with the official ``openai`` SDK as the client: a
repeated request is answered from the store and the upstream is called once."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from tests.responses.test_responses_api import make_client, sdk, text_reply
from tests.stores.test_store_postgres import fresh_schema, needs_postgres
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "targets": {
            "m": {
                "url": upstream_url + "/v1",
                "keys": ["sk-a", "sk-b"],
                "open_responses": {"adapter": True},
            }
        },
        "store": {"kind": "memory"},
        **extra,
    }


async def start(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    up_url = await serve_app(nursery, upstream)
    _, url = await start_gateway(nursery, config(up_url))
    return url


def chat(client: openai.OpenAI, key: str | None, **extra: Any) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.chat.completions.with_raw_response.create(
        model="m",
        messages=MESSAGES,
        extra_headers=headers,
        **extra,
    )


async def test_concurrent_duplicates_make_one_upstream_call(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion("only once"), delay=0.5))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    answers: list[Any] = []

    async def one() -> None:
        answers.append(await sdk(lambda: chat(client, "key-1")))

    async with trio.open_nursery() as group:
        for _ in range(5):
            group.start_soon(one)
    assert len(upstream.requests) == 1
    bodies = {a.http_response.content for a in answers}
    assert len(bodies) == 1  # byte-identical answers
    replayed = [a.headers.get("idempotent-replayed") for a in answers]
    assert replayed.count("true") == 4
    assert answers[0].parse().choices[0].message.content == "only once"


async def test_a_streamed_original_is_replayed_byte_for_byte(nursery: trio.Nursery) -> None:
    chunks = sse(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": "stop"}]},
    )
    upstream = FakeUpstream(Reply(chunks=chunks, headers=[(b"content-type", b"text/event-stream")]))
    url = await start(nursery, upstream)
    request = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"authorization": "Bearer sk-a", "idempotency-key": "stream-1"}
    async with httpx.AsyncClient(timeout=10) as http:
        first = await http.post(url + "/v1/chat/completions", json=request, headers=headers)
        again = await http.post(url + "/v1/chat/completions", json=request, headers=headers)
    assert first.content == b"".join(chunks)
    assert again.content == first.content
    assert again.headers["content-type"] == "text/event-stream"
    assert again.headers["idempotent-replayed"] == "true"
    assert len(upstream.requests) == 1


async def test_the_same_key_with_a_different_body_is_422(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion()))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    await sdk(lambda: chat(client, "key-1"))
    with pytest.raises(openai.UnprocessableEntityError) as info:
        await sdk(lambda: chat(client, "key-1", temperature=0.5))
    assert info.value.code == "idempotency_key_reused"
    assert len(upstream.requests) == 1


async def test_keys_are_scoped_per_client_key(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion()))
    url = await start(nursery, upstream)
    a, b = make_client(url, api_key="sk-a"), make_client(url, api_key="sk-b")
    await sdk(lambda: chat(a, "shared"))
    second = await sdk(lambda: chat(b, "shared"))
    assert len(upstream.requests) == 2
    assert "idempotent-replayed" not in second.headers


async def test_without_the_header_nothing_is_deduplicated(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion()))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    await sdk(lambda: chat(client, None))
    await sdk(lambda: chat(client, None))
    assert len(upstream.requests) == 2


async def test_a_failed_original_is_not_stored_and_the_retry_runs(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(
        [Reply(status=503, body=b'{"error":"busy"}'), Reply(body=chat_completion())]
    )
    url = await start(nursery, upstream)
    headers = {"authorization": "Bearer sk-a", "idempotency-key": "retry-1"}
    request = {"model": "m", "messages": MESSAGES}
    async with httpx.AsyncClient(timeout=10) as http:
        first = await http.post(url + "/v1/chat/completions", json=request, headers=headers)
        retry = await http.post(url + "/v1/chat/completions", json=request, headers=headers)
    assert (first.status_code, retry.status_code) == (503, 200)
    assert len(upstream.requests) == 2


async def test_an_unusable_key_is_a_400(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion()))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(lambda: chat(client, "k" * 256))
    assert info.value.param == "Idempotency-Key"
    assert upstream.requests == []


async def test_a_repeated_background_response_is_created_once(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "done"))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    headers = {"Idempotency-Key": "bg-1"}

    def create() -> Any:
        return client.responses.create(model="m", input="x", background=True, extra_headers=headers)

    first, again = await sdk(create), await sdk(create)
    assert first.id == again.id
    with trio.fail_after(10):
        while (await sdk(lambda: client.responses.retrieve(first.id))).status != "completed":
            await trio.sleep(0.05)
    assert len(upstream.requests) == 1


async def test_a_repeated_foreground_response_replays_the_same_response(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "hello there"))
    client = make_client(await start(nursery, upstream), api_key="sk-a")
    headers = {"Idempotency-Key": "fg-1"}

    def create() -> Any:
        return client.responses.with_raw_response.create(
            model="m", input="x", extra_headers=headers
        )

    first, again = await sdk(create), await sdk(create)
    assert again.http_response.content == first.http_response.content
    assert again.parse().output_text == "hello there"
    assert len(upstream.requests) == 1


async def test_a_key_is_free_again_after_its_ttl(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion()))
    up_url = await serve_app(nursery, upstream)
    _, url = await start_gateway(nursery, config(up_url, idempotency={"ttl_secs": 0.3}))
    client = make_client(url, api_key="sk-a")
    await sdk(lambda: chat(client, "short-lived"))
    await trio.sleep(0.5)  # the TTL itself is what is under test
    again = await sdk(lambda: chat(client, "short-lived"))
    assert "idempotent-replayed" not in again.headers
    assert len(upstream.requests) == 2


@needs_postgres
async def test_duplicates_sent_to_two_replicas_make_one_upstream_call(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion("once"), delay=0.5))
    up_url = await serve_app(nursery, upstream)
    async with fresh_schema() as dsn:
        replicas = []
        for _ in range(2):
            _, url = await start_gateway(
                nursery, config(up_url, store={"kind": "postgres", "dsn": dsn})
            )
            replicas.append(make_client(url, api_key="sk-a"))
        answers: list[Any] = []

        async def one(client: openai.OpenAI) -> None:
            answers.append(await sdk(lambda: chat(client, "across")))

        async with trio.open_nursery() as group:
            for i in range(6):
                group.start_soon(one, replicas[i % 2])
        assert len(upstream.requests) == 1
        assert len({a.http_response.content for a in answers}) == 1


async def test_messages_duplicates_make_one_call_and_errors_keep_the_anthropic_envelope(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(Reply(body=chat_completion("hi from claude"), delay=0.3))
    up_url = await serve_app(nursery, upstream)
    targets = {"claude": {"url": up_url + "/v1", "keys": ["sk-a"], "anthropic": {"adapter": True}}}
    _, url = await start_gateway(nursery, {"targets": targets, "store": {"kind": "memory"}})
    client = anthropic.Anthropic(base_url=url, api_key="sk-a", timeout=15, max_retries=0)

    def create(text: str) -> Any:
        return client.messages.with_raw_response.create(
            model="claude",
            max_tokens=10,
            messages=[{"role": "user", "content": text}],
            extra_headers={"Idempotency-Key": "msg-1"},
        )

    try:
        answers: list[Any] = []

        async def one() -> None:
            answers.append(await sdk(lambda: create("hello")))

        async with trio.open_nursery() as group:
            for _ in range(3):
                group.start_soon(one)
        assert len(upstream.requests) == 1
        assert len({a.http_response.content for a in answers}) == 1
        assert answers[0].parse().content[0].text == "hi from claude"
        with pytest.raises(anthropic.UnprocessableEntityError) as info:
            await sdk(lambda: create("something else"))
        error = info.value.body
        assert isinstance(error, dict) and error["type"] == "error"  # Anthropic's envelope
    finally:
        client.close()
