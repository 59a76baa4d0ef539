"""Strict-mode schemas and coercion, unit level (reference 3.R-3.U, 3.Y; SPEC §2.4)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from onwards_trio._errors import HTTPError
from onwards_trio._proxy.strict import (
    chat_chunk_coercer,
    chat_coercer,
    completion_chunk_coercer,
    completion_coercer,
    embeddings_coercer,
    response_coercer,
    response_event_coercer,
    standard_error,
    strict_error_body,
    strict_filter,
    validate_request,
)
from onwards_trio._proxy.strict_schemas import (
    CHAT_CHUNK,
    CHAT_COMPLETION,
    CHAT_REQUEST,
    COMPLETIONS_REQUEST,
    EMBEDDINGS_REQUEST,
    RESPONSE,
    RESPONSE_EVENT,
    RESPONSES_REQUEST,
    SchemaError,
)

JSON = [(b"content-type", b"application/json")]


def fixed(prefix: str = "chatcmpl-") -> Any:
    return lambda: prefix + "fixed"


def fails(schema: Any, value: Any) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        schema(value)
    return info.value


# --- errors -------------------------------------------------------------------------------


def test_strict_error_body_matches_openai_format() -> None:
    assert orjson.loads(strict_error_body(400)) == {
        "error": {
            "message": "Invalid request",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
    ],
)
def test_error_types_match_openai_conventions(status: int, type_: str) -> None:
    assert standard_error(status)[0] == type_


def test_unlisted_status_gets_the_generic_message() -> None:
    assert standard_error(418) == ("api_error", "An error occurred")


@pytest.mark.parametrize(
    ("status", "message"),
    [(413, "Request too large"), (422, "Unprocessable request"), (504, "Gateway timeout")],
)
def test_newer_explicit_rows(status: int, message: str) -> None:
    assert standard_error(status)[1] == message


# --- request validation ---------------------------------------------------------------------


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_simple_chat_request_parses() -> None:
    assert CHAT_REQUEST(chat()) == chat()


def test_multimodal_content_parts_parse() -> None:
    msg = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "http://x"}},
        ],
    }
    out = CHAT_REQUEST(chat(messages=[msg]))
    assert len(out["messages"][0]["content"]) == 2


def test_audio_and_file_parts_are_accepted() -> None:
    msg = {
        "role": "user",
        "content": [
            {"type": "input_audio", "input_audio": {"data": "AAA=", "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-1"}},
        ],
    }
    assert CHAT_REQUEST(chat(messages=[msg]))["messages"][0] == msg


def test_unknown_part_type_names_the_field() -> None:
    msg = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "video"}]}
    exc = fails(CHAT_REQUEST, chat(messages=[msg]))
    assert exc.path == "messages[0].content[1].type"


def test_chat_request_with_tools_parses() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert CHAT_REQUEST(chat(tools=[tool]))["tools"] == [tool]


def test_missing_model_names_model() -> None:
    assert fails(CHAT_REQUEST, {"messages": []}).path == "model"


def test_wrong_type_names_the_nested_field() -> None:
    exc = fails(CHAT_REQUEST, chat(messages=[{"role": 5, "content": "x"}]))
    assert (exc.path, exc.reason) == ("messages[0].role", "expected a string")


def test_chat_unknown_top_level_fields_are_kept() -> None:
    assert CHAT_REQUEST(chat(reasoning_effort="high"))["reasoning_effort"] == "high"


def test_explicit_nulls_of_modelled_fields_are_dropped() -> None:
    assert "temperature" not in CHAT_REQUEST(chat(temperature=None))


def test_boolean_is_not_an_integer() -> None:
    assert fails(CHAT_REQUEST, chat(max_tokens=True)).path == "max_tokens"


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_shapes_are_accepted(prompt: Any) -> None:
    assert COMPLETIONS_REQUEST({"model": "m", "prompt": prompt})["prompt"] == prompt


@pytest.mark.parametrize("prompt", [[1, "hello"], [1.5, 2.5], {"a": 1}])
def test_completion_prompt_mixes_and_floats_are_rejected(prompt: Any) -> None:
    assert fails(COMPLETIONS_REQUEST, {"model": "m", "prompt": prompt}).path.startswith("prompt")


def test_completions_accept_every_modelled_field() -> None:
    body = {
        "model": "m",
        "prompt": "p",
        "suffix": "s",
        "max_tokens": 100,
        "temperature": 0.7,
        "top_p": 1,
        "n": 1,
        "stream": False,
        "logprobs": 3,
        "echo": True,
        "stop": ["\n"],
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "best_of": 3,
        "logit_bias": {},
        "user": "u",
        "seed": 42,
        "stream_options": {"include_usage": True},
    }
    assert COMPLETIONS_REQUEST(body) == body


def test_completions_drop_unknown_fields() -> None:
    assert "custom" not in COMPLETIONS_REQUEST({"model": "m", "custom": 1})


def test_completions_missing_prompt_is_fine() -> None:
    assert COMPLETIONS_REQUEST({"model": "m"}) == {"model": "m"}


@pytest.mark.parametrize("inp", ["x", ["a", "b"], [[1, 2]], [1, 2]])
def test_embedding_inputs(inp: Any) -> None:
    assert EMBEDDINGS_REQUEST({"model": "m", "input": inp})["input"] == inp


def test_embedding_options() -> None:
    body = {"model": "m", "input": "x", "encoding_format": "float", "dimensions": 256}
    assert EMBEDDINGS_REQUEST(body) == body


def test_embedding_encoding_format_is_checked() -> None:
    exc = fails(EMBEDDINGS_REQUEST, {"model": "m", "input": "x", "encoding_format": "hex"})
    assert exc.path == "encoding_format"


def resp(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "input": "hello", **extra}


def test_responses_string_input() -> None:
    assert RESPONSES_REQUEST(resp())["input"] == "hello"


def test_responses_items_parse() -> None:
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ]
    assert RESPONSES_REQUEST(resp(input=items))["input"] == items


def test_responses_item_without_type_is_a_message() -> None:
    out = RESPONSES_REQUEST(resp(input=[{"role": "user", "content": "hi"}]))
    assert out["input"][0]["type"] == "message"


def test_responses_omitted_item_fields_are_not_injected() -> None:
    item = RESPONSES_REQUEST(resp(input=[{"type": "message", "role": "user", "content": "x"}]))
    assert "id" not in item["input"][0] and "status" not in item["input"][0]


def test_responses_unknown_item_types_are_preserved() -> None:
    item = {"type": "web_search", "query": "latest news", "max_results": 10}
    assert RESPONSES_REQUEST(resp(input=[item]))["input"] == [item]


def test_responses_previous_response_id_is_parsed() -> None:
    assert RESPONSES_REQUEST(resp(previous_response_id="resp_1"))["previous_response_id"]


def test_function_tool_strict_defaults_to_true() -> None:
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {}}
    assert RESPONSES_REQUEST(resp(tools=[tool]))["tools"][0]["strict"] is True


def test_nested_chat_style_tool_is_rejected() -> None:
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}
    assert fails(RESPONSES_REQUEST, resp(tools=[tool])).path == "tools[0].name"


@pytest.mark.parametrize("missing", ["name", "description", "parameters"])
def test_function_tool_missing_field_is_rejected(missing: str) -> None:
    tool = {
        "type": "function",
        "name": "f",
        "description": "d",
        "parameters": {"type": "object", "properties": {}},
    }
    del tool[missing]
    assert fails(RESPONSES_REQUEST, resp(tools=[tool])).path == f"tools[0].{missing}"


def test_responses_request_missing_input_is_rejected() -> None:
    assert fails(RESPONSES_REQUEST, {"model": "m"}).path == "input"


def test_responses_reasoning_must_be_an_object() -> None:
    assert fails(RESPONSES_REQUEST, resp(reasoning="high")).path == "reasoning"


def test_responses_reasoning_inner_nulls_are_dropped() -> None:
    out = RESPONSES_REQUEST(resp(reasoning={"effort": "low", "summary": None}))
    assert out["reasoning"] == {"effort": "low"}


def test_validate_request_rejects_wrong_content_type_with_415() -> None:
    with pytest.raises(HTTPError) as info:
        validate_request("/v1/chat/completions", [(b"content-type", b"text/plain")], b"{}")
    assert info.value.status == 415


def test_validate_request_accepts_json_with_parameters() -> None:
    headers = [(b"content-type", b"Application/JSON; charset=utf-8")]
    assert validate_request("/v1/embeddings", headers, orjson.dumps({"model": "m", "input": "x"}))


def test_validate_request_malformed_json_is_400() -> None:
    with pytest.raises(HTTPError) as info:
        validate_request("/v1/chat/completions", JSON, b"{nope")
    assert info.value.status == 400
    assert orjson.loads(info.value.body)["error"]["message"].startswith("Malformed JSON")


def test_validate_request_schema_error_is_422_naming_the_field() -> None:
    with pytest.raises(HTTPError) as info:
        validate_request("/v1/completions", JSON, b'{"prompt": "Say hello"}')
    assert info.value.status == 422
    err = orjson.loads(info.value.body)["error"]
    assert err["param"] == "model"
    assert "'model'" in err["message"]


def test_validate_request_scrubs_client_ids() -> None:
    body = orjson.dumps(chat(id="chatcmpl-forged", response_id="resp_x", completion_id="c"))
    out = validate_request("/v1/chat/completions", JSON, body)
    assert not {"id", "response_id", "completion_id"} & set(out)


def test_validate_request_closes_function_tool_parameters() -> None:
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}}
    out = validate_request("/v1/responses", JSON, orjson.dumps(resp(tools=[tool])))
    assert out["tools"][0]["parameters"]["additionalProperties"] is False


# --- response coercion ----------------------------------------------------------------------

COMPLETION_BODY = {
    "id": "chatcmpl-123",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4-turbo-2024-04-09",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "provider_note": "x"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 0, "video_tokens": 9},
    },
    "provider": "p",
    "cost": 0.1,
    "internal_id": "i",
}


def test_chat_unknown_fields_are_removed_and_model_rewritten() -> None:
    out = chat_coercer("gpt-4", fixed())(orjson.loads(orjson.dumps(COMPLETION_BODY)))
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["model"] == "gpt-4" and out["id"] == "chatcmpl-123"


def test_chat_message_and_usage_details_are_closed_too() -> None:
    out = chat_coercer("gpt-4", fixed())(orjson.loads(orjson.dumps(COMPLETION_BODY)))
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_chat_backfills_missing_noncritical_fields() -> None:
    out = chat_coercer("gpt-4", fixed())({"choices": [{"message": {"content": "Hello"}}]})
    assert out == {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
    }


def test_chat_backfills_choice_indexes_from_position() -> None:
    body = {"choices": [{"message": {"content": "a"}}, {"message": {"content": "b"}}]}
    out = chat_coercer("gpt-4", fixed())(body)
    assert [c["index"] for c in out["choices"]] == [0, 1]


def test_chat_without_choices_fails() -> None:
    with pytest.raises(SchemaError):
        chat_coercer("gpt-4", fixed())({"id": "x", "model": "m"})


def test_chat_keeps_stop_reason() -> None:
    body = {"choices": [{"message": {"content": "a"}, "stop_reason": 128009}]}
    assert chat_coercer("m", fixed())(body)["choices"][0]["stop_reason"] == 128009


def test_reasoning_roundtrips_in_messages_and_deltas() -> None:
    message = {
        "role": "assistant",
        "content": "x",
        "reasoning": "think",
        "reasoning_details": [{"type": "reasoning.text", "text": "think"}],
    }
    out = CHAT_COMPLETION(
        {
            "id": "i",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "message": message}],
        }
    )
    assert out["choices"][0]["message"] == message
    delta = {"reasoning_content": "hmm"}
    chunk = CHAT_CHUNK(
        {
            "id": "i",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta}],
        }
    )
    assert chunk["choices"][0]["delta"] == delta
    assert b'"reasoning"' not in orjson.dumps(chunk)


def test_chunk_backfills_and_reuses_fallback_id() -> None:
    coerce = chat_chunk_coercer("gpt-4", fixed())
    a = coerce({"choices": [{"delta": {"content": "Hello"}}]})
    b = coerce({"choices": [{}, {}]})
    assert a["id"] == b["id"] == "chatcmpl-fixed"
    assert a["object"] == "chat.completion.chunk" and a["created"] == 0
    assert [c["index"] for c in b["choices"]] == [0, 1]
    assert b["choices"][0]["delta"] == {}


def test_usage_only_chunk_without_choices_is_accepted() -> None:
    out = chat_chunk_coercer("m", fixed())(
        {"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    )
    assert out["choices"] == [] and out["usage"]["total_tokens"] == 2


def test_tool_call_delta_requires_index() -> None:
    with pytest.raises(SchemaError) as info:
        chat_chunk_coercer("m", fixed())({"choices": [{"delta": {"tool_calls": [{"id": "c"}]}}]})
    assert info.value.path == "choices[0].delta.tool_calls[0].index"


def test_completion_backfills_but_not_text() -> None:
    coerce = completion_coercer("gpt-3.5", fixed("cmpl-"))
    out = coerce({"choices": [{"text": "Hello!"}, {"text": "b"}], "provider": "x"})
    assert out == {
        "id": "cmpl-fixed",
        "object": "text_completion",
        "created": 0,
        "model": "gpt-3.5",
        "choices": [{"text": "Hello!", "index": 0}, {"text": "b", "index": 1}],
    }
    with pytest.raises(SchemaError) as info:
        coerce({"choices": [{"index": 0}]})
    assert info.value.path == "choices[0].text"


def test_completion_chunk_backfills_missing_text() -> None:
    out = completion_chunk_coercer("m", fixed("cmpl-"))({"choices": [{"finish_reason": "stop"}]})
    assert out["choices"][0] == {"text": "", "index": 0, "finish_reason": "stop"}


def test_embeddings_are_closed_and_model_rewritten() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.1, 2], "index": 0, "cache_hit": True}],
        "model": "text-embedding-3-small-internal",
        "usage": {"prompt_tokens": 8, "total_tokens": 8, "cost": 1},
        "provider": "p",
    }
    out = embeddings_coercer("text-embedding-3-small", fixed(""))(body)
    assert out == {
        "object": "list",
        "data": [{"object": "embedding", "embedding": [0.1, 2], "index": 0}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }


def test_base64_embeddings_are_kept() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "embedding": "AAAA", "index": 0}],
        "model": "m",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }
    assert embeddings_coercer("m", fixed(""))(body)["data"][0]["embedding"] == "AAAA"


def test_response_backfills_missing_noncritical_fields() -> None:
    out = response_coercer("gpt-4o", fixed("resp_"))(
        {"id": "resp_abc123", "output": [], "provider": "x"}
    )
    assert out["id"] == "resp_abc123"
    assert out["model"] == "gpt-4o"
    assert (out["object"], out["status"], out["tool_choice"]) == ("response", "completed", "auto")
    assert out["parallel_tool_calls"] is True
    assert out["usage"] is None and out["previous_response_id"] is None
    assert "provider" not in out


def test_response_serialises_every_key() -> None:
    out = response_coercer("m", fixed("resp_"))({"output": []})
    assert len(out) == 31
    assert out["reasoning"] is None and out["id"] == "resp_fixed"


def test_response_with_newer_tool_types_is_accepted() -> None:
    out = response_coercer("m", fixed("resp_"))({"output": [], "tools": [{"type": "shell"}]})
    assert out["tools"] == [{"type": "shell"}]


def test_response_status_canceled_is_accepted() -> None:
    assert response_coercer("m", fixed("resp_"))({"output": [], "status": "canceled"})


def test_response_without_output_fails_closed() -> None:
    with pytest.raises(SchemaError):
        RESPONSE({"id": "x"})


def test_response_event_created_keeps_reasoning_nulls() -> None:
    ev = {
        "type": "response.created",
        "sequence_number": 0,
        "response": {
            "id": "resp-123",
            "model": "gpt-4o-2024-08-06",
            "output": [],
            "reasoning": {"effort": None, "summary": None},
            "internal": 1,
        },
    }
    out = response_event_coercer("gpt-4o", fixed("resp_"))(ev)
    assert out["response"]["model"] == "gpt-4o"
    assert out["response"]["status"] == "in_progress"
    assert out["response"]["reasoning"] == {"effort": None, "summary": None}
    assert out["response"]["incomplete_details"] is None
    assert "internal" not in out["response"]


def test_response_delta_event_keeps_payload_fields() -> None:
    ev = {
        "type": "response.output_text.delta",
        "sequence_number": 3,
        "delta": "Hello",
        "item_id": "msg_abc",
    }
    out = response_event_coercer("m", fixed("resp_"))(ev)
    assert out == ev and "response" not in out


@pytest.mark.parametrize("missing", ["type", "sequence_number"])
def test_response_event_requires_type_and_sequence(missing: str) -> None:
    ev: dict[str, Any] = {"type": "response.output_text.delta", "sequence_number": 3}
    del ev[missing]
    assert fails(RESPONSE_EVENT, ev).path == missing


def test_response_events_share_one_fallback_id() -> None:
    coerce = response_event_coercer("m", fixed("resp_"))
    a = coerce({"type": "response.created", "sequence_number": 0, "response": {}})
    b = coerce({"type": "response.completed", "sequence_number": 1, "response": {}})
    assert a["response"]["id"] == b["response"]["id"] == "resp_fixed"
    assert b["response"]["status"] == "completed"


async def test_strict_success_without_a_schema_is_refused() -> None:
    ctx: Any = SimpleNamespace(
        strict=True,
        trusted=False,
        alias="m",
        provider=None,
        request=SimpleNamespace(path="/v1/responses/resp_1", wants_stream=False),
    )
    flt = strict_filter(ctx)
    assert flt is not None
    reply: Any = SimpleNamespace(status=200, headers=[], body=None, is_sse=False)
    with pytest.raises(HTTPError) as info:
        await flt(reply)
    assert info.value.status == 502


def test_non_strict_context_gets_no_strict_filter() -> None:
    ctx: Any = SimpleNamespace(strict=False)
    assert strict_filter(ctx) is None
