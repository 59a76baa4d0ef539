"""Pure parts of response sanitisation: the non-strict chat sanitiser, the per-event SSE
sanitiser, body decoding and the status rules (reference §1.15-1.16, 3.J, 3.K, 3.W)."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._proxy.sanitize import (
    STREAM_MALFORMED_EVENT,
    STREAM_TOO_LARGE_EVENT,
    StreamSanitizer,
    UnsupportedEncoding,
    account_class_mask,
    decode_body,
    generic_error_body,
    sanitize_chat_chunk,
    sanitize_chat_completion,
    stream_decoder,
)
from onwards_trio._proxy.strict import chat_chunk_coercer, sse_error_formatter
from onwards_trio._proxy.strict_schemas import SchemaError

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4-turbo-2024-04-09",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "finish_reason": "stop",
            "logprobs": None,
            "native_finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    "custom_provider_field": "x",
    "another_unknown_field": {"a": 1},
}


def chunk(content: str, model: str = "gpt-4-turbo", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        **extra,
    }


def data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def nonstrict(trusted: bool = False) -> StreamSanitizer:
    def fmt(obj: dict[str, Any]) -> bytes:
        return orjson.dumps(obj) if trusted else generic_error_body(500)

    return StreamSanitizer(lambda o: sanitize_chat_chunk(o, "gpt-4"), fmt)


def events(out: bytes) -> list[bytes]:
    return [e for e in out.split(b"\n\n") if e]


# --- non-streaming ------------------------------------------------------------------------


def test_non_streaming_removes_unknown_fields() -> None:
    out = sanitize_chat_completion(dict(CHAT), "gpt-4")
    assert "custom_provider_field" not in out
    assert "another_unknown_field" not in out
    assert out["id"] == "chatcmpl-1"
    assert out["usage"]["total_tokens"] == 5
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}


def test_non_streaming_rewrites_model_to_alias() -> None:
    assert sanitize_chat_completion(dict(CHAT), "gpt-4")["model"] == "gpt-4"


def test_without_an_alias_the_upstream_model_is_kept() -> None:
    assert sanitize_chat_completion(dict(CHAT), None)["model"] == "gpt-4-turbo-2024-04-09"


def test_choice_keeps_only_openai_keys_and_null_logprobs() -> None:
    choice = sanitize_chat_completion(dict(CHAT), "gpt-4")["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello!"},
        "finish_reason": "stop",
        "logprobs": None,
    }


def test_missing_optionals_are_emitted_as_null() -> None:
    out = sanitize_chat_completion({"model": "m", "choices": []}, "a")
    assert out["usage"] is None
    assert out["system_fingerprint"] is None
    assert out["service_tier"] is None
    assert out["id"] == "chatcmpl-unknown"
    assert out["object"] == "chat.completion"


@pytest.mark.parametrize("missing", ["model", "choices"])
def test_missing_model_or_choices_is_an_error(missing: str) -> None:
    body = {k: v for k, v in CHAT.items() if k != missing}
    with pytest.raises(SchemaError) as info:
        sanitize_chat_completion(body, "gpt-4")
    assert info.value.path == missing


def test_openrouter_response_is_reduced() -> None:
    body = {
        "id": "gen-1",
        "provider": "OpenAI",
        "model": "openai/gpt-4o",
        "object": "chat.completion",
        "created": 1735000000,
        "choices": [
            {
                "logprobs": None,
                "finish_reason": "stop",
                "native_finish_reason": "stop",
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": None},
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "cost": 0.001,
            "is_byok": False,
            "cost_details": {"upstream_inference_cost": None},
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0, "video_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "image_tokens": 0},
        },
    }
    out = sanitize_chat_completion(body, "fred")
    assert out["model"] == "fred"
    assert (out["id"], out["object"], out["created"]) == ("gen-1", "chat.completion", 1735000000)
    assert "provider" not in out
    assert "native_finish_reason" not in out["choices"][0]
    assert out["choices"][0]["logprobs"] is None
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# --- streaming ----------------------------------------------------------------------------


def test_streaming_removes_unknown_fields_and_keeps_done() -> None:
    s = nonstrict()
    out = s.feed(data(chunk("Hi", custom_field="leak")) + b"data: [DONE]\n\n") + s.close()
    assert b"custom_field" not in out
    assert out.endswith(b"data: [DONE]\n\n")


def test_streaming_rewrites_model() -> None:
    s = nonstrict()
    out = s.feed(data(chunk("Hi"))) + s.close()
    assert b'"model":"gpt-4"' in out
    assert b"gpt-4-turbo" not in out


def test_each_event_keeps_its_blank_line_terminator() -> None:
    s = nonstrict()
    out = s.feed(data(chunk("a")) + data(chunk("b")) + b"data: [DONE]\n\n") + s.close()
    assert out.count(b"data: ") == 3
    assert b"}\n\ndata: " in out
    assert out.endswith(b"\n\n") and not out.endswith(b"\n\n\n")


def test_comment_event_and_id_lines_are_dropped() -> None:
    s = nonstrict()
    block = b": provider=custom-llm cost=0.001\nevent: message\nid: 42\nretry: 10\n" + data(
        chunk("x")
    )
    out = s.feed(block) + s.close()
    assert b"provider=" not in out
    assert b"event:" not in out and b"id: 42" not in out and b"retry" not in out
    assert out.startswith(b"data: {")


def test_comment_only_event_becomes_an_empty_keepalive() -> None:
    s = nonstrict()
    assert s.feed(b": OPENROUTER PROCESSING\n\n") == b":\n\n"


def test_crlf_events_are_recognised() -> None:
    s = nonstrict()
    out = s.feed(b"data: " + orjson.dumps(chunk("a")) + b"\r\n\r\n")
    assert out.startswith(b"data: {") and out.endswith(b"\n\n")


def test_data_without_space_is_still_a_data_line() -> None:
    s = nonstrict()
    out = s.feed(b"data:" + orjson.dumps(chunk("a")) + b"\n\n")
    assert b'"model":"gpt-4"' in out


def test_unterminated_last_event_is_sanitised_at_end() -> None:
    s = nonstrict()
    first = s.feed(b"data: " + orjson.dumps(chunk("a", provider="leak")) + b"\n")
    assert first == b""
    out = s.close()
    assert b'"model":"gpt-4"' in out and b"leak" not in out


def test_multiline_data_is_one_payload() -> None:
    s = nonstrict()
    pretty = orjson.dumps(chunk("a"), option=orjson.OPT_INDENT_2)
    block = b"".join(b"data: " + line + b"\n" for line in pretty.split(b"\n")) + b"\n"
    out = s.feed(block)
    assert len(events(out)) == 1
    assert orjson.loads(out[6:])["model"] == "gpt-4"


def test_two_json_lines_in_one_event_become_two_events() -> None:
    s = nonstrict()
    block = b"data: " + orjson.dumps(chunk("a")) + b"\ndata: " + orjson.dumps(chunk("b")) + b"\n\n"
    assert len(events(s.feed(block))) == 2


def test_malformed_chunk_ends_the_stream_with_an_error_event() -> None:
    s = nonstrict()
    out = s.feed(data(chunk("a")) + b"data: {not json\n\n" + data(chunk("b")))
    assert out.endswith(STREAM_MALFORMED_EVENT)
    assert out.count(b"data: ") == 2  # the good chunk, then the error; nothing after
    assert s.finished
    assert s.feed(data(chunk("c"))) == b""
    assert s.close() == b""


def test_chunk_of_the_wrong_shape_is_malformed() -> None:
    s = nonstrict()
    assert s.feed(data({"model": "m", "choices": "nope"})) == STREAM_MALFORMED_EVENT


def test_non_object_payload_is_malformed() -> None:
    s = nonstrict()
    assert s.feed(b"data: [1, 2]\n\n") == STREAM_MALFORMED_EVENT


def test_oversized_event_ends_with_an_error_event() -> None:
    s = StreamSanitizer(lambda o: o, lambda o: b"{}", max_event_size=64)
    assert s.feed(b"data: " + b"x" * 100) == STREAM_TOO_LARGE_EVENT
    assert s.finished


def test_events_before_an_oversized_one_in_the_same_chunk_are_kept() -> None:
    s = StreamSanitizer(lambda o: o, lambda o: b"{}", max_event_size=64)
    out = s.feed(b'data: {"n": 1}\n\n' + b"data: " + b"x" * 100)
    assert out == b'data: {"n":1}\n\n' + STREAM_TOO_LARGE_EVENT


def test_untrusted_error_in_stream_is_standardised() -> None:
    s = nonstrict(trusted=False)
    out = s.feed(data({"error": {"message": "OOM on GPU 3", "code": 500}}))
    assert b"OOM" not in out
    assert orjson.loads(out[6:])["error"]["code"] == "internal_error"
    assert not s.finished  # an error event does not end the stream


def test_trusted_error_in_stream_is_forwarded_verbatim() -> None:
    s = nonstrict(trusted=True)
    err = {"error": {"message": "Input too long", "type": "invalid_request_error", "code": 400}}
    assert orjson.loads(s.feed(data(err))[6:]) == err


def test_error_is_detected_before_coercion_even_beside_chunk_fields() -> None:
    s = nonstrict(trusted=False)
    out = s.feed(data(chunk("a", error={"message": "secret", "code": 429})))
    assert "choices" not in orjson.loads(out[6:])
    assert b"secret" not in out


def test_trusted_error_too_deep_to_reencode_ends_the_stream_cleanly() -> None:
    deep = b'data: {"error": ' + b"[" * 300 + b"]" * 300 + b"}\n\n"
    assert nonstrict(trusted=True).feed(deep) == STREAM_MALFORMED_EVENT


def test_null_error_key_is_not_an_error() -> None:
    s = nonstrict()
    out = s.feed(data(chunk("a", error=None)))
    assert orjson.loads(out[6:])["choices"][0]["delta"] == {"content": "a"}


# --- strict SSE error formatting (3.W) ------------------------------------------------------


def test_strict_untrusted_sse_error_uses_the_standard_message() -> None:
    body = orjson.loads(
        sse_error_formatter(False)({"error": {"message": "OOM on GPU 3", "code": 400}})
    )
    assert body == {
        "error": {
            "message": "Invalid request",
            "type": "invalid_request_error",
            "param": None,
            "code": 400,
        }
    }


def test_strict_untrusted_sse_error_without_numeric_code_is_500() -> None:
    body = orjson.loads(sse_error_formatter(False)({"error": {"code": "context_length"}}))
    assert body["error"]["code"] == 500
    assert body["error"]["message"] == "Internal server error"


def test_strict_untrusted_sse_account_error_is_masked() -> None:
    body = orjson.loads(sse_error_formatter(False)({"error": {"code": 401}}))
    assert body["error"]["code"] == 502


def test_strict_trusted_sse_error_is_verbatim() -> None:
    err = {"error": {"message": "Input too long", "code": "context_length_exceeded"}}
    assert orjson.loads(sse_error_formatter(True)(err)) == err


# --- status rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "masked"),
    [
        (401, 502),
        (402, 502),
        (403, 502),
        (451, 502),
        (408, 504),
        (400, 400),
        (429, 429),
        (500, 500),
    ],
)
def test_account_class_statuses_are_masked(status: int, masked: int) -> None:
    assert account_class_mask(status) == masked


def test_generic_4xx_body_says_the_provider_rejected_the_request() -> None:
    assert orjson.loads(generic_error_body(422)) == {
        "error": {
            "message": "The upstream provider rejected the request.",
            "type": "invalid_request_error",
            "param": None,
            "code": "upstream_error",
        }
    }


def test_generic_5xx_body_is_the_internal_error() -> None:
    assert orjson.loads(generic_error_body(503))["error"]["code"] == "internal_error"


# --- decoding -----------------------------------------------------------------------------


def test_gzip_body_is_decoded() -> None:
    raw = orjson.dumps(CHAT)
    assert decode_body(gzip.compress(raw), [(b"content-encoding", b"gzip")]) == raw


def test_zlib_deflate_body_is_decoded() -> None:
    raw = orjson.dumps(CHAT)
    assert decode_body(zlib.compress(raw), [(b"content-encoding", b"deflate")]) == raw


def test_raw_deflate_body_is_decoded() -> None:
    raw = orjson.dumps(CHAT)
    c = zlib.compressobj(wbits=-15)
    body = c.compress(raw) + c.flush()
    assert decode_body(body, [(b"content-encoding", b"deflate")]) == raw


def test_concatenated_gzip_members_are_decoded() -> None:
    body = gzip.compress(b"data: a\n\n") + gzip.compress(b"data: b\n\n")
    assert decode_body(body, [(b"content-encoding", b"gzip")]) == b"data: a\n\ndata: b\n\n"


def test_gzip_stream_decodes_byte_by_byte() -> None:
    raw = b"data: " + orjson.dumps(CHAT) + b"\n\n"
    decoder = stream_decoder([(b"content-encoding", b"gzip")])
    assert decoder is not None
    compressed = gzip.compress(raw)
    out = b"".join(decoder.feed(compressed[i : i + 1]) for i in range(len(compressed)))
    assert out + decoder.flush() == raw


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
def test_truncated_compressed_body_is_an_error(coding: bytes) -> None:
    raw = orjson.dumps(CHAT)
    whole = gzip.compress(raw) if coding == b"gzip" else zlib.compress(raw)
    with pytest.raises(zlib.error):
        decode_body(whole[: len(whole) // 2], [(b"content-encoding", coding)])


def test_identity_needs_no_decoder() -> None:
    assert stream_decoder([(b"content-encoding", b"identity")]) is None


def test_brotli_is_reported_unsupported() -> None:
    with pytest.raises(UnsupportedEncoding):
        stream_decoder([(b"content-encoding", b"br")])


def test_decoded_size_is_bounded() -> None:
    decoder = stream_decoder([(b"content-encoding", b"gzip")])
    assert decoder is not None
    decoder._stages[0]._limit = 1000
    with pytest.raises(zlib.error):
        decoder.feed(gzip.compress(b"0" * 10_000))


# --- property: chunking never changes the result ------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.text(max_size=8))
_extra = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(
        lambda k: (
            k
            not in {
                "id",
                "object",
                "created",
                "model",
                "choices",
                "usage",
                "system_fingerprint",
                "service_tier",
                "error",
                "content",  # a parameter of chunk() below
            }
        )
    ),
    _json_leaf,
    max_size=4,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], bytes, list[int]]:
    chunks = []
    for i in range(draw(st.integers(1, 5))):
        c = chunk(draw(st.text(max_size=12)), model=f"internal-{i}", **draw(_extra))
        c["choices"][0].update(
            draw(
                _extra.filter(
                    lambda d: (
                        "index" not in d
                        and "delta" not in d
                        and "finish_reason" not in d
                        and "logprobs" not in d
                    )
                )
            )
        )
        chunks.append(c)
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = b"".join(b"data: " + orjson.dumps(c) + newline + newline for c in chunks)
    body += b"data: [DONE]" + newline + newline
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    return chunks, body, cuts


def _run(sanitizer: StreamSanitizer, body: bytes, cuts: list[int]) -> bytes:
    out = []
    start = 0
    for cut in [*cuts, len(body)]:
        out.append(sanitizer.feed(body[start:cut]))
        start = cut
    out.append(sanitizer.close())
    return b"".join(out)


@given(streams())
def test_nonstrict_stream_equals_sanitised_whole(
    case: tuple[list[dict[str, Any]], bytes, list[int]],
) -> None:
    chunks, body, cuts = case
    streamed = _run(nonstrict(), body, cuts)
    whole = b"".join(data(sanitize_chat_chunk(c, "gpt-4")) for c in chunks) + b"data: [DONE]\n\n"
    assert streamed == whole
    assert streamed == _run(nonstrict(), body, [])


@given(streams())
def test_strict_stream_equals_sanitised_whole(
    case: tuple[list[dict[str, Any]], bytes, list[int]],
) -> None:
    chunks, body, cuts = case

    def fixed_id() -> str:
        return "chatcmpl-fixed"

    def sanitizer() -> StreamSanitizer:
        return StreamSanitizer(chat_chunk_coercer("gpt-4", fixed_id), sse_error_formatter(False))

    streamed = _run(sanitizer(), body, cuts)
    coerce = chat_chunk_coercer("gpt-4", fixed_id)
    whole = b"".join(data(coerce(orjson.loads(orjson.dumps(c)))) for c in chunks)
    assert streamed == whole + b"data: [DONE]\n\n"
    for event in events(streamed)[:-1]:
        out = orjson.loads(event[6:])
        assert set(out) <= {"id", "object", "created", "model", "choices"}
        assert set(out["choices"][0]) <= {"index", "delta", "finish_reason"}
        assert out["model"] == "gpt-4"
