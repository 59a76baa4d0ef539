"""Chat Completions → Open Responses output: items, usage, reassembly and the stream translator."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from onwards_trio._loop.items import (
    ChatChunkAssembler,
    ChatStreamTranslator,
    OutputIndexer,
    completion_items,
    completion_status,
    reasoning_text,
    responses_usage,
    sum_usage,
)
from tests.loop.test_loop_helpers import chat, chunk, tool_call


def kinds(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name.removeprefix("response.") for name, _ in events]


def test_completion_items_order_ids_and_statuses() -> None:
    completion = chat("answer", tool_calls=[tool_call("call_9", "f", '{"a":1}')], reasoning="think")
    items = completion_items(completion, "step_x")
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert [i["id"] for i in items] == ["rs_step_x", "msg_step_x", "fc_step_x_0"]
    assert items[0]["summary"] == []
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert items[0]["content"] == [{"type": "reasoning_text", "text": "think"}]
    assert items[1]["content"] == [
        {"type": "output_text", "text": "answer", "annotations": [], "logprobs": []}
    ]
    assert items[2] == {
        "type": "function_call",
        "id": "fc_step_x_0",
        "call_id": "call_9",
        "name": "f",
        "arguments": '{"a":1}',
        "status": "completed",
    }


def test_length_finish_marks_items_incomplete() -> None:
    items = completion_items(chat("cut", finish="length"), "s")
    assert items[0]["status"] == "incomplete"


def test_empty_content_gives_no_message_item() -> None:
    assert completion_items(chat(""), "s") == []
    assert completion_items({"no": "choices"}, "s") == []


def test_reasoning_merge_rule() -> None:
    obj = {
        "reasoning_content": "a",
        "reasoning": "a",
        "reasoning_details": [{"text": "b"}, {"text": "a"}, {"text": ""}],
    }
    assert reasoning_text(obj) == "a\nb"


def test_completion_status() -> None:
    assert completion_status(chat("x")) == ("completed", None)
    assert completion_status(chat("x", finish="length")) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    assert completion_status(chat("x", finish="content_filter"))[0] == "incomplete"
    assert completion_status({"choices": []}) == ("failed", None)


def test_usage_conversion_and_sum() -> None:
    u = responses_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 2},
            "completion_tokens_details": {"reasoning_tokens": 1},
        }
    )
    assert u == {
        "input_tokens": 10,
        "output_tokens": 4,
        "total_tokens": 14,
        "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    total = sum_usage([u, None, u])
    assert total is not None
    assert total["total_tokens"] == 28
    assert total["input_tokens_details"] == {"cached_tokens": 4, "cache_write_tokens": 0}
    assert sum_usage([None]) is None
    assert responses_usage(None) is None


def test_assembler_rebuilds_tool_calls_from_fragments() -> None:
    asm = ChatChunkAssembler()
    asm.feed(chunk({"role": "assistant", "content": "Hi"}))
    asm.feed(
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}
                ]
            }
        )
    )
    asm.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}))
    asm.feed(chunk({}, "tool_calls"))
    asm.feed({"choices": [], "usage": {"total_tokens": 3}})
    result = asm.result("s")
    message = result["choices"][0]["message"]
    assert message["content"] == "Hi"
    assert message["tool_calls"] == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"a":1}'},
        }
    ]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert result["usage"] == {"total_tokens": 3}


def test_translator_text_stream_event_order() -> None:
    tr = ChatStreamTranslator()
    tr.begin_call("s")
    events = tr.feed(chunk({"role": "assistant", "content": ""}))
    assert events == []  # role-only chunks create nothing
    events += tr.feed(chunk({"content": "He"}))
    events += tr.feed(chunk({"content": "llo"}))
    events += tr.feed(chunk({}, "stop"))
    assert kinds(events) == [
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ]
    assert events[4][1]["text"] == "Hello"
    assert all(e[1].get("item_id", "msg_s") == "msg_s" for e in events)
    assert events[-1][1]["item"]["status"] == "completed"


def test_translator_function_call_events_carry_the_real_call_id_and_name() -> None:
    tr = ChatStreamTranslator()
    tr.begin_call("s")
    events = tr.feed(
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_7", "function": {"name": "f", "arguments": ""}}
                ]
            }
        )
    )
    events += tr.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    events += tr.end_call()
    assert kinds(events) == [
        "output_item.added",
        "function_call_arguments.delta",
        "function_call_arguments.done",
        "output_item.done",
    ]
    added = events[0][1]["item"]
    assert (added["call_id"], added["name"], added["status"]) == ("call_7", "f", "in_progress")
    assert events[1][1]["call_id"] == "call_7"
    assert events[2][1] == {
        "item_id": "fc_s_0",
        "output_index": 0,
        "call_id": "call_7",
        "name": "f",
        "arguments": "{}",
    }


def test_translator_reasoning_closes_before_the_message() -> None:
    tr = ChatStreamTranslator()
    tr.begin_call("s")
    events = tr.feed(chunk({"reasoning_content": "hmm"}))
    events += tr.feed(chunk({"content": "ok"}, "stop"))
    assert kinds(events) == [
        "output_item.added",
        "reasoning.delta",
        "reasoning.done",
        "output_item.done",
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ]
    assert [e[1]["output_index"] for e in events if e[0].endswith("output_item.added")] == [0, 1]


def test_output_index_continues_across_calls_and_external_items() -> None:
    indexer = OutputIndexer()
    first = ChatStreamTranslator(indexer)
    first.begin_call("a")
    first.feed(chunk({"content": "x"}, "stop"))
    assert indexer.next() == 1  # a tool output, say
    second = ChatStreamTranslator(indexer)
    second.begin_call("b")
    events = second.feed(chunk({"content": "y"}, "stop"))
    assert events[0][1]["output_index"] == 2
    assert events[0][1]["item"]["id"] == "msg_b"


def test_translator_whole_completion_is_one_delta_per_item() -> None:
    tr = ChatStreamTranslator()
    tr.begin_call("s")
    events = tr.message(chat("all", tool_calls=[tool_call("call_1", "f")]))
    names = kinds(events)
    assert names.count("output_text.delta") == 1
    done_items = [e[1]["item"] for e in events if e[0] == "response.output_item.done"]
    assert done_items == completion_items(chat("all", tool_calls=[tool_call("call_1", "f")]), "s")


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=20))
def test_streamed_deltas_add_up_to_the_final_text(parts: list[str]) -> None:
    tr = ChatStreamTranslator()
    tr.begin_call("s")
    asm = ChatChunkAssembler()
    events = []
    for p in parts:
        c = chunk({"content": p})
        asm.feed(c)
        events += tr.feed(c)
    events += tr.end_call()
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    (done,) = [d["text"] for n, d in events if n == "response.output_text.done"]
    assert deltas == done == "".join(parts) == asm.result()["choices"][0]["message"]["content"]
