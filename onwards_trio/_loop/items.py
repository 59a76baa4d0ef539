"""Pure conversions from Chat Completions to Open Responses *output* (no I/O, no Trio).

* :func:`completion_items` turns a chat completion into output items (reasoning, message,
  function_call), :func:`responses_usage` / :func:`sum_usage` convert and add usage.
* :class:`ChatChunkAssembler` rebuilds one chat completion from streamed chunks (the loop
  persists that as the model step's payload).
* :class:`ChatStreamTranslator` turns streamed chunks (or a whole non-streamed completion) into
  the Open Responses streaming events, as ``(wire_name, data)`` pairs; ``data`` has no ``type``
  or ``sequence_number`` (the loop numbers events, the HTTP layer adds ``type``).

Item ids are derived from the step id (``msg_<step>``, ``rs_<step>``, ``fc_<step>_<n>``,
``fco_<step>``), so the items streamed while a step runs and the items a transition function
later rebuilds from the stored step carry the same ids. ``output_index`` continues across all
model calls and tool outputs of one response because one translator serves the whole response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import attrs

__all__ = [
    "ChatChunkAssembler",
    "ChatStreamTranslator",
    "Event",
    "OutputIndexer",
    "completion_items",
    "completion_status",
    "function_call_item_id",
    "function_call_output_item",
    "message_item_id",
    "message_items",
    "reasoning_item_id",
    "reasoning_text",
    "responses_usage",
    "sum_usage",
    "tool_call_id",
    "tool_output_item_id",
]

Event: TypeAlias = tuple[str, dict[str, Any]]

_U32 = 2**32 - 1


# -- ids ---------------------------------------------------------------------------------------


def _suffix(choice: int) -> str:
    return "" if choice == 0 else f"_c{choice}"


def message_item_id(step_id: str, choice: int = 0) -> str:
    return f"msg_{step_id}{_suffix(choice)}"


def reasoning_item_id(step_id: str, choice: int = 0) -> str:
    return f"rs_{step_id}{_suffix(choice)}"


def function_call_item_id(step_id: str, tool_index: int, choice: int = 0) -> str:
    return f"fc_{step_id}{_suffix(choice)}_{tool_index}"


def tool_output_item_id(step_id: str) -> str:
    return f"fco_{step_id}"


def tool_call_id(step_id: str, tool_index: int, given: Any = None) -> str:
    """The model's call id, or a stable stand-in when the upstream sent none."""
    if isinstance(given, str) and given:
        return given
    return f"call_{step_id}_{tool_index}"


# -- items -------------------------------------------------------------------------------------


def reasoning_text(obj: Mapping[str, Any]) -> str:
    """Merge the reasoning fields providers use (reference §1.21): ``reasoning_content``, then
    ``reasoning`` unless identical, then each ``reasoning_details[].text`` not already taken."""
    parts: list[str] = []
    rc = obj.get("reasoning_content")
    if isinstance(rc, str) and rc:
        parts.append(rc)
    r = obj.get("reasoning")
    if isinstance(r, str) and r and r not in parts:
        parts.append(r)
    details = obj.get("reasoning_details")
    if isinstance(details, list):
        for d in details:
            t = d.get("text") if isinstance(d, Mapping) else None
            if isinstance(t, str) and t and t not in parts:
                parts.append(t)
    return "\n".join(parts)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "")
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _item_status(finish_reason: Any) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [{"type": "summary_text", "text": text}],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _message_item(item_id: str, role: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "role": role,
        "content": [_output_text_part(text)],
        "status": status,
    }


def _function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def function_call_output_item(
    step_id: str, call_id: str, output: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call_output",
        "id": tool_output_item_id(step_id),
        "call_id": call_id,
        "output": output,
        "status": status,
    }


def message_items(
    message: Mapping[str, Any], step_id: str, *, choice: int = 0, finish_reason: Any = None
) -> list[dict[str, Any]]:
    """Output items for one assistant message: reasoning, then text, then one function_call
    per tool call (reference §1.20.2 order)."""
    status = _item_status(finish_reason)
    items: list[dict[str, Any]] = []
    reasoning = reasoning_text(message)
    if reasoning:
        items.append(_reasoning_item(reasoning_item_id(step_id, choice), reasoning, status))
    text = _content_text(message.get("content"))
    if text:
        role = message.get("role") or "assistant"
        items.append(_message_item(message_item_id(step_id, choice), role, text, status))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for n, tc in enumerate(tool_calls):
            if not isinstance(tc, Mapping):
                continue
            fn = tc.get("function") or {}
            idx = tc.get("index", n) if isinstance(tc.get("index", n), int) else n
            items.append(
                _function_call_item(
                    function_call_item_id(step_id, idx, choice),
                    tool_call_id(step_id, idx, tc.get("id")),
                    str(fn.get("name") or ""),
                    str(fn.get("arguments") or ""),
                    status,
                )
            )
    return items


def completion_items(completion: Any, step_id: str) -> list[dict[str, Any]]:
    """Output items for every choice of a chat completion, in choice order."""
    if not isinstance(completion, Mapping):
        return []
    items: list[dict[str, Any]] = []
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return items
    for n, choice in enumerate(choices):
        if not isinstance(choice, Mapping):
            continue
        message = choice.get("message")
        if isinstance(message, Mapping):
            index = choice.get("index", n)
            items.extend(
                message_items(
                    message,
                    step_id,
                    choice=index if isinstance(index, int) else n,
                    finish_reason=choice.get("finish_reason"),
                )
            )
    return items


def completion_status(completion: Any) -> tuple[str, dict[str, Any] | None]:
    """Response status and ``incomplete_details`` implied by a final chat completion.

    ``length`` and ``content_filter`` make the response ``incomplete`` (as the OpenAI
    Responses API reports them); no choices at all is ``failed``.
    """
    choices = completion.get("choices") if isinstance(completion, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return "failed", None
    reason = choices[0].get("finish_reason")
    if reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


# -- usage -------------------------------------------------------------------------------------


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, min(int(value), _U32))


def responses_usage(usage: Any) -> dict[str, Any] | None:
    """Chat usage → Responses usage (reference §1.21); ``None`` if there is none."""
    if not isinstance(usage, Mapping):
        return None
    ptd = usage.get("prompt_tokens_details")
    ctd = usage.get("completion_tokens_details")
    inp = _int(usage.get("prompt_tokens"))
    out = _int(usage.get("completion_tokens"))
    total = usage.get("total_tokens")
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "total_tokens": _int(total) if total is not None else inp + out,
        "input_tokens_details": {
            "cached_tokens": _int(ptd.get("cached_tokens")) if isinstance(ptd, Mapping) else 0
        },
        "output_tokens_details": {
            "reasoning_tokens": (
                _int(ctd.get("reasoning_tokens")) if isinstance(ctd, Mapping) else 0
            )
        },
    }


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a | b, bool):
        return a + b
    return b


def sum_usage(usages: Iterable[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """Add Responses usages (numbers summed, detail objects merged); ``None`` if none given."""
    total: dict[str, Any] | None = None
    for u in usages:
        if u is None:
            continue
        total = dict(u) if total is None else dict(_add(total, u))
    return total


# -- stream reassembly --------------------------------------------------------------------------


@attrs.define
class _ToolAcc:
    id: str = ""
    type: str = "function"
    name: str = ""
    arguments: list[str] = attrs.field(factory=list)


@attrs.define
class _ChoiceAcc:
    role: str = ""
    content: list[str] = attrs.field(factory=list)
    reasoning_content: list[str] = attrs.field(factory=list)
    reasoning: list[str] = attrs.field(factory=list)
    tools: dict[int, _ToolAcc] = attrs.field(factory=dict)
    finish_reason: Any = None


class ChatChunkAssembler:
    """Rebuild one ``chat.completion`` object from ``chat.completion.chunk`` objects."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _ChoiceAcc] = {}
        self._usage: Any = None
        self.chunks = 0

    def feed(self, chunk: Mapping[str, Any]) -> None:
        self.chunks += 1
        head = self._head
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if key not in head and chunk.get(key) is not None:
                head[key] = chunk[key]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for n, ch in enumerate(choices):
            if not isinstance(ch, Mapping):
                continue
            index = ch.get("index", n)
            ckey = index if isinstance(index, int) else n
            acc = self._choices.get(ckey)
            if acc is None:
                acc = self._choices[ckey] = _ChoiceAcc()
            delta = ch.get("delta")
            if isinstance(delta, Mapping):
                if isinstance(delta.get("role"), str) and not acc.role:
                    acc.role = delta["role"]
                for key, parts in (
                    ("content", acc.content),
                    ("reasoning_content", acc.reasoning_content),
                    ("reasoning", acc.reasoning),
                ):
                    v = delta.get(key)
                    if isinstance(v, str) and v:
                        parts.append(v)
                tcs = delta.get("tool_calls")
                if isinstance(tcs, list):
                    for k, tc in enumerate(tcs):
                        if not isinstance(tc, Mapping):
                            continue
                        ti = tc.get("index", k)
                        tkey = ti if isinstance(ti, int) else k
                        t = acc.tools.get(tkey)
                        if t is None:
                            t = acc.tools[tkey] = _ToolAcc()
                        if isinstance(tc.get("id"), str) and tc["id"] and not t.id:
                            t.id = tc["id"]
                        if isinstance(tc.get("type"), str):
                            t.type = tc["type"]
                        fn = tc.get("function")
                        if isinstance(fn, Mapping):
                            if isinstance(fn.get("name"), str) and fn["name"] and not t.name:
                                t.name = fn["name"]
                            if isinstance(fn.get("arguments"), str):
                                t.arguments.append(fn["arguments"])
            if ch.get("finish_reason") is not None:
                acc.finish_reason = ch["finish_reason"]

    def result(self, step_id: str = "") -> dict[str, Any]:
        """The completion so far. Tool calls without an id get :func:`tool_call_id`'s stand-in
        (the same one the translator streamed)."""
        choices = []
        for index in sorted(self._choices):
            acc = self._choices[index]
            message: dict[str, Any] = {
                "role": acc.role or "assistant",
                "content": "".join(acc.content) if acc.content else None,
            }
            if acc.reasoning_content:
                message["reasoning_content"] = "".join(acc.reasoning_content)
            if acc.reasoning:
                message["reasoning"] = "".join(acc.reasoning)
            if acc.tools:
                message["tool_calls"] = [
                    {
                        "index": ti,
                        "id": tool_call_id(step_id, ti, t.id),
                        "type": t.type,
                        "function": {"name": t.name, "arguments": "".join(t.arguments)},
                    }
                    for ti, t in sorted(acc.tools.items())
                ]
            choices.append({"index": index, "message": message, "finish_reason": acc.finish_reason})
        out: dict[str, Any] = {
            "id": self._head.get("id", ""),
            "object": "chat.completion",
            "created": self._head.get("created", 0),
            "model": self._head.get("model", ""),
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self._head:
                out[key] = self._head[key]
        out["choices"] = choices
        if self._usage is not None:
            out["usage"] = self._usage
        return out


# -- streaming events ---------------------------------------------------------------------------


@attrs.define
class _Item:
    kind: str  # "reasoning" | "message" | "function_call"
    item_id: str
    output_index: int
    text: list[str] = attrs.field(factory=list)
    role: str = "assistant"
    call_id: str = ""
    name: str = ""
    done: bool = False


def _part_added(item: _Item) -> Event:
    """The empty part that opens a message (``content_part.added``) or a reasoning item
    (``reasoning_summary_part.added``)."""
    base = {"item_id": item.item_id, "output_index": item.output_index}
    if item.kind == "message":
        return (
            "response.content_part.added",
            {**base, "content_index": 0, "part": _output_text_part("")},
        )
    return (
        "response.reasoning_summary_part.added",
        {**base, "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
    )


def _text_delta(item: _Item, delta: str) -> Event:
    """A piece of a message's text (``output_text.delta``) or of a reasoning summary
    (``reasoning_summary_text.delta``)."""
    base = {"item_id": item.item_id, "output_index": item.output_index}
    if item.kind == "message":
        return (
            "response.output_text.delta",
            {**base, "content_index": 0, "delta": delta, "logprobs": []},
        )
    return ("response.reasoning_summary_text.delta", {**base, "summary_index": 0, "delta": delta})


class OutputIndexer:
    """Hands out a response's ``output_index`` values; shared by every translator of one
    response so concurrent model steps and tool outputs never collide."""

    __slots__ = ("next_index",)

    def __init__(self, start: int = 0) -> None:
        self.next_index = start

    def next(self) -> int:
        n = self.next_index
        self.next_index += 1
        return n


class ChatStreamTranslator:
    """Chat completion chunks → Open Responses streaming events.

    One translator can serve a whole response, or one per model call sharing an
    :class:`OutputIndexer`. Call :meth:`begin_call` before each model call, :meth:`feed` per
    chunk (or :meth:`message` for a non-streamed completion), and :meth:`end_call` when the
    call's stream ends; it closes any item the upstream left open. :meth:`reserve_index` hands
    out an ``output_index`` for items the loop adds itself (tool outputs).
    """

    def __init__(self, indexer: OutputIndexer | None = None) -> None:
        self.indexer = indexer if indexer is not None else OutputIndexer()
        self._step_id = ""
        self._items: dict[tuple[int, str, int], _Item] = {}
        self._order: list[_Item] = []

    def reserve_index(self) -> int:
        return self.indexer.next()

    def begin_call(self, step_id: str) -> None:
        self._step_id = step_id
        self._items = {}
        self._order = []

    def _open(self, events: list[Event], key: tuple[int, str, int], item: dict[str, Any]) -> _Item:
        state = _Item(kind=key[1], item_id=item["id"], output_index=self.reserve_index())
        self._items[key] = state
        self._order.append(state)
        events.append(
            ("response.output_item.added", {"output_index": state.output_index, "item": item})
        )
        return state

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return events
        for n, ch in enumerate(choices):
            if not isinstance(ch, Mapping):
                continue
            ci = ch.get("index", n)
            ci = ci if isinstance(ci, int) else n
            delta = ch.get("delta")
            if isinstance(delta, Mapping):
                self._delta(events, ci, delta)
            if ch.get("finish_reason") is not None:
                self._close_choice(events, ci, _item_status(ch["finish_reason"]))
        return events

    def _delta(self, events: list[Event], ci: int, delta: Mapping[str, Any]) -> None:
        step = self._step_id
        reasoning = reasoning_text(delta)
        if reasoning:
            r = self._items.get((ci, "reasoning", 0))
            if r is None:
                r = self._open(
                    events,
                    (ci, "reasoning", 0),
                    {
                        "type": "reasoning",
                        "id": reasoning_item_id(step, ci),
                        "summary": [],
                        "status": "in_progress",
                    },
                )
                events.append(_part_added(r))
            if not r.done:
                r.text.append(reasoning)
                events.append(_text_delta(r, reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._close_reasoning(events, ci)
            m = self._items.get((ci, "message", 0))
            if m is None:
                m = self._open(
                    events,
                    (ci, "message", 0),
                    {
                        "type": "message",
                        "id": message_item_id(step, ci),
                        "role": "assistant",
                        "content": [],
                        "status": "in_progress",
                    },
                )
                if isinstance(delta.get("role"), str):
                    m.role = delta["role"]
                events.append(_part_added(m))
            if not m.done:
                m.text.append(content)
                events.append(_text_delta(m, content))
        tcs = delta.get("tool_calls")
        if isinstance(tcs, list):
            self._close_reasoning(events, ci)
            for k, tc in enumerate(tcs):
                if not isinstance(tc, Mapping):
                    continue
                ti = tc.get("index", k)
                ti = ti if isinstance(ti, int) else k
                fn = tc.get("function")
                fn = fn if isinstance(fn, Mapping) else {}
                f = self._items.get((ci, "function_call", ti))
                if f is None:
                    call_id = tool_call_id(step, ti, tc.get("id"))
                    given = fn.get("name")
                    name = given if isinstance(given, str) else ""
                    f = self._open(
                        events,
                        (ci, "function_call", ti),
                        _function_call_item(
                            function_call_item_id(step, ti, ci), call_id, name, "", "in_progress"
                        ),
                    )
                    f.call_id, f.name = call_id, name
                elif not f.name and isinstance(fn.get("name"), str):
                    f.name = str(fn["name"])
                args = fn.get("arguments")
                if isinstance(args, str) and args and not f.done:
                    f.text.append(args)
                    events.append(
                        (
                            "response.function_call_arguments.delta",
                            {
                                "item_id": f.item_id,
                                "output_index": f.output_index,
                                "call_id": f.call_id,
                                "delta": args,
                            },
                        )
                    )

    def _close_reasoning(self, events: list[Event], ci: int) -> None:
        r = self._items.get((ci, "reasoning", 0))
        if r is not None and not r.done:
            self._close(events, r, "completed")

    def _close_choice(self, events: list[Event], ci: int, status: str) -> None:
        for (c, _, _), item in list(self._items.items()):
            if c == ci and not item.done:
                self._close(events, item, status)

    def _close(self, events: list[Event], item: _Item, status: str) -> None:
        item.done = True
        text = "".join(item.text)
        base = {"item_id": item.item_id, "output_index": item.output_index}
        if item.kind == "message":
            events.append(
                (
                    "response.output_text.done",
                    {**base, "content_index": 0, "text": text, "logprobs": []},
                )
            )
            events.append(
                (
                    "response.content_part.done",
                    {**base, "content_index": 0, "part": _output_text_part(text)},
                )
            )
            done = _message_item(item.item_id, item.role, text, status)
        elif item.kind == "reasoning":
            events.append(
                ("response.reasoning_summary_text.done", {**base, "summary_index": 0, "text": text})
            )
            events.append(
                (
                    "response.reasoning_summary_part.done",
                    {**base, "summary_index": 0, "part": {"type": "summary_text", "text": text}},
                )
            )
            done = _reasoning_item(item.item_id, text, status)
        else:
            events.append(
                (
                    "response.function_call_arguments.done",
                    {**base, "call_id": item.call_id, "name": item.name, "arguments": text},
                )
            )
            done = _function_call_item(item.item_id, item.call_id, item.name, text, status)
        events.append(
            ("response.output_item.done", {"output_index": item.output_index, "item": done})
        )

    def end_call(self) -> list[Event]:
        """Close every item of this call still open (a stream that never sent a finish)."""
        events: list[Event] = []
        for item in self._order:
            if not item.done:
                self._close(events, item, "completed")
        return events

    def message(self, completion: Any) -> list[Event]:
        """Events for a whole non-streamed completion: each item added and done, no deltas."""
        events: list[Event] = []
        step = self._step_id
        for item in completion_items(completion, step):
            kind = item["type"]
            state = _Item(kind=kind, item_id=item["id"], output_index=self.reserve_index())
            if kind == "message":
                skeleton = {**item, "content": [], "status": "in_progress"}
                state.role = item["role"]
                state.text = [item["content"][0]["text"]]
            elif kind == "reasoning":
                skeleton = {
                    "type": "reasoning",
                    "id": item["id"],
                    "summary": [],
                    "status": "in_progress",
                }
                state.text = [item["summary"][0]["text"]]
            else:
                skeleton = {**item, "arguments": "", "status": "in_progress"}
                state.call_id, state.name = item["call_id"], item["name"]
                state.text = [item["arguments"]]
            events.append(
                (
                    "response.output_item.added",
                    {"output_index": state.output_index, "item": skeleton},
                )
            )
            if kind != "function_call":
                events.append(_part_added(state))
            self._close(events, state, item["status"])
        return events
