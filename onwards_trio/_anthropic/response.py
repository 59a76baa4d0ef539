"""Chat completion → Anthropic ``Message`` (sans-I/O).

The pieces both the whole-body and the streamed translation need — stop reasons, usage,
tool inputs — live here once; :mod:`.stream` reuses them.

* reasoning (``reasoning_content`` / ``reasoning`` / ``reasoning_details``, merged as the
  Responses adapter does) → a ``thinking`` block first, with an empty ``signature`` (a Chat
  upstream signs nothing; clients send it back and the request translation drops it);
* ``content`` → a ``text`` block, ``refusal`` → a ``text`` block and ``stop_reason:
  refusal``; ``tool_calls`` → ``tool_use`` blocks (arguments parsed; unparsable ones become
  ``{}``: Anthropic's ``input`` is always an object);
* ``finish_reason`` stop/length/tool_calls/content_filter → end_turn/max_tokens/tool_use/
  refusal; a ``stop_reason`` string naming one of the request's ``stop_sequences`` (vLLM and
  others report the matched one) → ``stop_sequence`` with that ``stop_sequence``;
* usage: ``input_tokens`` is the prompt minus cached and cache-written tokens (Anthropic
  counts those separately), ``cache_read_input_tokens`` = ``cached_tokens``,
  ``output_tokens`` = ``completion_tokens`` (reasoning included, as Anthropic bills it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from onwards_trio._loop.items import reasoning_text

__all__ = [
    "InvalidCompletion",
    "stop_reason",
    "to_message",
    "tool_input",
    "usage",
]

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class InvalidCompletion(ValueError):
    """The upstream's answer is not a chat completion."""


def stop_reason(
    finish_reason: Any, matched: Any, stop_sequences: Sequence[str], tool_use: bool
) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` for a choice's ``finish_reason`` and ``stop_reason``."""
    if type(matched) is str and matched in stop_sequences:
        return "stop_sequence", matched
    reason = _STOP_REASONS.get(finish_reason, "end_turn")
    if tool_use and reason == "end_turn":
        reason = "tool_use"  # some servers say "stop" after tool calls
    return reason, None


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def usage(chat_usage: Any) -> dict[str, int]:
    """Anthropic ``usage`` for a Chat ``usage`` object (zeros when there is none)."""
    if not isinstance(chat_usage, Mapping):
        return {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
    details = chat_usage.get("prompt_tokens_details")
    cached = created = 0
    if isinstance(details, Mapping):
        cached = _int(details.get("cached_tokens"))
        created = _int(details.get("cache_creation_tokens") or details.get("cache_write_tokens"))
    prompt = _int(chat_usage.get("prompt_tokens"))
    return {
        "input_tokens": max(0, prompt - cached - created),
        "output_tokens": _int(chat_usage.get("completion_tokens")),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    if type(arguments) is str and arguments:
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return parsed if type(parsed) is dict else {}
    return {}


def _text(content: Any) -> str:
    if type(content) is str:
        return content
    if type(content) is list:  # content parts, as some servers answer
        return "".join(p["text"] for p in content if type(p) is dict and type(p.get("text")) is str)
    return ""


def to_message(
    completion: Any, *, message_id: str, model: str, stop_sequences: Sequence[str] = ()
) -> dict[str, Any]:
    """The Anthropic ``Message`` for a chat completion (its first choice)."""
    choices = completion.get("choices") if type(completion) is dict else None
    if type(choices) is not list or not choices or type(choices[0]) is not dict:
        raise InvalidCompletion("the upstream answer has no choices")
    choice = choices[0]
    message = choice.get("message")
    if type(message) is not dict:
        raise InvalidCompletion("the upstream answer has no message")
    content: list[dict[str, Any]] = []
    thinking = reasoning_text(message)
    if thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    text = _text(message.get("content"))
    refusal = message.get("refusal")
    if type(refusal) is str and refusal:
        text += refusal
    if text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    if type(calls) is list:
        for k, call in enumerate(calls):
            fn = call.get("function") if type(call) is dict else None
            if type(fn) is not dict:
                continue
            call_id = call.get("id")
            content.append(
                {
                    "type": "tool_use",
                    "id": call_id if type(call_id) is str and call_id else f"toolu_{k}",
                    "name": fn.get("name") if type(fn.get("name")) is str else "",
                    "input": tool_input(fn.get("arguments")),
                }
            )
    reason, sequence = stop_reason(
        choice.get("finish_reason"),
        choice.get("stop_reason"),
        stop_sequences,
        any(b["type"] == "tool_use" for b in content),
    )
    if type(refusal) is str and refusal:
        reason = "refusal"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(completion.get("usage")),
    }
