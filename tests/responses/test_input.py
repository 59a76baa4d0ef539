"""Responses request validation and Responses → Chat conversion (reference §1.20.2, §3.X)."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._errors import HTTPError
from onwards_trio._loop.transition import LOOP_CONTROL
from onwards_trio._responses.input import (
    assign_item_ids,
    check_call_ids,
    compaction_item,
    convert_tool_choice,
    items_to_messages,
    normalize_input,
    parse_request,
    resolve_references,
    resolve_server_tools,
    text_format_to_response_format,
    to_chat_request,
)


@attrs.frozen
class Tool:
    name: str
    description: str = ""
    parameters: Any = None
    strict: bool = False


def chat(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return to_chat_request(parse_request(body), **kw)


def error_of(body: Any) -> dict[str, Any]:
    with pytest.raises(HTTPError) as info:
        parse_request(body)
    assert info.value.status == 400
    err: dict[str, Any] = orjson.loads(info.value.body)["error"]
    assert err["type"] == "invalid_request_error"
    return err


# -- conversion (reference §3.X) ----------------------------------------------------------------


def test_input_text_to_messages() -> None:  # 306
    assert chat({"model": "m", "input": "Hello"})["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]}
    ]


def test_items_to_messages_roles() -> None:  # 307
    messages = chat(
        {
            "model": "m",
            "input": [
                {"type": "message", "role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "call_123", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_123", "output": "sunny"},
            ],
        }
    )["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"] == [
        {"id": "call_123", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    ]
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_123"}


def test_function_call_joins_previous_assistant_message() -> None:
    messages = items_to_messages(
        normalize_input(
            [
                {"role": "assistant", "content": "let me check"},
                {"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "g", "arguments": "{}"},
            ]
        )
    )
    assert len(messages) == 1
    assert messages[0]["content"] == "let me check"
    assert [c["id"] for c in messages[0]["tool_calls"]] == ["a", "b"]


def test_adapter_with_instructions() -> None:  # 296
    assert chat(
        {"model": "m", "instructions": "You are a helpful math tutor.", "input": "What's 2 + 2?"}
    )["messages"] == [
        {"role": "system", "content": "You are a helpful math tutor."},
        {"role": "user", "content": [{"type": "text", "text": "What's 2 + 2?"}]},
    ]


def test_adapter_simple_request_copies_sampling() -> None:  # 310
    out = chat(
        {
            "model": "gpt-4o",
            "instructions": "sys",
            "input": "hi",
            "temperature": 0.7,
            "max_output_tokens": 100,
            "top_p": 0.5,
            "stop": ["x"],
            "user": "u1",
        }
    )
    assert out["model"] == "gpt-4o"
    assert len(out["messages"]) == 2
    assert (out["temperature"], out["max_tokens"], out["top_p"]) == (0.7, 100, 0.5)
    assert (out["stop"], out["user"]) == (["x"], "u1")
    assert "max_output_tokens" not in out


def test_stream_options_set_when_streaming() -> None:  # 312
    out = chat({"model": "m", "input": "hi", "stream": True})
    assert out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}


def test_stream_options_absent_when_not_streaming() -> None:  # 313
    out = chat({"model": "m", "input": "hi"})
    assert "stream" not in out
    assert "stream_options" not in out


def test_stream_override_wins() -> None:
    out = chat({"model": "m", "input": "hi"}, stream=True)
    assert out["stream_options"] == {"include_usage": True}


def test_not_forwarded_fields() -> None:
    out = chat(
        {
            "model": "m",
            "input": "hi",
            "metadata": {"a": "b"},
            "store": True,
            "truncation": "auto",
            "background": False,
            "extra_field": 1,
        }
    )
    assert set(out) == {"model", "messages"}


def test_sampling_and_caching_fields_are_forwarded() -> None:
    out = chat(
        {
            "model": "m",
            "input": "hi",
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "top_logprobs": 3,
            "prompt_cache_key": "k",
            "safety_identifier": "u1",
            "service_tier": "flex",
            "text": {"verbosity": "low"},
        }
    )
    assert out["presence_penalty"] == 0.5 and out["frequency_penalty"] == -0.5
    assert out["logprobs"] is True and out["top_logprobs"] == 3
    assert out["prompt_cache_key"] == "k" and out["safety_identifier"] == "u1"
    assert out["service_tier"] == "flex" and out["verbosity"] == "low"


def test_allowed_tools_sends_only_the_allowed_tools_and_their_mode() -> None:
    def fn(name: str) -> dict[str, Any]:
        return {"type": "function", "name": name, "parameters": {"type": "object"}}

    out = chat(
        {
            "model": "m",
            "input": "hi",
            "tools": [fn("a"), fn("b")],
            "tool_choice": {
                "type": "allowed_tools",
                "mode": "required",
                "tools": [{"type": "function", "name": "b"}],
            },
        }
    )
    assert [t["function"]["name"] for t in out["tools"]] == ["b"]
    assert out["tool_choice"] == "required"
    assert out[LOOP_CONTROL] == {"allowed_tools": ["b"]}


def test_item_reference_is_replaced_by_the_item_it_names() -> None:
    history = [
        {"type": "message", "id": "msg_1", "role": "user", "content": "first"},
        {"type": "message", "id": "msg_2", "role": "assistant", "content": "second"},
    ]
    request = parse_request({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]})
    items = resolve_references(request.input_items, history)
    assert items == [history[0]]
    with pytest.raises(HTTPError) as info:
        resolve_references(
            parse_request(
                {"model": "m", "input": [{"type": "item_reference", "id": "nope"}]}
            ).input_items,
            history,
        )
    assert info.value.status == 400 and b"input[0].id" in info.value.body


def test_an_orphan_function_call_output_is_refused() -> None:
    items = [{"type": "function_call_output", "call_id": "call_x", "output": "o"}]
    with pytest.raises(HTTPError) as info:
        check_call_ids(items, [])
    assert b"input[0].call_id" in info.value.body
    check_call_ids(items, [{"type": "function_call", "call_id": "call_x"}])


def test_a_compaction_item_round_trips_as_a_summary_message() -> None:
    item = compaction_item("we chose Tuesday")
    request = parse_request({"model": "m", "input": [item]})
    (message,) = to_chat_request(request)["messages"]
    assert message["role"] == "user" and "we chose Tuesday" in message["content"]
    with pytest.raises(HTTPError):
        parse_request(
            {"model": "m", "input": [{"type": "compaction", "encrypted_content": "forged"}]}
        )


def test_image_parts_convert_and_file_id_images_drop() -> None:
    out = chat(
        {
            "model": "m",
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is this"},
                        {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                        {"type": "input_image", "file_id": "file_1"},
                    ],
                }
            ],
        }
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
    ]


def test_input_file_with_data_becomes_chat_file_part() -> None:
    part = {"type": "input_file", "file_data": "data:application/pdf;base64,AA", "filename": "a"}
    out = chat({"model": "m", "input": [{"role": "user", "content": [part]}]})
    assert out["messages"][0]["content"] == [
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,AA", "filename": "a"}}
    ]


def test_message_without_surviving_parts_has_empty_content() -> None:
    out = chat(
        {
            "model": "m",
            "input": [{"role": "user", "content": [{"type": "input_file", "file_url": "u"}]}],
        }
    )
    assert out["messages"][0]["content"] == ""


def test_assistant_text_parts_become_a_string() -> None:
    out = chat(
        {
            "model": "m",
            "input": [
                {"role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                {"role": "user", "content": "b"},
            ],
        }
    )
    assert out["messages"][0] == {"role": "assistant", "content": "a"}


def test_reasoning_and_unknown_items_are_skipped() -> None:
    out = chat(
        {
            "model": "m",
            "input": [
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hmm"}]},
                {"type": "web_search", "query": "news"},
                {"role": "user", "content": "q"},
            ],
        }
    )
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "q"}]}]


def test_item_without_type_is_a_message() -> None:  # fix of §5.3.17
    items = normalize_input([{"role": "developer", "content": "be brief"}])
    assert items[0]["type"] == "message"
    assert items_to_messages(items) == [{"role": "developer", "content": "be brief"}]


def test_function_call_output_parts_are_joined_as_text() -> None:
    out = items_to_messages(
        normalize_input(
            [
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [
                        {"type": "input_text", "text": "a"},
                        {"type": "input_text", "text": "b"},
                    ],
                }
            ]
        )
    )
    assert out == [{"role": "tool", "content": "ab", "tool_call_id": "c"}]


def test_history_comes_after_instructions_and_before_input() -> None:  # fix of §5.3.21
    history = normalize_input(
        [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "answer"},
        ]
    )
    out = chat({"model": "m", "instructions": "sys", "input": "second"}, history=history)
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("system", "sys"),
        ("user", [{"type": "text", "text": "first"}]),
        ("assistant", "answer"),
        ("user", [{"type": "text", "text": "second"}]),
    ]


# -- tools ------------------------------------------------------------------------------------


def test_function_tool_gets_closed_parameters_and_strict_default() -> None:
    out = chat(
        {
            "model": "m",
            "input": "hi",
            "tools": [
                {
                    "type": "function",
                    "name": "get_weather",
                    "description": "d",
                    "parameters": {"type": "object", "properties": {}},
                }
            ],
        }
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "d",
                "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
                "strict": True,
            },
        }
    ]


def test_non_function_client_tools_are_dropped() -> None:
    out = chat({"model": "m", "input": "hi", "tools": [{"type": "web_search_preview"}]})
    assert "tools" not in out


def test_tool_choice_and_parallel_calls_only_with_tools() -> None:
    body = {"model": "m", "input": "hi", "tool_choice": "auto", "parallel_tool_calls": False}
    assert "tool_choice" not in chat(body)
    with_tools = chat(
        {**body, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}
    )
    assert with_tools["tool_choice"] == "auto"
    assert with_tools["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("required", "required"),
        ({"type": "function", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
        ({"type": "web_search_preview"}, "auto"),
    ],
)
def test_convert_tool_choice(choice: Any, expected: Any) -> None:
    assert convert_tool_choice(choice) == expected


def test_server_tools_are_appended_as_functions() -> None:
    req = parse_request({"model": "m", "input": "hi"})
    tools = resolve_server_tools(req, [Tool("calc", "adds", {"type": "object"}, True)])
    out = to_chat_request(req, server_tools=tools)
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "calc",
                "description": "adds",
                "parameters": {"type": "object", "additionalProperties": False},
                "strict": True,
            },
        }
    ]


def test_hosted_tool_request_offers_exactly_those() -> None:
    req = parse_request(
        {"model": "m", "input": "hi", "tools": [{"type": "hosted_tool", "name": "b"}]}
    )
    chosen = resolve_server_tools(req, [Tool("a"), Tool("b")])
    assert [t.name for t in chosen] == ["b"]
    assert req.echoed_tools == []


def test_unknown_hosted_tool_is_400_listing_available() -> None:
    req = parse_request(
        {"model": "m", "input": "hi", "tools": [{"type": "hosted_tool", "name": "zzz"}]}
    )
    with pytest.raises(HTTPError) as info:
        resolve_server_tools(req, [Tool("b"), Tool("a")])
    message = orjson.loads(info.value.body)["error"]["message"]
    assert message == "Unknown hosted tool: 'zzz'. Available tools: [a, b]"


def test_duplicate_tool_name_returns_400() -> None:  # 299
    req = parse_request(
        {
            "model": "m",
            "input": "hi",
            "tools": [
                {"type": "function", "name": "get_weather", "parameters": {}},
                {"type": "hosted_tool", "name": "get_weather"},
            ],
        }
    )
    with pytest.raises(HTTPError) as info:
        resolve_server_tools(req, [Tool("get_weather")])
    assert info.value.status == 400
    assert "get_weather" in orjson.loads(info.value.body)["error"]["message"]


def test_implicit_offer_skips_tools_the_client_defines() -> None:
    req = parse_request({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "a"}]})
    assert [t.name for t in resolve_server_tools(req, [Tool("a"), Tool("b")])] == ["b"]


# -- text.format, reasoning ----------------------------------------------------------------------


def test_json_schema_format_becomes_response_format() -> None:
    text = {
        "format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}
    }
    assert chat({"model": "m", "input": "hi", "text": text})["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }


def test_json_object_and_text_formats() -> None:
    assert text_format_to_response_format({"format": {"type": "json_object"}}) == {
        "type": "json_object"
    }
    assert text_format_to_response_format({"format": {"type": "text"}}) is None


def test_reasoning_effort_is_forwarded() -> None:
    out = chat({"model": "m", "input": "hi", "reasoning": {"effort": "low", "summary": None}})
    assert out["reasoning_effort"] == "low"


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": "m"}, "input"),
        ({"model": "m", "input": 3}, "input"),
        ({"model": "m", "input": [1]}, "input[0]"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        ({"model": "m", "input": [{"role": "user", "content": 1}]}, "input[0].content"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "audio"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
        ),
        ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "input": "x", "temperature": "hot"}, "temperature"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
        (
            {
                "model": "m",
                "input": "x",
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "tools[0].name",
        ),
        ({"model": "m", "input": "x", "tool_choice": "sometimes"}, "tool_choice"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"model": "m", "input": "x", "metadata": {"k": 1}}, "metadata.k"),
        ({"model": "m", "input": "x", "background": True, "store": False}, "store"),
        ({"model": "m", "input": "x", "stop": [1]}, "stop"),
    ],
)
def test_invalid_request_names_the_field(body: Any, param: str) -> None:
    err = error_of(body)
    assert err["param"] == param
    assert err["code"] == "bad_request"


def test_body_must_be_an_object() -> None:
    assert error_of([1])["param"] == "body"


def test_input_may_be_omitted_with_previous_response() -> None:
    req = parse_request({"model": "m", "previous_response_id": "resp_1"})
    assert req.input_items == []


def test_store_defaults_to_true() -> None:
    assert parse_request({"model": "m", "input": "x"}).store is True


def test_assign_item_ids_keeps_client_ids_and_adds_missing() -> None:
    items = assign_item_ids(
        normalize_input(
            [{"id": "msg_mine", "role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )
    )
    assert items[0]["id"] == "msg_mine"
    assert items[1]["id"].startswith("msg_")
    assert items[1]["status"] == "completed"
    assert items[1]["content"] == [{"type": "input_text", "text": "b"}]


# -- properties -----------------------------------------------------------------------------------

_text = st.text(max_size=20)
_message = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["user", "assistant", "system", "developer"]),
    _text | st.lists(st.builds(lambda t: {"type": "input_text", "text": t}, _text), max_size=3),
)
_call = st.builds(
    lambda cid, name: {"type": "function_call", "call_id": cid, "name": name, "arguments": "{}"},
    st.text(min_size=1, max_size=5),
    st.text(min_size=1, max_size=5),
)
_output = st.builds(
    lambda cid, out: {"type": "function_call_output", "call_id": cid, "output": out},
    st.text(min_size=1, max_size=5),
    _text,
)


@given(st.lists(_message | _call | _output, max_size=12))
def test_any_valid_items_convert_with_one_tool_message_per_output(items: list[Any]) -> None:
    messages = items_to_messages(normalize_input(items))
    outputs = [i for i in items if i.get("type") == "function_call_output"]
    calls = [i for i in items if i.get("type") == "function_call"]
    tool_messages = [m for m in messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == [o["call_id"] for o in outputs]
    converted_calls = [c["id"] for m in messages for c in m.get("tool_calls", [])]
    assert converted_calls == [c["call_id"] for c in calls]


def test_generated_item_ids_are_unique() -> None:  # cf. reference 314
    items = assign_item_ids(normalize_input([{"role": "user", "content": "x"}] * 100))
    assert len({i["id"] for i in items}) == 100
