"""Scripted model answers: what a test declares, and how it becomes Chat Completions bytes.

A script is plain data: a ``str`` (that text, every time), a :class:`Reply` (built by
:func:`text`, :func:`tool_calls`, :func:`refusal`, :func:`error`, :func:`rate_limited`), a
``dict`` (a complete ``chat.completion`` body, sent as it is), a list of those (one per call, in
order; running out is a test failure, not a silent repeat), or a callable that sees the
:class:`~onwards_trio.testing.ModelCall` and returns any of the single forms.

Every answer is rendered as the upstream would send it: a JSON body, or — when the request asked
for ``stream: true`` — SSE chunks (role, content pieces or tool-call deltas, the finish chunk,
a usage chunk when ``stream_options.include_usage`` asks for one, ``[DONE]``), so the gateway's
own parsing, the loop and the SDKs all see what a real provider would give them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import attrs
import orjson

from onwards_trio._app.demo import chat_chunk

if TYPE_CHECKING:
    from onwards_trio.testing._records import ModelCall

__all__ = [
    "Call",
    "Reply",
    "Script",
    "Usage",
    "call",
    "error",
    "rate_limited",
    "refusal",
    "text",
    "tool_calls",
]

_CREATED = 1_700_000_000
_ids = itertools.count(1)


@attrs.frozen
class Usage:
    """Token counts the scripted model reports (``None``: counted from the words)."""

    prompt_tokens: int
    completion_tokens: int

    def wire(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@attrs.frozen
class Call:
    """One tool call the scripted model makes (``arguments`` is sent as JSON text)."""

    name: str
    arguments: Any = attrs.field(factory=dict)
    id: str | None = None

    def wire(self) -> dict[str, Any]:
        args = self.arguments if isinstance(self.arguments, str) else orjson.dumps(self.arguments)
        return {
            "id": self.id or f"call_onwards_{next(_ids)}",
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": args if isinstance(args, str) else args.decode(),
            },
        }


@attrs.frozen
class Reply:
    """One scripted answer. Build it with :func:`text`, :func:`tool_calls`, :func:`refusal`,
    :func:`error` or :func:`rate_limited`; the timing fields apply to any of them.

    ``first_byte_delay`` waits before the response head (a slow first byte); ``chunk_delay``
    waits between streamed chunks; ``break_after`` aborts the connection after that many
    streamed chunks (a stream the provider breaks).
    """

    content: str | None = None
    calls: tuple[Call, ...] = ()
    refusal: str | None = None
    chunks: tuple[str, ...] | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    break_after: int | None = None

    @property
    def is_error(self) -> bool:
        return self.status >= 300


def text(
    content: str,
    *,
    chunks: Sequence[str] | None = None,
    usage: Usage | None = None,
    finish_reason: str = "stop",
    first_byte_delay: float = 0.0,
    chunk_delay: float = 0.0,
    break_after: int | None = None,
) -> Reply:
    """Answer ``content``; streamed word by word unless ``chunks`` gives the pieces."""
    if chunks is not None and "".join(chunks) != content:
        raise ValueError("the chunks must add up to the content")
    return Reply(
        content=content,
        chunks=tuple(chunks) if chunks is not None else None,
        usage=usage,
        finish_reason=finish_reason,
        first_byte_delay=first_byte_delay,
        chunk_delay=chunk_delay,
        break_after=break_after,
    )


def call(name: str, arguments: Any = None, *, id: str | None = None) -> Call:
    """A tool call for :func:`tool_calls` (``arguments``: a JSON-able value or JSON text)."""
    return Call(name, {} if arguments is None else arguments, id)


def tool_calls(
    *calls: Call,
    content: str | None = None,
    usage: Usage | None = None,
    first_byte_delay: float = 0.0,
    chunk_delay: float = 0.0,
    break_after: int | None = None,
) -> Reply:
    """Ask for these tool calls (``finish_reason: tool_calls``)."""
    if not calls:
        raise ValueError("tool_calls() needs at least one call(...)")
    return Reply(
        content=content,
        calls=calls,
        usage=usage,
        finish_reason="tool_calls",
        first_byte_delay=first_byte_delay,
        chunk_delay=chunk_delay,
        break_after=break_after,
    )


def refusal(message: str, *, usage: Usage | None = None) -> Reply:
    """Refuse: the message carries ``refusal`` and no content, as OpenAI models do."""
    return Reply(refusal=message, usage=usage, finish_reason="stop")


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error(
    status: int,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    first_byte_delay: float = 0.0,
) -> Reply:
    """Answer HTTP ``status`` with ``body``: a message (wrapped in the OpenAI error envelope),
    any JSON-able value, or raw ``bytes``."""
    if not 300 <= status <= 599:
        raise ValueError("an error status is 300-599")
    if body is None or isinstance(body, str):
        body = {
            "error": {
                "message": body or f"scripted error {status}",
                "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "error"),
                "param": None,
                "code": None,
            }
        }
    return Reply(
        status=status, body=body, headers=dict(headers or {}), first_byte_delay=first_byte_delay
    )


def rate_limited(retry_after: float = 1.0, message: str = "Rate limit reached.") -> Reply:
    """A 429 with ``Retry-After`` (seconds), which the SDKs honour before retrying."""
    value = f"{retry_after:g}"
    return error(
        429,
        {
            "error": {
                "message": message,
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"retry-after": value, "retry-after-ms": f"{retry_after * 1000:g}"},
    )


ScriptItem: TypeAlias = "str | Reply | dict[str, Any]"
Script: TypeAlias = (
    "str | Reply | dict[str, Any] | Sequence[str | Reply | dict[str, Any]]"
    " | Callable[[ModelCall], str | Reply | dict[str, Any]]"
)


def as_reply(item: Any) -> Reply:
    """A single script item as a :class:`Reply` (``TypeError`` for anything else)."""
    if isinstance(item, Reply):
        return item
    if isinstance(item, str):
        return text(item)
    if isinstance(item, dict):
        return Reply(body=item)
    raise TypeError(f"a scripted answer is a str, a Reply or a dict, not {type(item).__name__}")


# -- rendering -----------------------------------------------------------------------------------


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(p.get("text")) for p in value if isinstance(p, dict))
    return 0


def _usage(reply: Reply, request: Mapping[str, Any]) -> dict[str, int]:
    if reply.usage is not None:
        return reply.usage.wire()
    messages = request.get("messages")
    prompt = sum(_words(m.get("content")) for m in messages or () if isinstance(m, dict))
    completion = _words(reply.content) + _words(reply.refusal)
    return Usage(prompt, completion).wire()


def _message(reply: Reply, calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if reply.refusal is not None:
        message["refusal"] = reply.refusal
    if calls:
        message["tool_calls"] = calls
    return message


def render_json(reply: Reply, request: Mapping[str, Any]) -> bytes:
    """The non-streamed answer body."""
    if reply.body is not None:
        return reply.body if isinstance(reply.body, bytes) else orjson.dumps(reply.body)
    calls = [c.wire() for c in reply.calls]
    return orjson.dumps(
        {
            "id": f"chatcmpl-onwards-{next(_ids)}",
            "object": "chat.completion",
            "created": _CREATED,
            "model": str(request.get("model") or "scripted"),
            "choices": [
                {
                    "index": 0,
                    "message": _message(reply, calls),
                    "finish_reason": reply.finish_reason or "stop",
                }
            ],
            "usage": _usage(reply, request),
        }
    )


def _pieces(value: str) -> list[str]:
    words = value.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def render_chunks(reply: Reply, request: Mapping[str, Any]) -> list[bytes]:
    """The streamed answer as SSE events (one network chunk each)."""
    cid = f"chatcmpl-onwards-{next(_ids)}"
    model = str(request.get("model") or "scripted")

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return chat_chunk(cid, model, delta, finish)

    out = [chunk({"role": "assistant", "content": ""})]
    if reply.content:
        pieces = list(reply.chunks) if reply.chunks is not None else _pieces(reply.content)
        out.extend(chunk({"content": p}) for p in pieces)
    if reply.refusal is not None:
        out.extend(chunk({"refusal": p}) for p in _pieces(reply.refusal))
    for i, wire in enumerate(c.wire() for c in reply.calls):
        fn = wire["function"]
        head = {"index": i, "id": wire["id"], "type": "function"}
        out.append(
            chunk({"tool_calls": [{**head, "function": {"name": fn["name"], "arguments": ""}}]})
        )
        out.append(
            chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
        )
    out.append(chunk({}, reply.finish_reason or "stop"))
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        out.append(chat_chunk(cid, model, None, usage=_usage(reply, request)))
    out.append(b"data: [DONE]\n\n")
    return out
