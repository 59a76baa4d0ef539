"""``POST /v1/responses/compact``: a conversation compacted into a window the client can send
back as input, over any Chat Completions upstream.

The model summarises: the conversation (``previous_response_id``'s replayed items, then
``input``) is rendered as a plain transcript inside one user message that asks for a summary.
A transcript rather than the original message list because a summary is a request *about* the
conversation, not its next turn: any chat model, even one that only answers the last message,
sees all of it. The answer becomes a ``compaction`` item (:func:`.input.compaction_item`),
the whole window: OpenAI also keeps the user messages verbatim before it, but the SDK's
``CompactedResponse`` cannot represent a user message in ``output``, and the summary holds
them. Nothing is stored: a compacted window is not a response and has no id to continue.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson

from onwards_trio import _errors as errors
from onwards_trio._errors import HTTPError
from onwards_trio._loop.items import responses_usage
from onwards_trio._responses.input import (
    chat_content_text,
    compaction_item,
    items_to_messages,
    normalize_input,
)
from onwards_trio._responses.model_transport import ProxyModelTransport

__all__ = ["compact_conversation", "compaction_request", "transcript"]

_ASK = (
    "Summarise the conversation below so that it can be continued from the summary alone. "
    "Keep every fact, name, number, decision and open question; leave out pleasantries.\n\n"
)
_EMPTY_USAGE = {
    "input_tokens": 0,
    "output_tokens": 0,
    "total_tokens": 0,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 0},
}


def transcript(items: Sequence[dict[str, Any]]) -> str:
    """The conversation as ``role: text`` lines (tool calls and outputs included)."""
    lines = []
    for message in items_to_messages(items):
        role = message.get("role", "user")
        text = chat_content_text(message.get("content"))
        if text:
            lines.append(f"{role}: {text}")
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            lines.append(f"{role} called {fn.get('name')}({fn.get('arguments')})")
    return "\n".join(lines)


def compaction_request(body: Any) -> tuple[str, list[dict[str, Any]], str | None]:
    """Validate a compact body: ``(model, input items, previous_response_id)``; 400 otherwise."""
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise errors.invalid_request("'model' must be a non-empty string.", "model")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise errors.invalid_request(
            "'previous_response_id' must be a string.", "previous_response_id"
        )
    for key in ("instructions", "prompt_cache_key"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise errors.invalid_request(f"'{key}' must be a string.", key)
    raw = body.get("input")
    items = [] if raw is None else normalize_input(raw)
    if not items and previous is None:
        raise errors.invalid_request("'input' is required.", "input")
    return model, items, previous


async def compact_conversation(
    transport: ProxyModelTransport,
    body: dict[str, Any],
    items: Sequence[dict[str, Any]],
    max_body: int,
) -> dict[str, Any]:
    """Ask the model for the summary of ``items``; the ``response.compaction`` object. A model
    call the gateway or the upstream refused raises :class:`HTTPError` with that reply."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    messages.append({"role": "user", "content": _ASK + transcript(items)})
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if isinstance(body.get("prompt_cache_key"), str):
        chat["prompt_cache_key"] = body["prompt_cache_key"]
    async with transport.open(orjson.dumps(chat), stream=False) as reply:
        raw = bytearray()
        async for chunk in reply.body:
            raw += chunk
            if len(raw) > max_body:
                raise HTTPError(
                    502,
                    errors.error_body(
                        "The model's answer is too large.", "server_error", "server_error"
                    ),
                )
        if not 200 <= reply.status < 300:
            raise HTTPError(reply.status, bytes(raw))
    try:
        completion = orjson.loads(raw)
        summary = completion["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        summary = None
    if not isinstance(summary, str):
        raise HTTPError(
            502,
            errors.error_body(
                "The model gave no summary to compact the conversation with.",
                "server_error",
                "server_error",
            ),
        )
    return {
        "id": f"resp_{secrets.token_hex(24)}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [compaction_item(summary)],
        "usage": responses_usage(completion.get("usage")) or dict(_EMPTY_USAGE),
    }
