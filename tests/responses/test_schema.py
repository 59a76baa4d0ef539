"""Everything ``/v1/responses`` produces validates against the Open Responses OpenAPI document
(spec 2026-04-24, vendored as ``openresponses-openapi.json``, Apache-2.0, from
github.com/openresponses/openresponses) and against the official ``openai`` SDK's types.

Scenarios end to end over loopback (streams, tools, reasoning, refusals, annotations,
background, cancel, errors, incompleteness, compaction, WebSocket mode), and a property test
over the shapes a Chat upstream's answer can take, streamed or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pydantic
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.responses import CompactedResponse, Response, ResponseStreamEvent
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from onwards_trio._loop.items import ChatChunkAssembler, ChatStreamTranslator, completion_items
from tests.responses.test_open_responses import chat_reply, post, sse_events
from tests.responses.test_responses_api import has_tool_result, start, text_reply, tool_reply
from tests.support import FakeUpstream, Recorded, Reply, WebSocketClient, serve_app

_DOC = orjson.loads((Path(__file__).parent / "openresponses-openapi.json").read_bytes())
_SCHEMAS = _DOC["components"]["schemas"]
_REGISTRY: Registry[Any] = Registry().with_resource(
    "openapi.json", Resource.from_contents(_DOC, default_specification=DRAFT202012)
)
_EVENT_SCHEMAS = {
    props["type"]["enum"][0]: name
    for name, schema in _SCHEMAS.items()
    if name.endswith("StreamingEvent")
    and "enum" in (props := schema.get("properties", {})).get("type", {})
}
# The spec names raw reasoning events response.reasoning.*; the SDK spells them (same fields)
# response.reasoning_text.*.
_SDK_EVENT_NAMES = {
    "response.reasoning.delta": "response.reasoning_text.delta",
    "response.reasoning.done": "response.reasoning_text.done",
}
_SDK_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def spec_errors(instance: Any, schema_name: str) -> list[str]:
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"openapi.json#/components/schemas/{schema_name}"}, registry=_REGISTRY
    )
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def check_response(response: Any) -> None:
    assert spec_errors(response, "ResponseResource") == []
    Response.model_validate(response)


def check_event(event: Any) -> None:
    assert event["type"] in _EVENT_SCHEMAS, f"not a spec event: {event['type']}"
    assert spec_errors(event, _EVENT_SCHEMAS[event["type"]]) == []
    parsed = _SDK_EVENT.validate_python(
        {**event, "type": _SDK_EVENT_NAMES.get(event["type"], event["type"])}
    )
    assert parsed.sequence_number == event["sequence_number"]
    if "response" in event:
        check_response(event["response"])


def check_error_body(body: Any) -> None:
    """An HTTP error answer: the OpenAI envelope around the spec's error payload."""
    assert set(body) == {"error"}
    assert spec_errors(body["error"], "ErrorPayload") == []


def check_sse(raw: str) -> list[dict[str, Any]]:
    events, lines = sse_events(raw)
    assert lines[-1] == "[DONE]"
    for event in events:
        check_event(event)
    return events


# -- scenarios over HTTP --------------------------------------------------------------------------


def _model(rec: Recorded) -> Reply:
    """A model whose answer depends on the prompt's first word (set by the scenario)."""
    messages = rec.json()["messages"]
    first = messages[0]["content"]
    prompt = first if isinstance(first, str) else first[0]["text"]
    if has_tool_result(rec):
        return text_reply(rec, "the tool said so")
    if prompt == "tool":
        return tool_reply(rec, "lookup", '{"q": "x"}')
    if prompt == "client":
        return tool_reply(rec, "client_fn", "{}")
    if prompt == "reason":
        return chat_reply(rec, {"reasoning_content": "hmm", "content": "yes"})
    if prompt == "refuse":
        return chat_reply(rec, {"content": None, "refusal": "no"})
    if prompt == "cite":
        cite = {
            "type": "url_citation",
            "url_citation": {"url": "u", "title": "t", "start_index": 0, "end_index": 1},
        }
        return chat_reply(rec, {"content": "A.", "annotations": [cite]})
    if prompt == "long":
        return chat_reply(rec, {"content": "cut"}, "length")
    if prompt == "broken":
        return Reply(status=500, body=b'{"error": {"message": "down"}}')
    if prompt == "slow":
        return text_reply(rec, "slow " * 40, chunk_delay=0.05)
    return text_reply(rec)


SCENARIOS = ["plain", "tool", "client", "reason", "refuse", "cite", "long"]


@pytest.fixture
async def gateway_url(nursery: trio.Nursery) -> str:
    tool = await serve_app(nursery, FakeUpstream(Reply(body=b'{"ok": 1}')))
    _, _, url = await start(nursery, FakeUpstream(_model), tools={"lookup": {"url": tool}})
    return url


def _body(prompt: str, **extra: Any) -> dict[str, Any]:
    client_fn = {"type": "function", "name": "client_fn", "parameters": {"type": "object"}}
    return {"model": "m", "input": prompt, "tools": [client_fn], **extra}


@pytest.mark.parametrize("prompt", SCENARIOS)
async def test_responses_and_streams_validate(gateway_url: str, prompt: str) -> None:
    r = await post(gateway_url, _body(prompt))
    assert r.status_code == 200
    check_response(r.json())
    async with httpx.AsyncClient(timeout=15) as http:
        streamed = await http.post(gateway_url + "/v1/responses", json=_body(prompt, stream=True))
    events = check_sse(streamed.text)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


async def test_background_cancel_and_retrieval_validate(gateway_url: str) -> None:
    async with httpx.AsyncClient(timeout=15) as http:
        queued = (
            await http.post(gateway_url + "/v1/responses", json=_body("plain", background=True))
        ).json()
        check_response(queued)
        streamed = await http.get(f"{gateway_url}/v1/responses/{queued['id']}?stream=true")
        assert [e["type"] for e in check_sse(streamed.text)][:2] == [
            "response.created",
            "response.queued",
        ]
        check_response((await http.get(f"{gateway_url}/v1/responses/{queued['id']}")).json())
        slow = (
            await http.post(gateway_url + "/v1/responses", json=_body("slow", background=True))
        ).json()
        cancelled = (await http.post(f"{gateway_url}/v1/responses/{slow['id']}/cancel")).json()
        assert cancelled["status"] == "cancelled"
        check_response(cancelled)
        followed = await http.get(f"{gateway_url}/v1/responses/{slow['id']}?stream=true")
        assert check_sse(followed.text)[-1]["response"]["status"] == "cancelled"


async def test_errors_validate(gateway_url: str) -> None:
    bad = await post(gateway_url, {"model": "m", "input": 3})
    assert bad.status_code == 400
    check_error_body(bad.json())
    missing = await post(gateway_url, {"model": "m", "input": "x", "previous_response_id": "r"})
    check_error_body(missing.json())
    assert missing.json()["error"]["code"] == "previous_response_not_found"
    failed = await post(gateway_url, _body("broken"))
    assert failed.status_code == 500
    async with httpx.AsyncClient(timeout=15) as http:
        streamed = await http.post(gateway_url + "/v1/responses", json=_body("broken", stream=True))
    events = check_sse(streamed.text)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"


async def test_compaction_validates(gateway_url: str) -> None:
    r = await post(gateway_url, {"model": "m", "input": "plain"}, "/v1/responses/compact")
    assert spec_errors(r.json(), "CompactResource") == []
    CompactedResponse.model_validate(r.json())


async def test_websocket_messages_validate(gateway_url: str) -> None:
    client = await WebSocketClient.connect(gateway_url)
    with trio.fail_after(15):
        for prompt in ("plain", "tool", "reason"):
            for event in await client.turn({"type": "response.create", **_body(prompt)}):
                check_event(event)
        (error,) = await client.turn(
            {"type": "response.create", **_body("plain"), "previous_response_id": "r"}
        )
    assert spec_errors(error, "WebSocketErrorEvent") == []
    await client.aclose()


# -- every shape of upstream answer ------------------------------------------------------------


def _messages() -> st.SearchStrategy[dict[str, Any]]:
    text = st.text(min_size=1, max_size=12)
    call = st.fixed_dictionaries(
        {
            "id": st.just("call_1"),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": st.just("f"), "arguments": st.just("{}")}),
        }
    )
    cite = st.just(
        {
            "type": "url_citation",
            "url_citation": {"url": "u", "title": "t", "start_index": 0, "end_index": 1},
        }
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "content": text,
            "refusal": text,
            "reasoning_content": text,
            "annotations": st.lists(cite, min_size=1, max_size=2),
            "tool_calls": st.lists(call, min_size=1, max_size=1),
        },
    )


_ORDER = ["reasoning_content", "content", "refusal", "annotations", "tool_calls"]


def _chunks(message: dict[str, Any], finish: str) -> Iterator[dict[str, Any]]:
    """One chunk per field, in the order models produce them (reasoning first)."""
    for key in sorted(message, key=_ORDER.index):
        value = message[key]
        delta = (
            {"tool_calls": [{**c, "index": n} for n, c in enumerate(value)]}
            if key == "tool_calls"
            else {key: value}
        )
        yield {"choices": [{"index": 0, "delta": delta}]}
    yield {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}


@settings(max_examples=60, deadline=None)
@given(_messages(), st.sampled_from(["stop", "length", "tool_calls"]), st.booleans())
def test_every_upstream_answer_gives_valid_items_and_events(
    message: dict[str, Any], finish: str, streamed: bool
) -> None:
    translator = ChatStreamTranslator()
    translator.begin_call("step")
    events: list[tuple[str, dict[str, Any]]] = []
    if streamed:
        assembler = ChatChunkAssembler()
        for chunk in _chunks(message, finish):
            assembler.feed(chunk)
            events += translator.feed(chunk)
        events += translator.end_call()
        completion = assembler.result("step")
    else:
        completion = {
            "choices": [
                {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
            ]
        }
        events += translator.message(completion)
    for n, (kind, data) in enumerate(events):
        check_event({"type": kind, **data, "sequence_number": n})
    for item in completion_items(completion, "step"):
        assert spec_errors(item, "ItemField") == []
    done = [d["item"] for k, d in events if k == "response.output_item.done"]
    assert done == completion_items(completion, "step")
