"""What the Open Responses spec (2026-04-24) requires of ``/v1/responses``, against scripted
Chat Completions upstreams over loopback: stream framing, tool constraints, item references,
refusals, annotations, reasoning, background streams, error codes and compaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import orjson
import trio

from onwards_trio._loop.run import LoopConfig
from tests.responses.test_responses_api import (
    _close_clients,
    _usage,
    completion,
    has_tool_result,
    start,
    text_reply,
    tool_reply,
)
from tests.support import FakeUpstream, Recorded, Reply, serve_app, sse

__all__ = ["_close_clients", "chat_reply", "post", "sse_events", "stream_post"]

TERMINAL = ("response.completed", "response.failed", "response.incomplete")


def chat_reply(
    rec: Recorded, message: dict[str, Any], finish: str = "stop", logprobs: Any = None
) -> Reply:
    """The assistant ``message`` as a completion, or (when the request streams) as chunks:
    one delta per field (content in two pieces unless it has ``logprobs``, which go with
    it), then the finish and usage chunks."""
    extra = {} if logprobs is None else {"logprobs": logprobs}
    if not rec.json().get("stream"):
        return completion(message, finish, **extra)
    deltas: list[dict[str, Any]] = [{"role": "assistant"}]
    for key, value in message.items():
        if key == "content" and isinstance(value, str) and len(value) > 1 and not extra:
            half = len(value) // 2
            deltas += [{"content": value[:half]}, {"content": value[half:]}]
        elif key == "tool_calls":
            deltas.append({"tool_calls": [{**c, "index": n} for n, c in enumerate(value)]})
        else:
            deltas.append({key: value})
    chunks: list[Any] = [
        {"id": "c", "choices": [{"index": 0, "delta": d, **(extra if "content" in d else {})}]}
        for d in deltas
    ]
    chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({"id": "c", "choices": [], "usage": _usage()})
    return Reply(chunks=sse(*chunks), headers=[(b"content-type", b"text/event-stream")])


def sse_events(raw: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON events of an SSE body and its data lines (``[DONE]`` included), checking
    that every ``event:`` names its data's ``type``."""
    events, data_lines = [], []
    for block in raw.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" not in fields:
            continue
        data_lines.append(fields["data"])
        if fields["data"] != "[DONE]":
            event = orjson.loads(fields["data"])
            assert fields["event"] == event["type"]
            events.append(event)
    return events, data_lines


async def post(url: str, body: dict[str, Any], path: str = "/v1/responses") -> httpx.Response:
    async with httpx.AsyncClient(timeout=15) as http:
        return await http.post(url + path, json=body)


async def stream_post(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    async with httpx.AsyncClient(timeout=15) as http:
        r = await http.post(url + "/v1/responses", json={**body, "stream": True})
        assert r.headers["content-type"] == "text/event-stream"
        return sse_events(r.text)


async def test_a_stream_ends_with_done_after_its_terminal_event(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    events, lines = await stream_post(url, {"model": "m", "input": "hi"})
    assert lines[-1] == "[DONE]"
    assert events[-1]["type"] == "response.completed"
    assert lines.count("[DONE]") == 1


async def test_a_resumed_background_stream_ends_with_done(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    async with httpx.AsyncClient(timeout=15) as http:
        created = (
            await http.post(
                url + "/v1/responses", json={"model": "m", "input": "hi", "background": True}
            )
        ).json()
        r = await http.get(f"{url}/v1/responses/{created['id']}?stream=true")
    events, lines = sse_events(r.text)
    assert [e["type"] for e in events[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert events[0]["response"]["status"] == "queued"
    assert events[-1]["type"] == "response.completed" and lines[-1] == "[DONE]"


def _fn(name: str) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "parameters": {"type": "object", "properties": {}},
    }


async def test_allowed_tools_are_enforced(nursery: trio.Nursery) -> None:
    # A model that calls a tool outside the allowed list anyway.
    upstream = FakeUpstream(lambda rec: tool_reply(rec, "send_email", "{}"))
    _, _, url = await start(nursery, upstream)
    r = await post(
        url,
        {
            "model": "m",
            "input": "go",
            "tools": [_fn("get_report"), _fn("send_email")],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "function", "name": "get_report"}],
            },
        },
    )
    sent = upstream.requests[0].json()
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_report"]
    assert sent["tool_choice"] == "auto"
    response = r.json()
    (call,) = response["output"]
    assert call["name"] == "send_email" and call["status"] == "incomplete"  # suppressed
    assert [t["name"] for t in response["tools"]] == ["get_report", "send_email"]
    assert response["tool_choice"]["type"] == "allowed_tools"


async def _tool_server(nursery: trio.Nursery) -> tuple[FakeUpstream, str]:
    tool = FakeUpstream(Reply(body=b'{"ok": true}'))
    return tool, await serve_app(nursery, tool)


async def _lookup_gateway(
    nursery: trio.Nursery, answer_without_tools: bool
) -> tuple[Any, FakeUpstream, FakeUpstream, str]:
    """A gateway with a server tool ``lookup`` and a model that calls it whenever it is
    offered (and, unless ``answer_without_tools``, even when it is not)."""
    tool, tool_url = await _tool_server(nursery)

    def model(rec: Recorded) -> Reply:
        if answer_without_tools and not rec.json().get("tools"):
            return text_reply(rec, "done looking")
        return tool_reply(rec, "lookup", "{}", call_id=f"call_{len(upstream.requests)}")

    upstream = FakeUpstream(model)
    gateway, _, url = await start(nursery, upstream, tools={"lookup": {"url": tool_url + "/t"}})
    return gateway, tool, upstream, url


async def test_max_tool_calls_stops_offering_tools_and_keeps_the_output(
    nursery: trio.Nursery,
) -> None:
    _, tool, upstream, url = await _lookup_gateway(nursery, answer_without_tools=True)
    response = (await post(url, {"model": "m", "input": "look", "max_tool_calls": 1})).json()
    assert len(tool.requests) == 1
    assert "tools" in upstream.requests[0].json()
    assert "tools" not in upstream.requests[1].json()  # no more tools offered
    assert response["status"] == "completed"
    assert [i["type"] for i in response["output"]] == [
        "function_call",
        "function_call_output",
        "message",
    ]
    assert response["max_tool_calls"] == 1


async def test_a_model_that_keeps_calling_past_max_tool_calls_is_not_run_again(
    nursery: trio.Nursery,
) -> None:
    _, tool, _, url = await _lookup_gateway(nursery, answer_without_tools=False)
    response = (await post(url, {"model": "m", "input": "look", "max_tool_calls": 1})).json()
    assert len(tool.requests) == 1
    assert response["status"] == "completed"
    statuses = [(i["type"], i["status"]) for i in response["output"]]
    assert statuses == [
        ("function_call", "completed"),
        ("function_call_output", "completed"),
        ("function_call", "incomplete"),
    ]


async def test_the_iteration_cap_ends_incomplete_with_the_output_so_far(
    nursery: trio.Nursery,
) -> None:
    gateway, _, _, url = await _lookup_gateway(nursery, answer_without_tools=False)
    gateway.responses.loop_config = LoopConfig(max_response_iterations=3)
    events, lines = await stream_post(url, {"model": "m", "input": "look"})
    final = events[-1]
    assert final["type"] == "response.incomplete" and lines[-1] == "[DONE]"
    response = final["response"]
    assert response["status"] == "incomplete" and response["error"] is None
    assert response["incomplete_details"] == {"reason": "max_messages"}
    assert [i["type"] for i in response["output"]][:2] == ["function_call", "function_call_output"]


async def test_item_reference_sends_the_item_it_names(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "noted"))
    _, _, url = await start(nursery, upstream)
    first = (
        await post(
            url,
            {
                "model": "m",
                "input": [
                    {"type": "message", "id": "msg_mine", "role": "user", "content": "Tuesday"},
                    {"type": "message", "role": "user", "content": "and support first"},
                ],
            },
        )
    ).json()
    second = await post(
        url,
        {
            "model": "m",
            "previous_response_id": first["id"],
            "input": [
                {"type": "item_reference", "id": "msg_mine"},
                {"role": "user", "content": "what day?"},
            ],
        },
    )
    assert second.status_code == 200, second.text
    sent = [m["content"] for m in upstream.requests[1].json()["messages"]]
    assert sent == [
        [{"type": "text", "text": "Tuesday"}],
        [{"type": "text", "text": "and support first"}],
        "noted",
        [{"type": "text", "text": "Tuesday"}],
        [{"type": "text", "text": "what day?"}],
    ]
    missing = await post(
        url, {"model": "m", "input": [{"type": "item_reference", "id": "msg_nowhere"}]}
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input[0].id"


async def test_a_refusal_is_a_refusal_part_with_its_events(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: chat_reply(rec, {"content": None, "refusal": "I can't"}))
    _, _, url = await start(nursery, upstream)
    response = (await post(url, {"model": "m", "input": "bad"})).json()
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't"}]
    events, _ = await stream_post(url, {"model": "m", "input": "bad"})
    types = [e["type"] for e in events]
    assert "response.refusal.delta" in types
    (done,) = [e for e in events if e["type"] == "response.refusal.done"]
    assert done["refusal"] == "I can't"
    (item,) = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert item["content"] == [{"type": "refusal", "refusal": "I can't"}]


async def test_url_citations_are_annotations_with_their_events(nursery: trio.Nursery) -> None:
    cite = {
        "type": "url_citation",
        "url_citation": {"url": "https://x.test", "title": "X", "start_index": 0, "end_index": 4},
    }
    upstream = FakeUpstream(
        lambda rec: chat_reply(rec, {"content": "See X.", "annotations": [cite]})
    )
    _, _, url = await start(nursery, upstream)
    expected = {
        "type": "url_citation",
        "url": "https://x.test",
        "title": "X",
        "start_index": 0,
        "end_index": 4,
    }
    response = (await post(url, {"model": "m", "input": "q"})).json()
    assert response["output"][0]["content"][0]["annotations"] == [expected]
    events, _ = await stream_post(url, {"model": "m", "input": "q"})
    (added,) = [e for e in events if e["type"] == "response.output_text.annotation.added"]
    assert added["annotation"] == expected and added["annotation_index"] == 0


async def test_reasoning_is_content_streamed_as_reasoning_events(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(
        lambda rec: chat_reply(rec, {"reasoning_content": "think", "content": "answer"})
    )
    _, _, url = await start(nursery, upstream)
    events, _ = await stream_post(url, {"model": "m", "input": "q"})
    types = [e["type"] for e in events]
    assert "response.reasoning.delta" in types and "response.reasoning.done" in types
    assert not [t for t in types if "summary" in t]
    reasoning = events[-1]["response"]["output"][0]
    assert reasoning["summary"] == []  # raw reasoning is not a summary (safe to show)
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "think"}]


async def test_output_messages_say_their_phase(nursery: trio.Nursery) -> None:
    _, tool_url = await _tool_server(nursery)

    def model(rec: Recorded) -> Reply:
        if has_tool_result(rec):
            return text_reply(rec, "final")
        call = {"id": "call_1", "type": "function", "function": {"name": "t", "arguments": "{}"}}
        return chat_reply(rec, {"content": "checking", "tool_calls": [call]}, "tool_calls")

    _, _, url = await start(nursery, FakeUpstream(model), tools={"t": {"url": tool_url}})
    response = (await post(url, {"model": "m", "input": "q"})).json()
    phases = [i.get("phase") for i in response["output"] if i["type"] == "message"]
    assert phases == ["commentary", "final_answer"]


async def test_echo_and_forwarding_of_request_parameters(nursery: trio.Nursery) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    _, _, url = await start(nursery, upstream)
    params = {
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "top_logprobs": 2,
        "prompt_cache_key": "pck",
        "safety_identifier": "user-1",
    }
    response = (
        await post(
            url,
            {
                "model": "m",
                "input": "q",
                "reasoning": {"effort": "low"},
                "text": {
                    "format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}},
                    "verbosity": "low",
                },
                "tools": [_fn("f")],
                **params,
            },
        )
    ).json()
    sent = upstream.requests[0].json()
    for key, value in params.items():
        assert response[key] == value
        assert sent[key] == value
    assert sent["logprobs"] is True and sent["verbosity"] == "low"
    assert response["reasoning"] == {"effort": "low", "summary": None}
    assert response["text"]["format"]["description"] is None
    assert response["tools"][0]["strict"] is True


async def test_an_unknown_previous_response_is_previous_response_not_found(
    nursery: trio.Nursery,
) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    r = await post(url, {"model": "m", "input": "q", "previous_response_id": "resp_nope"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id"


async def test_a_function_call_output_must_answer_a_call(nursery: trio.Nursery) -> None:
    _, _, url = await start(nursery, FakeUpstream(lambda rec: text_reply(rec)))
    r = await post(
        url,
        {
            "model": "m",
            "input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}],
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].call_id"


async def _background(url: str, http: httpx.AsyncClient) -> str:
    r = await http.post(
        url + "/v1/responses", json={"model": "m", "input": "q", "background": True}
    )
    rid: str = r.json()["id"]
    return rid


async def test_a_cursor_ahead_of_the_loop_skips_events_still_to_come(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "a b c d e f g h", chunk_delay=0.05))
    _, _, url = await start(nursery, upstream)
    async with httpx.AsyncClient(timeout=15) as http:
        rid = await _background(url, http)
        r = await http.get(f"{url}/v1/responses/{rid}?stream=true&starting_after=8")
    events, lines = sse_events(r.text)
    assert events[0]["sequence_number"] == 9
    assert [e["sequence_number"] for e in events] == list(range(9, 9 + len(events)))
    assert lines[-1] == "[DONE]"


async def test_a_cancelled_background_stream_ends_with_a_terminal_event(
    nursery: trio.Nursery,
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec, "slow " * 50, chunk_delay=0.1))
    _, _, url = await start(nursery, upstream)
    got: list[str] = []
    async with httpx.AsyncClient(timeout=15) as http:
        rid = await _background(url, http)

        async def follow() -> None:
            async with http.stream("GET", f"{url}/v1/responses/{rid}?stream=true") as r:
                await r.aread()
                got.append(r.text)

        async with trio.open_nursery() as inner:
            inner.start_soon(follow)
            await trio.sleep(0.3)
            cancelled = await http.post(f"{url}/v1/responses/{rid}/cancel")
        assert cancelled.json()["status"] == "cancelled"
    events, lines = sse_events(got[0])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["status"] == "cancelled"
    assert lines[-1] == "[DONE]"


async def test_compact_returns_a_window_a_new_response_continues_from(
    nursery: trio.Nursery,
) -> None:
    def model(rec: Recorded) -> Reply:
        last = rec.json()["messages"][-1]["content"]
        text = last if isinstance(last, str) else last[0]["text"]
        return text_reply(rec, "Summary: launch Tuesday" if "Summarise" in text else "ok")

    upstream = FakeUpstream(model)
    _, _, url = await start(nursery, upstream)
    history: Sequence[dict[str, Any]] = [
        {"role": "user", "content": "We launch on Tuesday."},
        {"role": "assistant", "content": "Noted."},
    ]
    r = await post(url, {"model": "m", "input": history}, "/v1/responses/compact")
    window = r.json()
    assert window["object"] == "response.compaction"
    assert [i["type"] for i in window["output"]] == ["compaction"]
    transcript = upstream.requests[0].json()["messages"][-1]["content"]
    assert "user: We launch on Tuesday." in transcript and "assistant: Noted." in transcript
    follow_up = await post(
        url, {"model": "m", "input": [*window["output"], {"role": "user", "content": "When?"}]}
    )
    assert follow_up.status_code == 200, follow_up.text
    sent = upstream.requests[1].json()["messages"]
    assert "Summary: launch Tuesday" in sent[0]["content"]
    bad = await post(url, {"input": "x"}, "/v1/responses/compact")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"


async def test_logprobs_are_asked_for_and_returned_when_included(nursery: trio.Nursery) -> None:
    entry = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}

    def model(rec: Recorded) -> Reply:
        return chat_reply(rec, {"content": "Hi"}, logprobs={"content": [entry]})

    upstream = FakeUpstream(model)
    _, _, url = await start(nursery, upstream)
    body = {"model": "m", "input": "q", "include": ["message.output_text.logprobs"]}
    response = (await post(url, body)).json()
    assert upstream.requests[0].json()["logprobs"] is True
    assert response["output"][0]["content"][0]["logprobs"] == [entry]
    events, _ = await stream_post(url, body)
    (delta,) = [e for e in events if e["type"] == "response.output_text.delta"]
    assert delta["logprobs"] == [entry]
    bad = await post(url, {**body, "include": ["file_search_call.results"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "include[0]"
