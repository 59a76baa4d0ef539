"""The streamed translation agrees with the whole-body one, however the upstream's bytes are
cut: a Chat completion, streamed as chunks of arbitrary sizes and then split at arbitrary
byte offsets, reassembles (with the official SDK's own accumulator) into the same message as
the non-streamed translation of that completion."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import orjson
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._anthropic.response import to_message
from onwards_trio._anthropic.stream import StreamTranslator
from onwards_trio._transport.sse import SSEDecoder

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
ARGS = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=12), st.booleans(), st.none()),
    max_size=4,
)
STOPS = ("STOP", "END")


@st.composite
def completions(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(TEXT) or None}
    reasoning = draw(TEXT)
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = draw(st.lists(st.tuples(st.text(min_size=1, max_size=10), ARGS), max_size=3))
    if calls:
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": orjson.dumps(args).decode()},
            }
            for i, (name, args) in enumerate(calls)
        ]
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    matched = draw(st.sampled_from([None, "STOP", "other"]))
    if matched is not None:
        choice["stop_reason"] = matched
    prompt = draw(st.integers(0, 10_000))
    cached = draw(st.integers(0, prompt))
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": draw(st.integers(0, 5000)),
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice], "usage": usage}


def _pieces(draw: Callable[[st.SearchStrategy[Any]], Any], whole: Any, most: int = 4) -> list[Any]:
    """``whole`` (a string or bytes) cut at up to ``most`` arbitrary places."""
    cuts = draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=most))
    bounds = [0, *sorted(c for c in cuts if c < len(whole)), len(whole)]
    return [whole[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _chunk(delta: dict[str, Any], **extra: Any) -> bytes:
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", **extra}
    payload.setdefault("choices", [{"index": 0, "delta": delta, "finish_reason": None}])
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@st.composite
def streams(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """A completion and its upstream stream (content pieces of arbitrary sizes)."""
    completion = draw(completions())
    choice = completion["choices"][0]
    message = choice["message"]
    out = [_chunk({"role": "assistant"})]
    for piece in _pieces(draw, message.get("reasoning_content") or ""):
        out.append(_chunk({"reasoning_content": piece}))
    for piece in _pieces(draw, message.get("content") or ""):
        out.append(_chunk({"content": piece}))
    for i, call in enumerate(message.get("tool_calls") or ()):
        head = {"index": i, "id": call["id"], "type": "function"}
        out.append(
            _chunk({"tool_calls": [{**head, "function": {"name": call["function"]["name"]}}]})
        )
        for piece in _pieces(draw, call["function"]["arguments"]):
            out.append(_chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    if "stop_reason" in choice:
        last["stop_reason"] = choice["stop_reason"]
    out.append(_chunk({}, choices=[last]))
    out.append(_chunk({}, choices=[], usage=completion["usage"]))
    out.append(b"data: [DONE]\n\n")
    return completion, b"".join(out)


def _reassemble(body: bytes) -> dict[str, Any]:
    snapshot: Any = None
    json_bufs: dict[int, bytes] = {}
    names = []
    decoder = SSEDecoder()
    for event in [*decoder.feed(body), *decoder.close()]:
        names.append(event.event)
        if event.event == "ping":
            continue
        raw = orjson.loads(event.data)
        assert raw["type"] == event.event
        parsed: RawMessageStreamEvent = raw
        snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=json_bufs)
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    message: dict[str, Any] = snapshot.to_dict()
    return message


@given(streams(), st.data())
def test_any_chunking_reassembles_to_the_whole_body_translation(
    case: tuple[dict[str, Any], bytes], data: st.DataObject
) -> None:
    completion, body = case
    translator = StreamTranslator(message_id="msg_1", model="alias", stop_sequences=STOPS)
    out = b"".join(translator.feed(piece) for piece in _pieces(data.draw, body, most=12))
    out += translator.close()
    streamed = _reassemble(out)
    whole = to_message(completion, message_id="msg_1", model="alias", stop_sequences=STOPS)
    for key in ("id", "model", "role", "content", "stop_reason", "stop_sequence"):
        assert streamed[key] == whole[key], key
    for key, value in whole["usage"].items():
        assert streamed["usage"][key] == value, key
