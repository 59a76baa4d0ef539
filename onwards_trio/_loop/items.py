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
    """Raw reasoning is the item's ``content``: ``summary`` is meant to be safe to show, and a
    Chat upstream gives no summary, so it stays empty."""
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _annotation(raw: Any) -> dict[str, Any] | None:
    """A Chat annotation (``{type: url_citation, url_citation: {...}}``) as a Responses one."""
    if not isinstance(raw, Mapping) or raw.get("type") != "url_citation":
        return None
    cite = raw.get("url_citation")
    cite = cite if isinstance(cite, Mapping) else raw
    return {
        "type": "url_citation",
        "url": str(cite.get("url") or ""),
        "start_index": _int(cite.get("start_index")),
        "end_index": _int(cite.get("end_index")),
        "title": str(cite.get("title") or ""),
    }


def _annotations(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        return []
    return [a for a in (_annotation(r) for r in raw) if a is not None]


def _logprobs(raw: Any) -> list[dict[str, Any]]:
    """A Chat choice's ``logprobs.content`` as Responses ``output_text.logprobs``."""
    content = raw.get("content") if isinstance(raw, Mapping) else None
    if not isinstance(content, list):
        return []

    def one(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "token": str(entry.get("token", "")),
            "logprob": entry.get("logprob", 0.0),
            "bytes": entry.get("bytes") or [],
        }

    return [
        {
            **one(entry),
            "top_logprobs": [
                one(t) for t in entry.get("top_logprobs") or [] if isinstance(t, Mapping)
            ],
        }
        for entry in content
        if isinstance(entry, Mapping)
    ]


def _message_item(
    item_id: str,
    role: str,
    text: str | None,
    status: str,
    *,
    refusal: str | None = None,
    annotations: list[dict[str, Any]] | None = None,
    phase: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An assistant message: an ``output_text`` part (when there is text, or nothing else) and a
    ``refusal`` part when the model refused. ``phase`` says whether tool calls follow it
    (``commentary``) or it is the answer (``final_answer``)."""
    parts: list[dict[str, Any]] = []
    if text or refusal is None:
        part = _output_text_part(text or "")
        part["annotations"] = list(annotations or [])
        part["logprobs"] = list(logprobs or [])
        parts.append(part)
    if refusal is not None:
        parts.append({"type": "refusal", "refusal": refusal})
    item: dict[str, Any] = {
        "type": "message",
        "id": item_id,
        "role": role,
        "content": parts,
        "status": status,
    }
    if phase is not None:
        item["phase"] = phase
    return item


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
    message: Mapping[str, Any],
    step_id: str,
    *,
    choice: int = 0,
    finish_reason: Any = None,
    logprobs: Any = None,
) -> list[dict[str, Any]]:
    """Output items for one assistant message: reasoning, then text, then one function_call
    per tool call (reference §1.20.2 order)."""
    status = _item_status(finish_reason)
    items: list[dict[str, Any]] = []
    text = _content_text(message.get("content"))
    refusal = message.get("refusal")
    refusal = refusal if isinstance(refusal, str) and refusal else None
    tool_calls = message.get("tool_calls")
    annotations = _annotations(message.get("annotations"))
    reasoning = reasoning_text(message)
    if reasoning:
        # Reasoning that something followed was finished, whatever cut the turn short.
        followed = bool(text or refusal or annotations or tool_calls)
        items.append(
            _reasoning_item(
                reasoning_item_id(step_id, choice),
                reasoning,
                "completed" if followed else status,
            )
        )
    if text or refusal is not None or annotations:
        role = message.get("role") or "assistant"
        items.append(
            _message_item(
                message_item_id(step_id, choice),
                role,
                text,
                status,
                refusal=refusal,
                annotations=annotations,
                logprobs=_logprobs(logprobs),
                phase="commentary"
                if isinstance(tool_calls, list) and tool_calls
                else "final_answer",
            )
        )
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
                    logprobs=choice.get("logprobs"),
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
        # cache_write_tokens: newer SDKs require it; Chat upstreams that report cache writes
        # (prompt_tokens_details.cache_write_tokens) give it, others 0.
        "input_tokens_details": {
            "cached_tokens": _int(ptd.get("cached_tokens")) if isinstance(ptd, Mapping) else 0,
            "cache_write_tokens": (
                _int(ptd.get("cache_write_tokens")) if isinstance(ptd, Mapping) else 0
            ),
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
    refusal: list[str] = attrs.field(factory=list)
    reasoning_content: list[str] = attrs.field(factory=list)
    reasoning: list[str] = attrs.field(factory=list)
    annotations: list[Any] = attrs.field(factory=list)
    logprobs: list[Any] = attrs.field(factory=list)
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
                if isinstance(delta.get("annotations"), list):
                    acc.annotations.extend(delta["annotations"])
                for key, parts in (
                    ("content", acc.content),
                    ("refusal", acc.refusal),
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
            logprobs = ch.get("logprobs")
            if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
                acc.logprobs.extend(logprobs["content"])
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
            if acc.refusal:
                message["refusal"] = "".join(acc.refusal)
            if acc.annotations:
                message["annotations"] = list(acc.annotations)
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
            choice: dict[str, Any] = {
                "index": index,
                "message": message,
                "finish_reason": acc.finish_reason,
            }
            if acc.logprobs:
                choice["logprobs"] = {"content": list(acc.logprobs)}
            choices.append(choice)
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
    choice: int = 0
    text: list[str] = attrs.field(factory=list)  # message text, reasoning text, arguments
    refusal: list[str] | None = None  # a message's refusal part, once one was opened
    parts: list[str] = attrs.field(factory=list)  # a message's part kinds, in content order
    annotations: list[dict[str, Any]] = attrs.field(factory=list)
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    role: str = "assistant"
    call_id: str = ""
    name: str = ""
    done: bool = False

    def base(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": self.output_index}

    def part_index(self, kind: str) -> int:
        return self.parts.index(kind)


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


def _as_delta(message: Mapping[str, Any]) -> dict[str, Any]:
    """A whole completion message as one chunk delta (tool calls numbered), so a non-streamed
    completion goes through the same event machine as a streamed one."""
    delta = dict(message)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [
            {**c, "index": c.get("index", n)} if isinstance(c, Mapping) else c
            for n, c in enumerate(calls)
        ]
    return delta


class ChatStreamTranslator:
    """Chat completion chunks → Open Responses streaming events.

    One translator can serve a whole response, or one per model call sharing an
    :class:`OutputIndexer`. Call :meth:`begin_call` before each model call, :meth:`feed` per
    chunk (or :meth:`message` for a non-streamed completion), and :meth:`end_call` when the
    call's stream ends; it closes any item the upstream left open. :meth:`reserve_index` hands
    out an ``output_index`` for items the loop adds itself (tool outputs).

    Raw reasoning streams as ``response.reasoning.delta``/``.done`` (the item's ``content``);
    a refusal as its own ``refusal`` content part with ``response.refusal.delta``/``.done``;
    ``url_citation`` annotations as ``response.output_text.annotation.added``.
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
        state = _Item(
            kind=key[1], item_id=item["id"], output_index=self.reserve_index(), choice=key[0]
        )
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
                self._delta(events, ci, delta, _logprobs(ch.get("logprobs")))
            if ch.get("finish_reason") is not None:
                self._close_choice(events, ci, _item_status(ch["finish_reason"]))
        return events

    def _message(self, events: list[Event], ci: int, delta: Mapping[str, Any]) -> _Item:
        m = self._items.get((ci, "message", 0))
        if m is None:
            m = self._open(
                events,
                (ci, "message", 0),
                {
                    "type": "message",
                    "id": message_item_id(self._step_id, ci),
                    "role": "assistant",
                    "content": [],
                    "status": "in_progress",
                },
            )
            if isinstance(delta.get("role"), str):
                m.role = delta["role"]
        return m

    def _part(self, events: list[Event], m: _Item, kind: str) -> int:
        """The content index of ``m``'s ``kind`` part, opening it (``content_part.added``)
        the first time."""
        if kind not in m.parts:
            m.parts.append(kind)
            part = (
                _output_text_part("")
                if kind == "output_text"
                else {"type": "refusal", "refusal": ""}
            )
            events.append(
                (
                    "response.content_part.added",
                    {**m.base(), "content_index": len(m.parts) - 1, "part": part},
                )
            )
        return m.part_index(kind)

    def _delta(
        self,
        events: list[Event],
        ci: int,
        delta: Mapping[str, Any],
        logprobs: list[dict[str, Any]],
    ) -> None:
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
                        "content": [],
                        "status": "in_progress",
                    },
                )
            if not r.done:
                r.text.append(reasoning)
                events.append(
                    (
                        "response.reasoning.delta",
                        {**r.base(), "content_index": 0, "delta": reasoning},
                    )
                )
        content = delta.get("content")
        if isinstance(content, list):
            content = _content_text(content)
        if isinstance(content, str) and content:
            self._close_reasoning(events, ci)
            m = self._message(events, ci, delta)
            if not m.done:
                index = self._part(events, m, "output_text")
                m.text.append(content)
                m.logprobs.extend(logprobs)
                events.append(
                    (
                        "response.output_text.delta",
                        {
                            **m.base(),
                            "content_index": index,
                            "delta": content,
                            "logprobs": logprobs,
                        },
                    )
                )
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._close_reasoning(events, ci)
            m = self._message(events, ci, delta)
            if not m.done:
                index = self._part(events, m, "refusal")
                m.refusal = [*(m.refusal or []), refusal]
                events.append(
                    (
                        "response.refusal.delta",
                        {**m.base(), "content_index": index, "delta": refusal},
                    )
                )
        annotations = _annotations(delta.get("annotations"))
        if annotations:
            self._close_reasoning(events, ci)
            m = self._message(events, ci, delta)
            if not m.done:
                index = self._part(events, m, "output_text")
                for annotation in annotations:
                    m.annotations.append(annotation)
                    events.append(
                        (
                            "response.output_text.annotation.added",
                            {
                                **m.base(),
                                "content_index": index,
                                "annotation_index": len(m.annotations) - 1,
                                "annotation": annotation,
                            },
                        )
                    )
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
                            {**f.base(), "call_id": f.call_id, "delta": args},
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

    def _calls_tools(self, ci: int) -> bool:
        return any(c == ci and kind == "function_call" for c, kind, _ in self._items)

    def _close(self, events: list[Event], item: _Item, status: str) -> None:
        item.done = True
        text = "".join(item.text)
        base = item.base()
        if item.kind == "message":
            refusal = None if item.refusal is None else "".join(item.refusal)
            for index, kind in enumerate(item.parts):
                if kind == "output_text":
                    part = {
                        **_output_text_part(text),
                        "annotations": list(item.annotations),
                        "logprobs": list(item.logprobs),
                    }
                    events.append(
                        (
                            "response.output_text.done",
                            {
                                **base,
                                "content_index": index,
                                "text": text,
                                "logprobs": list(item.logprobs),
                            },
                        )
                    )
                else:
                    part = {"type": "refusal", "refusal": refusal or ""}
                    events.append(
                        (
                            "response.refusal.done",
                            {**base, "content_index": index, "refusal": refusal or ""},
                        )
                    )
                events.append(
                    ("response.content_part.done", {**base, "content_index": index, "part": part})
                )
            done = _message_item(
                item.item_id,
                item.role,
                text,
                status,
                refusal=refusal,
                annotations=item.annotations,
                phase="commentary" if self._calls_tools(item.choice) else "final_answer",
                logprobs=item.logprobs,
            )
        elif item.kind == "reasoning":
            events.append(("response.reasoning.done", {**base, "content_index": 0, "text": text}))
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
        """Events for a whole non-streamed completion: each choice's message is fed as one
        delta, so every item is added, gets its content in one delta, and is done."""
        events: list[Event] = []
        choices = completion.get("choices") if isinstance(completion, Mapping) else None
        if not isinstance(choices, list):
            return events
        for n, choice in enumerate(choices):
            if not isinstance(choice, Mapping) or not isinstance(choice.get("message"), Mapping):
                continue
            index = choice.get("index", n)
            chunk = {
                "choices": [
                    {
                        "index": index if isinstance(index, int) else n,
                        "delta": _as_delta(choice["message"]),
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ]
            }
            events.extend(self.feed(chunk))
        return events
