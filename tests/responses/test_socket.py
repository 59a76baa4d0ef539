"""Open Responses' WebSocket mode: ``/v1/responses`` upgraded to a WebSocket, against scripted
Chat Completions upstreams, over loopback (the built-in server, and hypercorn once)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from onwards_trio import Gateway, parse_config
from tests.responses.test_open_responses import stream_post
from tests.responses.test_responses_api import gateway_config, start, text_reply
from tests.support import FakeUpstream, Recorded, Reply, WebSocketClient, serve_app

CREATE = {"type": "response.create", "model": "m"}


def remembering(rec: Recorded) -> Reply:
    """Answers with every user text it was sent, so a test sees what the model saw."""
    texts = []
    for m in rec.json()["messages"]:
        content = m["content"]
        if m["role"] == "user":
            texts.append(content if isinstance(content, str) else content[0]["text"])
    return text_reply(rec, " | ".join(texts))


async def test_a_turn_streams_the_same_events_as_sse(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    client = await WebSocketClient.connect(url, headers=[(b"authorization", b"Bearer k")])
    with trio.fail_after(15):
        events = await client.turn({**CREATE, "input": "hi"})
    sse_events, _ = await stream_post(url, {"model": "m", "input": "hi"})
    assert [e["type"] for e in events] == [e["type"] for e in sse_events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"]["status"] == "completed"
    await client.aclose()


async def test_turns_on_one_socket_run_in_order(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(remembering))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        # both sent at once: the second waits for the first to finish
        await client.send_json({**CREATE, "store": False, "input": "first"})
        await client.send_json({**CREATE, "store": False, "input": "second"})
        finals: list[Any] = []
        while len(finals) < 2:
            event = await client.receive_json()
            if event["type"] == "response.completed":
                finals.append(event["response"])
    assert [f["output"][0]["content"][0]["text"] for f in finals] == ["first", "second"]
    await client.aclose()


async def test_store_false_continues_on_the_same_socket_only(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(remembering))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        first = (await client.turn({**CREATE, "store": False, "input": "code word: cobalt"}))[-1]
        rid = first["response"]["id"]
        second = await client.turn(
            {**CREATE, "store": False, "previous_response_id": rid, "input": "which word?"}
        )
    assert second[-1]["response"]["output"][0]["content"][0]["text"] == (
        "code word: cobalt | which word?"
    )
    await client.aclose()
    other = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        (error,) = await other.turn(
            {**CREATE, "store": False, "previous_response_id": rid, "input": "again"}
        )
    assert error == {
        "type": "error",
        "status": 400,
        "error": {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": f"Previous response with id '{rid}' not found.",
            "param": "previous_response_id",
        },
    }
    await other.aclose()


async def test_a_stored_response_continues_on_another_socket(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(remembering))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        first = (await client.turn({**CREATE, "input": "one"}))[-1]["response"]["id"]
    await client.aclose()
    other = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        events = await other.turn({**CREATE, "previous_response_id": first, "input": "two"})
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "one | two"
    await other.aclose()


async def test_a_failed_continuation_evicts_what_it_continued(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(remembering))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        rid = (await client.turn({**CREATE, "store": False, "input": "x"}))[-1]["response"]["id"]
        orphan = {"type": "function_call_output", "call_id": "call_none", "output": "1"}
        (failed,) = await client.turn(
            {**CREATE, "store": False, "previous_response_id": rid, "input": [orphan]}
        )
        assert failed["type"] == "error" and failed["status"] == 400
        (again,) = await client.turn(
            {**CREATE, "store": False, "previous_response_id": rid, "input": "y"}
        )
    assert again["error"]["code"] == "previous_response_not_found"
    await client.aclose()


@pytest.mark.parametrize("field", ["stream", "background", "stream_options"])
async def test_http_only_fields_are_refused(nursery: trio.Nursery, field: str) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        (error,) = await client.turn({**CREATE, "input": "x", field: True})
        # the socket stays usable
        events = await client.turn({**CREATE, "input": "x"})
    assert error["status"] == 400 and error["error"]["param"] == field
    assert events[-1]["type"] == "response.completed"
    await client.aclose()


async def test_closing_the_socket_cancels_the_turn_in_flight(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "slow " * 100, chunk_delay=0.05))
    gateway, _, url = await start(nursery, upstream)
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        await client.send_json({**CREATE, "input": "x"})
        created = await client.receive_json()
        while (await client.receive_json())["type"] != "response.output_text.delta":
            pass
        await client.aclose()
        store = gateway.responses.response_store
        assert store is not None
        while (record := await store.get(created["response"]["id"])) is None or (
            record.status == "in_progress"
        ):
            await trio.sleep(0.02)
    assert record.status == "cancelled"
    assert upstream.disconnect_seen == 1


async def test_other_paths_and_garbage_are_refused(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    with pytest.raises(ConnectionRefusedError) as refused, trio.fail_after(15):
        await WebSocketClient.connect(url, "/v1/chat/completions")
    assert refused.value.args[0] == 403
    client = await WebSocketClient.connect(url)
    with trio.fail_after(15):
        await client.send_text("not json")
        bad_json = await client.receive_json()
        (wrong_type,) = await client.turn({"type": "response.cancel"})
        (unknown,) = await client.turn({**CREATE, "model": "nope", "input": "x"})
    assert bad_json["type"] == "error" and bad_json["status"] == 400
    assert wrong_type["error"]["param"] == "type"
    assert unknown["status"] == 404
    await client.aclose()


async def test_hypercorn_serves_websocket_mode_too(nursery: trio.Nursery) -> None:
    upstream_url = await serve_app(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    gateway = Gateway(parse_config(gateway_config(upstream_url)))
    info: Any = await nursery.start(
        lambda task_status: gateway.serve(
            "127.0.0.1", 0, server="hypercorn", task_status=task_status
        )
    )
    client = await WebSocketClient.connect(info.url)
    with trio.fail_after(15):
        events = await client.turn({**CREATE, "input": "hi"})
    assert events[-1]["type"] == "response.completed"
    await client.aclose()
