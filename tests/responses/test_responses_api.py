"""``/v1/responses`` end to end: the official ``openai`` SDK against the gateway on loopback,
with fake chat-completions upstreams and tool servers (SPEC §3.1 to §3.5)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import httpx
import openai
import orjson
import pytest
import trio

from onwards_trio import Gateway
from onwards_trio._stores.base import StoredEvent
from onwards_trio._stores.memory import MemoryResponseStore, MemoryStore
from tests.support import FakeUpstream, Recorded, Reply, serve_app, sse, start_gateway

SDK_TIMEOUT = 15.0


# -- fake upstream replies ------------------------------------------------------------------------


def _usage(p: int = 3, c: int = 2) -> dict[str, Any]:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion(
    message: dict[str, Any],
    finish: str = "stop",
    usage: dict[str, Any] | None = None,
    **choice: Any,
) -> Reply:
    """A non-streamed chat completion with one assistant ``message``."""
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", **message},
                "finish_reason": finish,
                **choice,
            }
        ],
        "usage": usage or _usage(),
    }
    return Reply(body=orjson.dumps(body))


def text_reply(rec: Recorded, text: str = "Hello world", *, chunk_delay: float = 0.0) -> Reply:
    """A plain assistant answer, streamed when the request asks for it."""
    if rec.json().get("stream"):
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        chunks: list[Any] = [
            {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        ]
        chunks += [{"id": "c", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
        chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        chunks.append({"id": "c", "choices": [], "usage": _usage()})
        return Reply(
            chunks=sse(*chunks),
            headers=[(b"content-type", b"text/event-stream")],
            chunk_delay=chunk_delay,
        )
    return completion({"content": text})


def tool_reply(rec: Recorded, name: str, args: str, call_id: str = "call_abc") -> Reply:
    """The model asks for one tool call."""
    if rec.json().get("stream"):
        chunks = [
            {
                "id": "c",
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "role": "assistant",
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": call_id,
                                    "type": "function",
                                    "function": {"name": name, "arguments": ""},
                                }
                            ],
                        },
                    }
                ],
            },
            {
                "id": "c",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args}}]},
                    }
                ],
            },
            {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
            {"id": "c", "choices": [], "usage": _usage(5, 1)},
        ]
        return Reply(chunks=sse(*chunks), headers=[(b"content-type", b"text/event-stream")])
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
    return completion({"content": None, "tool_calls": [call]}, "tool_calls", _usage(5, 1))


def has_tool_result(rec: Recorded) -> bool:
    return any(m.get("role") == "tool" for m in rec.json()["messages"])


# -- harness --------------------------------------------------------------------------------------

_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    """SDK clients hold sockets; close them when the test ends."""
    yield
    while _clients:
        _clients.pop().close()


def make_client(base_url: str, api_key: str = "sk-test") -> openai.OpenAI:
    client = openai.OpenAI(
        base_url=base_url + "/v1", api_key=api_key, timeout=SDK_TIMEOUT, max_retries=0
    )
    _clients.append(client)
    return client


def gateway_config(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "targets": {
            "m": {"url": upstream_url + "/v1", "open_responses": {"adapter": True}},
            "plain": {"url": upstream_url + "/v1"},
        },
        "store": {"kind": "memory"},
        **extra,
    }


async def start(
    nursery: trio.Nursery, upstream: FakeUpstream, **extra: Any
) -> tuple[Gateway, openai.OpenAI, str]:
    url = await serve_app(nursery, upstream)
    gateway, gw_url = await start_gateway(nursery, gateway_config(url, **extra))
    return gateway, make_client(gw_url), gw_url


async def sdk(fn: Callable[[], Any]) -> Any:
    """Run a (blocking) SDK call in a worker thread, bounded."""
    with trio.fail_after(SDK_TIMEOUT + 5):
        return await trio.to_thread.run_sync(fn)


async def wait_status(client: openai.OpenAI, rid: str, statuses: set[str]) -> Any:
    with trio.fail_after(10):
        while True:
            resp = await sdk(lambda: client.responses.retrieve(rid))
            if resp.status in statuses:
                return resp
            await trio.sleep(0.05)


FINISHED = {"completed", "failed", "cancelled", "incomplete"}


async def stream_then_leave(gw_url: str, leave_at: str) -> str:
    """POST a streamed response, disconnect once an event of type ``leave_at`` arrived, and
    return the response id."""
    rid = None
    body = {"model": "m", "input": "x", "stream": True}
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("POST", gw_url + "/v1/responses", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = orjson.loads(line[6:])
                rid = rid or data["response"]["id"]
                if data["type"] == leave_at:
                    break
    assert rid is not None
    return str(rid)


# -- non-streaming --------------------------------------------------------------------------------


async def test_create_non_streaming_returns_a_full_response(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(lambda: client.responses.create(model="m", input="Hi", instructions="sys"))
    assert resp.status == "completed"
    assert resp.id.startswith("resp_")
    assert resp.output_text == "Hello world"
    assert resp.model == "m"
    assert resp.instructions == "sys"
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (3, 2)
    assert resp.completed_at is not None
    (req,) = upstream.requests
    assert req.path == "/v1/chat/completions"
    assert [m["role"] for m in req.json()["messages"]] == ["system", "user"]


async def test_stored_response_can_be_retrieved(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(lambda: client.responses.create(model="m", input="Hi"))
    got = await sdk(lambda: client.responses.retrieve(resp.id))
    assert got.status == "completed"
    assert got.output_text == "Hello world"


async def test_store_false_is_not_retrievable(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(lambda: client.responses.create(model="m", input="Hi", store=False))
    with pytest.raises(openai.NotFoundError):
        await sdk(lambda: client.responses.retrieve(resp.id))


async def test_invalid_request_is_a_400_naming_the_field(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(lambda: client.responses.create(model="m", input="Hi", temperature=9))
    assert info.value.param == "temperature"
    assert upstream.requests == []


async def test_non_adapter_alias_passes_through(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(body=b'{"id": "resp_up", "object": "response"}'))
    _, _, gw_url = await start(nursery, upstream)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(gw_url + "/v1/responses", json={"model": "plain", "input": "x"})
    assert r.status_code == 200
    assert upstream.requests[0].path == "/v1/responses"


async def test_upstream_error_is_answered_and_stored_as_failed(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(Reply(status=500, body=b'{"error": {"message": "boom"}}'))
    gateway, _, gw_url = await start(nursery, upstream)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(gw_url + "/v1/responses", json={"model": "m", "input": "x"})
    assert r.status_code == 500
    store = gateway.responses.response_store
    assert store is not None
    records = store._records  # type: ignore[attr-defined]
    (record,) = records.values()
    assert record.status == "failed"
    assert record.response["error"]["code"] == "server_error"


# -- streaming ------------------------------------------------------------------------------------

TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
# A background response shows its queued state first.
BACKGROUND_EVENTS = ["response.created", "response.queued", *TEXT_EVENTS[1:]]


async def test_streaming_events_in_spec_order(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)

    def run() -> list[Any]:
        with client.responses.create(model="m", input="Hi", stream=True) as stream:
            return list(stream)

    events = await sdk(run)
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in deltas) == "Hello world"
    added = events[2]
    assert all(e.item_id == added.item.id for e in deltas)
    assert all(e.output_index == 0 and e.content_index == 0 for e in deltas)
    final = events[-1].response
    assert final.status == "completed"
    assert final.output_text == "Hello world"
    assert final.usage is not None and final.usage.total_tokens == 5
    assert upstream.requests[0].json()["stream_options"] == {"include_usage": True}


async def test_sse_lines_carry_event_id_and_data(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, _, gw_url = await start(nursery, upstream)
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            gw_url + "/v1/responses", json={"model": "m", "input": "x", "stream": True}
        )
    assert r.headers["content-type"].startswith("text/event-stream")
    first = r.text.split("\n\n")[0].split("\n")
    assert first[0] == "event: response.created"
    assert first[1] == "id: 0"
    data = orjson.loads(first[2].removeprefix("data: "))
    assert (data["type"], data["sequence_number"]) == ("response.created", 0)


async def test_client_disconnect_mid_stream_leaves_a_stored_response(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "one two three four", chunk_delay=0.2))
    _, client, gw_url = await start(nursery, upstream)
    rid = await stream_then_leave(gw_url, "response.created")
    resp = await wait_status(client, rid, FINISHED)
    # The loop goes on after its client leaves (the default policy) and stores its result.
    assert resp.status == "completed"
    assert resp.output_text == "one two three four"


# -- tools ----------------------------------------------------------------------------------------


async def test_server_side_tool_round_trip(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b'{"temperature": 21}'))
    tool_url = await serve_app(nursery, tool)

    def script(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, "It is 21 degrees")
        return tool_reply(rec, "get_weather", '{"city": "Paris"}')

    upstream = FakeUpstream(script)
    _, client, _ = await start(
        nursery,
        upstream,
        tools={"get_weather": {"url": tool_url + "/weather", "description": "weather"}},
    )
    resp = await sdk(lambda: client.responses.create(model="m", input="Weather in Paris?"))
    assert resp.status == "completed"
    assert [i.type for i in resp.output] == ["function_call", "function_call_output", "message"]
    assert resp.output[0].call_id == resp.output[1].call_id == "call_abc"
    assert resp.output_text == "It is 21 degrees"
    assert tool.requests[0].json() == {"city": "Paris"}
    offered = upstream.requests[0].json()["tools"]
    assert offered[0]["function"]["name"] == "get_weather"
    second = upstream.requests[1].json()["messages"]
    assert second[-1] == {
        "role": "tool",
        "tool_call_id": "call_abc",
        "content": '{"temperature":21}',
    }
    assert resp.usage is not None and resp.usage.input_tokens == 8  # summed over both calls


async def test_streamed_server_tool_events_carry_the_real_call_id(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(body=b'{"ok": true}'))
    tool_url = await serve_app(nursery, tool)

    def script(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, "done")
        return tool_reply(rec, "lookup", "{}", call_id="call_real")

    upstream = FakeUpstream(script)
    _, client, _ = await start(nursery, upstream, tools={"lookup": {"url": tool_url}})

    def run() -> list[Any]:
        with client.responses.create(model="m", input="go", stream=True) as stream:
            return list(stream)

    events = await sdk(run)
    assert events[-1].type == "response.completed"
    calls = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert calls and all(e.item_id.startswith("fc_") for e in calls)
    done_items = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done_items] == ["function_call", "function_call_output", "message"]
    assert done_items[0].call_id == done_items[1].call_id == "call_real"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    indices = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert indices == [0, 1, 2]


async def test_client_function_call_round_trip_with_previous_response_id(
    nursery: trio.Nursery,
) -> None:
    def script(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, "Sunny in Paris")
        return tool_reply(rec, "get_weather", '{"city":"Paris"}', call_id="call_client")

    upstream = FakeUpstream(script)
    _, client, _ = await start(nursery, upstream)
    tools: Any = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "w",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    first = await sdk(
        lambda: client.responses.create(model="m", input="Weather in Paris?", tools=tools)
    )
    assert first.status == "completed"
    (call,) = first.output
    assert call.type == "function_call"
    assert (call.name, call.call_id, call.arguments) == (
        "get_weather",
        "call_client",
        '{"city":"Paris"}',
    )
    second = await sdk(
        lambda: client.responses.create(
            model="m",
            previous_response_id=first.id,
            tools=tools,
            input=[{"type": "function_call_output", "call_id": "call_client", "output": "sunny"}],
        )
    )
    assert second.output_text == "Sunny in Paris"
    assert second.previous_response_id == first.id
    messages = upstream.requests[1].json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[0]["content"] == [{"type": "text", "text": "Weather in Paris?"}]
    assert messages[1]["tool_calls"][0]["id"] == "call_client"
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_client"}


async def test_previous_response_replays_inputs_and_outputs(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "answer"))
    _, client, _ = await start(nursery, upstream)
    first = await sdk(lambda: client.responses.create(model="m", input="one"))
    second = await sdk(
        lambda: client.responses.create(model="m", input="two", previous_response_id=first.id)
    )
    await sdk(
        lambda: client.responses.create(model="m", input="three", previous_response_id=second.id)
    )
    messages = upstream.requests[2].json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]


async def test_unknown_previous_response_is_400(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(
            lambda: client.responses.create(model="m", input="x", previous_response_id="resp_no")
        )
    assert info.value.param == "previous_response_id"


# -- stored responses: input items, delete --------------------------------------------------------


async def test_input_items_lists_the_normalised_input(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(
        lambda: client.responses.create(
            model="m",
            input=[
                {"role": "user", "content": "first"},
                {"role": "user", "content": "second"},
            ],
        )
    )
    page = await sdk(lambda: client.responses.input_items.list(resp.id, order="asc"))
    texts = [item.content[0].text for item in page.data]
    assert texts == ["first", "second"]
    assert all(item.id.startswith("msg_") for item in page.data)


async def test_delete_forgets_the_response(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(lambda: client.responses.create(model="m", input="x"))
    await sdk(lambda: client.responses.delete(resp.id))
    with pytest.raises(openai.NotFoundError):
        await sdk(lambda: client.responses.retrieve(resp.id))


async def test_unknown_response_id_is_404(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    with pytest.raises(openai.NotFoundError):
        await sdk(lambda: client.responses.retrieve("resp_missing"))


async def test_other_keys_cannot_see_a_response(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    url = await serve_app(nursery, upstream)
    cfg = gateway_config(url, auth={"global_keys": ["key-a", "key-b"]})
    _, gw_url = await start_gateway(nursery, cfg)

    clients = {k: make_client(gw_url, k) for k in ("key-a", "key-b", "stranger")}

    def client(key: str) -> openai.OpenAI:
        return clients[key]

    resp = await sdk(lambda: client("key-a").responses.create(model="m", input="x"))
    assert (await sdk(lambda: client("key-a").responses.retrieve(resp.id))).id == resp.id
    with pytest.raises(openai.NotFoundError):
        await sdk(lambda: client("key-b").responses.retrieve(resp.id))
    with pytest.raises(openai.AuthenticationError):
        await sdk(lambda: client("stranger").responses.retrieve(resp.id))


# -- background -----------------------------------------------------------------------------------


async def test_background_then_retrieve_then_resumed_stream(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    assert queued.status == "queued"
    assert queued.background is True
    done = await wait_status(client, queued.id, {"completed"})
    assert done.output_text == "Hello world"

    def resume() -> list[Any]:
        with client.responses.retrieve(queued.id, stream=True, starting_after=3) as stream:
            return list(stream)

    events = await sdk(resume)
    assert [e.type for e in events] == BACKGROUND_EVENTS[4:]
    assert [e.sequence_number for e in events] == list(range(4, len(BACKGROUND_EVENTS)))
    assert upstream.requests[0].json()["stream"] is True


async def test_background_stream_followed_live_with_last_event_id(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "a b c d e f", chunk_delay=0.1))
    _, client, gw_url = await start(nursery, upstream)
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(
            gw_url + f"/v1/responses/{queued.id}",
            params={"stream": "true"},
            headers={"last-event-id": "1"},
        )
    ids = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
    assert ids[0] == 2
    assert ids == list(range(2, ids[-1] + 1))
    assert "event: response.completed" in r.text


async def test_background_with_stream_true_streams_the_events(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)

    def run() -> list[Any]:
        with client.responses.create(model="m", input="x", background=True, stream=True) as stream:
            return list(stream)

    events = await sdk(run)
    assert [e.type for e in events] == BACKGROUND_EVENTS


async def test_cancel_a_running_background_response(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "a b c d e f g h i j", chunk_delay=0.3))
    _, client, _ = await start(nursery, upstream)
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    await wait_status(client, queued.id, {"in_progress"})
    cancelled = await sdk(lambda: client.responses.cancel(queued.id))
    assert cancelled.status == "cancelled"
    again = await sdk(lambda: client.responses.retrieve(queued.id))
    assert again.status == "cancelled"
    with trio.fail_after(5):
        while upstream.active:  # the upstream call was cancelled too
            await trio.sleep(0.05)


async def test_cancel_a_foreground_response_is_400(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, client, _ = await start(nursery, upstream)
    resp = await sdk(lambda: client.responses.create(model="m", input="x"))
    with pytest.raises(openai.BadRequestError):
        await sdk(lambda: client.responses.cancel(resp.id))


async def test_gateway_shutdown_stores_running_background_as_cancelled() -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "a b c d e f g", chunk_delay=0.3))
    async with trio.open_nursery() as outer:
        up_url = await serve_app(outer, upstream)
        async with trio.open_nursery() as inner:
            gateway, gw_url = await start_gateway(inner, gateway_config(up_url))
            client = make_client(gw_url)
            queued = await sdk(
                lambda: client.responses.create(model="m", input="x", background=True)
            )
            await wait_status(client, queued.id, {"in_progress"})
            store = gateway.responses.response_store
            inner.cancel_scope.cancel()
        assert store is not None
        record = await store.get(queued.id)
        assert record is not None
        assert record.status == "cancelled"
        outer.cancel_scope.cancel()


# -- more loop behaviour through HTTP -------------------------------------------------------------


async def test_agent_tool_runs_a_sub_agent_on_its_own_alias(nursery: trio.Nursery) -> None:
    def script(rec: Recorded) -> Reply:
        body = rec.json()
        if body["model"] == "small":
            return text_reply(rec, "helper says hi")
        if has_tool_result(rec):
            return text_reply(rec, "final")
        return tool_reply(rec, "helper", '{"input": "question"}', call_id="call_agent")

    upstream = FakeUpstream(script)
    url = await serve_app(nursery, upstream)
    cfg = gateway_config(url)
    cfg["targets"]["small"] = {"url": url + "/v1"}
    cfg["tools"] = {
        "helper": {"kind": "agent", "model": "small", "instructions": "be terse"},
    }
    _, gw_url = await start_gateway(nursery, cfg)
    client = make_client(gw_url)
    resp = await sdk(lambda: client.responses.create(model="m", input="ask the helper"))
    assert resp.output_text == "final"
    outputs = [i for i in resp.output if i.type == "function_call_output"]
    assert [o.output for o in outputs] == ["helper says hi"]
    sub = [r.json() for r in upstream.requests if r.json()["model"] == "small"]
    assert sub[0]["messages"] == [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "question"},
    ]


async def test_tool_error_goes_back_to_the_model(nursery: trio.Nursery) -> None:
    tool = FakeUpstream(Reply(status=500, body=b"broken"))
    tool_url = await serve_app(nursery, tool)

    def script(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, "sorry, the tool failed")
        return tool_reply(rec, "lookup", "{}")

    upstream = FakeUpstream(script)
    _, client, _ = await start(nursery, upstream, tools={"lookup": {"url": tool_url}})
    resp = await sdk(lambda: client.responses.create(model="m", input="x"))
    assert resp.status == "completed"
    tool_message = upstream.requests[1].json()["messages"][-1]
    assert tool_message["role"] == "tool"
    assert "HTTP 500" in tool_message["content"]
    (out,) = [i for i in resp.output if i.type == "function_call_output"]
    assert out.output.startswith("Error:")


async def test_upstream_breaking_mid_stream_ends_with_response_failed(
    nursery: trio.Nursery,
) -> None:
    def script(rec: Recorded) -> Reply:
        reply = text_reply(rec, "a b c d")
        reply.fail_after = 2
        return reply

    upstream = FakeUpstream(script)
    _, client, _ = await start(nursery, upstream)

    def run() -> list[Any]:
        with client.responses.create(model="m", input="x", stream=True) as stream:
            return list(stream)

    events = await sdk(run)
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None
    stored = await sdk(lambda: client.responses.retrieve(events[-1].response.id))
    assert stored.status == "failed"


async def test_sqlite_store_keeps_responses_and_event_logs(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    path = str(tmp_path / "gw.sqlite3")
    _, client, _ = await start(nursery, upstream, store={"kind": "sqlite", "path": path})
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    done = await wait_status(client, queued.id, {"completed"})
    assert done.output_text == "Hello world"

    def resume() -> list[Any]:
        with client.responses.retrieve(queued.id, stream=True, starting_after=7) as stream:
            return list(stream)

    assert [e.type for e in await sdk(resume)] == BACKGROUND_EVENTS[8:]
    follow_up = await sdk(
        lambda: client.responses.create(model="m", input="y", previous_response_id=queued.id)
    )
    assert follow_up.status == "completed"


async def test_disconnect_with_cancel_policy_stores_cancelled(nursery: trio.Nursery) -> None:
    from onwards_trio._loop.run import DisconnectPolicy, LoopConfig

    upstream = FakeUpstream(lambda rec: text_reply(rec, "a b c d e f g h", chunk_delay=0.2))
    gateway, client, gw_url = await start(nursery, upstream)
    gateway.responses.loop_config = LoopConfig(on_disconnect=DisconnectPolicy.CANCEL)
    rid = await stream_then_leave(gw_url, "response.output_text.delta")  # mid-message
    resp = await wait_status(client, rid, FINISHED)
    assert resp.status == "cancelled"


async def test_demo_shows_the_server_side_tool_loop(nursery: trio.Nursery, tmp_path: Any) -> None:
    from onwards_trio._app.demo import demo_config, demo_upstream

    up_url = await serve_app(nursery, demo_upstream(delay=0))
    gateway = Gateway(demo_config(up_url, store_path=str(tmp_path / "demo.sqlite3")))
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    client = make_client(info.url)

    def run() -> list[Any]:
        with client.responses.create(
            model="demo", input="What's the weather in Paris?", stream=True
        ) as stream:
            return list(stream)

    events = await sdk(run)
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [i.type for i in final.output] == ["function_call", "function_call_output", "message"]
    assert "sunny" in final.output_text


class FlakyResponseStore(MemoryResponseStore):
    """A memory response store whose writes fail on demand (as a locked SQLite file does)."""

    def __init__(self, *, fail_status: str | None = None, fail_appends: int = 0) -> None:
        super().__init__()
        self.fail_status = fail_status
        self.fail_appends = fail_appends

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        if response.get("status") == self.fail_status:
            self.fail_status = None
            raise sqlite3.OperationalError("database is locked")
        return await super().update(response_id, response)

    async def append_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        if self.fail_appends:
            self.fail_appends -= 1
            raise sqlite3.OperationalError("database is locked")
        await super().append_events(response_id, events)


async def test_a_failed_event_log_write_neither_breaks_the_loop_nor_loses_events(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    gateway, client, _ = await start(nursery, upstream)
    store = gateway.responses.response_store = FlakyResponseStore(fail_appends=1)
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    done = await wait_status(client, queued.id, {"completed", "failed"})
    assert done.status == "completed"
    events = await store.events_after(queued.id, -1)
    assert [e.type for e in events] == BACKGROUND_EVENTS
    assert [e.sequence for e in events] == list(range(len(BACKGROUND_EVENTS)))


async def test_a_store_error_in_a_background_response_does_not_stop_the_gateway(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    gateway, client, _ = await start(nursery, upstream)
    gateway.responses.response_store = FlakyResponseStore(fail_status="in_progress")
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    done = await wait_status(client, queued.id, {"completed", "failed"})
    assert done.status == "completed"
    again = await sdk(lambda: client.responses.create(model="m", input="y"))
    assert again.output_text == "Hello world"


async def test_store_false_keeps_no_sub_agent_steps_either(nursery: trio.Nursery) -> None:
    def script(rec: Recorded) -> Reply:
        if rec.json()["model"] == "small":
            return text_reply(rec, "helper says hi")
        if has_tool_result(rec):
            return text_reply(rec, "final")
        return tool_reply(rec, "helper", '{"input": "question"}')

    url = await serve_app(nursery, FakeUpstream(script))
    cfg = gateway_config(url)
    cfg["targets"]["small"] = {"url": url + "/v1"}
    cfg["tools"] = {"helper": {"kind": "agent", "model": "small"}}
    gateway, gw_url = await start_gateway(nursery, cfg)
    client = make_client(gw_url)
    resp = await sdk(lambda: client.responses.create(model="m", input="ask", store=False))
    assert resp.output_text == "final"
    steps = gateway.responses.step_store
    assert isinstance(steps, MemoryStore)
    assert steps._responses == {}  # neither the response nor its sub-agent was kept


async def test_persist_timeout_follows_a_replaced_loop_config(nursery: trio.Nursery) -> None:
    from onwards_trio._loop.run import LoopConfig

    gateway, _, _ = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    gateway.responses.loop_config = LoopConfig(persist_timeout=0.5)
    assert gateway.responses.persist_timeout == 0.5


async def test_background_events_reach_the_store_while_the_loop_waits(
    nursery: trio.Nursery,
) -> None:
    # The model takes 3 s to answer: response.created / in_progress must not wait that long
    # in memory (another process following the response reads them from the store).
    def slow(rec: Recorded) -> Reply:
        return attrs.evolve(text_reply(rec), delay=3.0)

    gateway, client, _ = await start(nursery, FakeUpstream(slow))
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    store = gateway.responses.response_store
    assert store is not None
    with trio.fail_after(2):
        while not await store.events_after(queued.id, -1):
            await trio.sleep(0.05)
    record = await store.get(queued.id)
    assert record is not None and record.status == "in_progress"
    types = [e.type for e in await store.events_after(queued.id, -1)]
    assert types == ["response.created", "response.queued", "response.in_progress"]


# -- replicas sharing a store: a cancel made through another replica ------------------------------


class SharedMemoryResponseStore(MemoryResponseStore):
    """A memory store that says it is shared (it has ``status``), as the PostgreSQL one is:
    two gateways in this process given the same instance act as two replicas on one database.
    Counts the status reads; ``cancel_before_start`` cancels a response (as another replica
    would) just before its loop marks it ``in_progress``."""

    def __init__(self, *, cancel_before_start: bool = False) -> None:
        super().__init__()
        self.status_reads = 0
        self.cancel_before_start = cancel_before_start

    async def status(self, response_id: str) -> str | None:
        self.status_reads += 1
        record = await self.get(response_id)
        return None if record is None else record.status

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        if self.cancel_before_start and response.get("status") == "in_progress":
            self.cancel_before_start = False
            await super().update(response_id, {**response, "status": "cancelled"})
        return await super().update(response_id, response)


class CountingResponseStore(MemoryResponseStore):
    """A memory store that counts its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def get(self, response_id: str) -> Any:
        self.gets += 1
        return await super().get(response_id)


async def two_replicas(
    nursery: trio.Nursery, upstream: FakeUpstream, store: MemoryResponseStore
) -> tuple[tuple[Gateway, openai.OpenAI], tuple[Gateway, openai.OpenAI]]:
    url = await serve_app(nursery, upstream)
    steps = MemoryStore()
    out = []
    for _ in range(2):
        gateway, gw_url = await start_gateway(nursery, gateway_config(url))
        gateway.responses.response_store = store
        gateway.responses.step_store = steps
        out.append((gateway, make_client(gw_url)))
    return out[0], out[1]


async def wait_upstream_active(upstream: FakeUpstream) -> None:
    with trio.fail_after(5):
        while not upstream.active:
            await trio.sleep(0.02)


@pytest.mark.parametrize("via", ["cancel", "delete"])
async def test_a_cancel_through_another_replica_stops_the_loop(
    nursery: trio.Nursery, via: str
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, " ".join("w" * 30), chunk_delay=0.3))
    store = SharedMemoryResponseStore()
    (gw_a, a), (_, b) = await two_replicas(nursery, upstream, store)
    queued = await sdk(lambda: a.responses.create(model="m", input="x", background=True))
    await wait_upstream_active(upstream)
    assert queued.id in gw_a.responses._live
    start = trio.current_time()
    if via == "cancel":
        cancelled = await sdk(lambda: b.responses.cancel(queued.id))
        assert cancelled.status == "cancelled"
    else:
        await sdk(lambda: b.responses.delete(queued.id))
    with trio.fail_after(5):
        while queued.id in gw_a.responses._live:  # A's loop ended and let go of the response
            await trio.sleep(0.02)
    assert trio.current_time() - start < 2.5  # the upstream would have taken ~9 s
    assert (upstream.active, upstream.finished, len(upstream.requests)) == (0, 0, 1)
    assert store.status_reads >= 1
    steps = gw_a.responses.step_store
    assert steps is not None
    chain = await steps.list_chain(queued.id, None)
    assert [s.state.value for s in chain] == ["canceled"]
    if via == "cancel":
        again = await sdk(lambda: a.responses.retrieve(queued.id))
        assert again.status == "cancelled"
    else:
        assert await store.get(queued.id) is None


async def test_a_response_cancelled_elsewhere_while_queued_makes_no_model_call(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    store = SharedMemoryResponseStore(cancel_before_start=True)
    (gw_a, a), _ = await two_replicas(nursery, upstream, store)
    queued = await sdk(lambda: a.responses.create(model="m", input="x", background=True))
    with trio.fail_after(5):
        while queued.id in gw_a.responses._live:
            await trio.sleep(0.02)
    assert upstream.requests == []
    assert (await sdk(lambda: a.responses.retrieve(queued.id))).status == "cancelled"


async def test_a_store_that_is_not_shared_is_not_polled(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, " ".join("w" * 20), chunk_delay=0.1))
    gateway, client, _ = await start(nursery, upstream)
    store = gateway.responses.response_store = CountingResponseStore()
    queued = await sdk(lambda: client.responses.create(model="m", input="x", background=True))
    await wait_upstream_active(upstream)
    reads = store.gets
    await trio.sleep(1.2)  # more than two polling intervals
    assert upstream.active  # still running
    assert store.gets == reads
    cancelled = await sdk(lambda: client.responses.cancel(queued.id))
    assert cancelled.status == "cancelled"


class FlakySharedResponseStore(SharedMemoryResponseStore):
    """Its first status read fails and its second never answers."""

    async def status(self, response_id: str) -> str | None:
        self.status_reads += 1
        if self.status_reads == 1:
            raise sqlite3.OperationalError("database is locked")
        if self.status_reads == 2:
            await trio.sleep_forever()
        return await super().status(response_id)


async def test_a_failing_or_hanging_status_read_is_retried(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onwards_trio._responses import service as _responses_api

    monkeypatch.setattr(_responses_api, "_REMOTE_CANCEL_READ_TIMEOUT", 0.3)
    upstream = FakeUpstream(lambda rec: text_reply(rec, " ".join("w" * 30), chunk_delay=0.3))
    store = FlakySharedResponseStore()
    (gw_a, a), (_, b) = await two_replicas(nursery, upstream, store)
    queued = await sdk(lambda: a.responses.create(model="m", input="x", background=True))
    with trio.fail_after(5):
        while store.status_reads < 3:  # past the failed read and the abandoned one
            await trio.sleep(0.02)
    assert queued.id in gw_a.responses._live  # neither stopped the response
    cancelled = await sdk(lambda: b.responses.cancel(queued.id))
    assert cancelled.status == "cancelled"
    with trio.fail_after(5):
        while queued.id in gw_a.responses._live:
            await trio.sleep(0.02)
    assert (upstream.active, upstream.finished) == (0, 0)
