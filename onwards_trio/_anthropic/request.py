"""Anthropic Messages request → Chat Completions request (sans-I/O, one pass).

The walk validates as it translates: every refusal names the JSON path of the offending
value (``messages[1].content[0].source.type``), so a client learns exactly what to fix, and a
valid request is never walked twice. What Chat cannot express is refused rather than
dropped silently (server tools, file ids, URL documents); what only steers Anthropic's own
infrastructure (``cache_control``, ``service_tier``, ``container``…) is ignored.

Mapping (docs/anthropic.md has the table):

* ``system`` (string or text blocks) → a leading ``system`` message;
* ``text`` / ``image`` (base64 → data URL, URL) / ``document`` (PDF base64 → a ``file``
  part, plain text and content sources → text) blocks → content parts;
* ``tool_use`` → the assistant's ``tool_calls``; ``tool_result`` → ``tool`` messages placed
  right after that assistant turn (``is_error`` prefixes the text with ``Error:``; images in a
  result follow in a user message, as Chat tool messages carry text only);
* ``thinking`` / ``redacted_thinking`` blocks of earlier turns are dropped (Chat has no
  portable way to send reasoning back);
* ``tools`` → function tools; ``tool_choice`` auto/any/tool/none → auto/required/named/none,
  ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``;
* ``stop_sequences`` → ``stop``; ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` as is;
  ``metadata.user_id`` → ``user``;
* ``thinking.budget_tokens`` → ``reasoning_effort`` (and the absolute budget for providers that
  take one, :mod:`onwards_trio._proxy.reasoning`); ``output_config.effort`` → the effort;
  ``output_config.format`` → ``response_format``.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson

from onwards_trio._config import json_type_name
from onwards_trio._proxy.reasoning import effort_for_budget

__all__ = ["ChatCall", "TranslationError", "count_tokens", "to_chat"]

_EFFORTS = frozenset({"low", "medium", "high", "xhigh", "max"})
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


class TranslationError(ValueError):
    """The request cannot be served; ``path`` names the offending field."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


@attrs.frozen
class ChatCall:
    """The Chat request for one Messages request, and what the answer's translation needs."""

    body: dict[str, Any]
    stream: bool
    budget: int | None  # thinking.budget_tokens, for providers that take an absolute budget
    stop_sequences: tuple[str, ...]


# --- typed readers (each names the path on failure) -----------------------------------------


def _expect(value: Any, kind: type, noun: str, path: str) -> Any:
    if type(value) is not kind:
        raise TranslationError(path, f"expected {noun}, got {json_type_name(value)}")
    return value


def _str(obj: dict[str, Any], key: str, path: str) -> str:
    value = obj.get(key)
    if value is None:
        raise TranslationError(f"{path}.{key}" if path else key, "required field missing")
    return _expect(value, str, "a string", f"{path}.{key}" if path else key)  # type: ignore[no-any-return]


def _opt(obj: dict[str, Any], key: str, kind: type, noun: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if kind is float:
        if type(value) not in (int, float):
            raise TranslationError(key, f"expected a number, got {json_type_name(value)}")
        return value
    return _expect(value, kind, noun, key)


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _blocks(value: Any, path: str) -> list[dict[str, Any]]:
    """A content array whose items are typed objects."""
    _expect(value, list, "a string or an array of content blocks", path)
    for i, block in enumerate(value):
        where = _join(path, i)
        _expect(block, dict, "an object", where)
        _str(block, "type", where)
    return value  # type: ignore[no-any-return]


# --- content --------------------------------------------------------------------------------


def _image(block: dict[str, Any], path: str) -> dict[str, Any]:
    source = _expect(block.get("source"), dict, "an object", f"{path}.source")
    kind = _str(source, "type", f"{path}.source")
    if kind == "base64":
        media = _str(source, "media_type", f"{path}.source")
        if media not in _IMAGE_TYPES:
            raise TranslationError(
                f"{path}.source.media_type", f"expected one of {', '.join(sorted(_IMAGE_TYPES))}"
            )
        data = _str(source, "data", f"{path}.source")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        url = _str(source, "url", f"{path}.source")
    else:
        raise TranslationError(
            f"{path}.source.type",
            f"image source '{kind}' cannot be sent to a Chat Completions upstream "
            "(use 'base64' or 'url')",
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """A document as Chat parts: PDFs as a ``file`` part, text sources as text."""
    source = _expect(block.get("source"), dict, "an object", f"{path}.source")
    kind = _str(source, "type", f"{path}.source")
    title = block.get("title")
    title = title if type(title) is str and title else None
    if kind == "base64":
        media = _str(source, "media_type", f"{path}.source")
        if media != "application/pdf":
            raise TranslationError(f"{path}.source.media_type", "expected 'application/pdf'")
        data = _str(source, "data", f"{path}.source")
        return [
            {
                "type": "file",
                "file": {
                    "filename": title or "document.pdf",
                    "file_data": f"data:application/pdf;base64,{data}",
                },
            }
        ]
    if kind == "text":
        text = _str(source, "data", f"{path}.source")
    elif kind == "content":
        content = source.get("content")
        if type(content) is str:
            text = content
        else:
            texts = []
            for i, inner in enumerate(_blocks(content, f"{path}.source.content")):
                if inner["type"] == "text":
                    texts.append(_str(inner, "text", _join(f"{path}.source.content", i)))
            text = "\n".join(texts)
    else:
        raise TranslationError(
            f"{path}.source.type",
            f"document source '{kind}' cannot be sent to a Chat Completions upstream "
            "(use 'base64' PDF, 'text' or 'content')",
        )
    return [{"type": "text", "text": f"{title}\n\n{text}" if title else text}]


def _tool_result(block: dict[str, Any], path: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    call_id = _str(block, "tool_use_id", path)
    content = block.get("content")
    if content is None:
        text = ""
    elif type(content) is str:
        text = content
    else:
        texts = []
        for i, inner in enumerate(_blocks(content, f"{path}.content")):
            where = _join(f"{path}.content", i)
            kind = inner["type"]
            if kind == "text":
                texts.append(_str(inner, "text", where))
            elif kind == "image":
                images.append(_image(inner, where))
            elif kind == "document":
                texts.extend(p["text"] for p in _document(inner, where) if p["type"] == "text")
            else:
                raise TranslationError(f"{where}.type", f"unsupported tool result block '{kind}'")
        text = "\n".join(texts)
    is_error = block.get("is_error")
    if is_error is not None and type(is_error) is not bool:
        raise TranslationError(
            f"{path}.is_error", f"expected a boolean, got {json_type_name(is_error)}"
        )
    if is_error:
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _user(content: list[dict[str, Any]], path: str, out: list[dict[str, Any]]) -> None:
    parts: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []  # from tool results: Chat tool messages are text only
    for i, block in enumerate(content):
        where = _join(path, i)
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": _str(block, "text", where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "document":
            parts.extend(_document(block, where))
        elif kind == "tool_result":
            results.append(_tool_result(block, where, images))
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(
                f"{where}.type", f"content block '{kind}' cannot be sent to a Chat upstream"
            )
    out.extend(results)  # Chat wants tool answers right after the assistant's calls
    parts = images + parts
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})
        else:
            out.append({"role": "user", "content": parts})


def _assistant(content: list[dict[str, Any]], path: str, out: list[dict[str, Any]]) -> None:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        where = _join(path, i)
        kind = block["type"]
        if kind == "text":
            texts.append(_str(block, "text", where))
        elif kind == "tool_use":
            call_id = _str(block, "id", where)
            name = _str(block, "name", where)
            args = block.get("input")
            args = {} if args is None else _expect(args, dict, "an object", f"{where}.input")
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(
                f"{where}.type", f"content block '{kind}' cannot be sent to a Chat upstream"
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    out.append(message)


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise TranslationError("messages", "required field missing")
    _expect(value, list, "an array", "messages")
    if not value:
        raise TranslationError("messages", "at least one message is required")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        path = f"messages[{i}]"
        _expect(message, dict, "an object", path)
        role = _str(message, "role", path)
        if role not in ("user", "assistant"):
            raise TranslationError(f"{path}.role", "expected one of 'user', 'assistant'")
        content = message.get("content")
        if content is None:
            raise TranslationError(f"{path}.content", "required field missing")
        if type(content) is str:
            out.append({"role": role, "content": content})
            continue
        blocks = _blocks(content, f"{path}.content")
        if role == "user":
            _user(blocks, f"{path}.content", out)
        else:
            _assistant(blocks, f"{path}.content", out)
    return out


def _system(value: Any) -> str:
    if type(value) is str:
        return value
    texts = []
    for i, block in enumerate(_blocks(value, "system")):
        if block["type"] != "text":
            raise TranslationError(f"system[{i}].type", "expected 'text'")
        texts.append(_str(block, "text", f"system[{i}]"))
    return "\n\n".join(texts)


# --- tools ----------------------------------------------------------------------------------


def _tools(value: Any) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(_expect(value, list, "an array", "tools")):
        path = f"tools[{i}]"
        _expect(tool, dict, "an object", path)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise TranslationError(
                f"{path}.type",
                f"server tool '{kind}' cannot run on a Chat Completions upstream "
                "(only client tools with an input_schema)",
            )
        name = _str(tool, "name", path)
        schema = tool.get("input_schema")
        if schema is None:
            raise TranslationError(f"{path}.input_schema", "required field missing")
        function: dict[str, Any] = {
            "name": name,
            "parameters": _expect(schema, dict, "an object", f"{path}.input_schema"),
        }
        description = tool.get("description")
        if description is not None:
            function["description"] = _expect(description, str, "a string", f"{path}.description")
        strict = tool.get("strict")
        if strict is not None:
            function["strict"] = _expect(strict, bool, "a boolean", f"{path}.strict")
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    _expect(value, dict, "an object", "tool_choice")
    kind = _str(value, "type", "tool_choice")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        chat["tool_choice"] = {
            "type": "function",
            "function": {"name": _str(value, "name", "tool_choice")},
        }
    else:
        raise TranslationError("tool_choice.type", "expected one of 'auto', 'any', 'tool', 'none'")
    disable = value.get("disable_parallel_tool_use")
    if disable is not None:
        _expect(disable, bool, "a boolean", "tool_choice.disable_parallel_tool_use")
        if disable and kind != "none":
            chat["parallel_tool_calls"] = False


# --- the request ----------------------------------------------------------------------------


def _thinking(value: Any) -> int | None:
    """The budget of ``thinking: {type: enabled}`` (``None`` for the other kinds)."""
    _expect(value, dict, "an object", "thinking")
    kind = _str(value, "type", "thinking")
    if kind == "enabled":
        budget = value.get("budget_tokens")
        if type(budget) is not int or budget < 1024:
            raise TranslationError("thinking.budget_tokens", "expected an integer >= 1024")
        return budget
    if kind in ("disabled", "adaptive", "between_tools"):
        return None
    raise TranslationError("thinking.type", "expected one of 'enabled', 'disabled', 'adaptive'")


def _output_config(value: Any, chat: dict[str, Any]) -> None:
    _expect(value, dict, "an object", "output_config")
    effort = value.get("effort")
    if effort is not None:
        if type(effort) is not str or effort not in _EFFORTS:
            raise TranslationError(
                "output_config.effort", "expected one of 'low', 'medium', 'high', 'xhigh', 'max'"
            )
        chat["reasoning_effort"] = effort
    fmt = value.get("format")
    if fmt is not None:
        _expect(fmt, dict, "an object", "output_config.format")
        if fmt.get("type") != "json_schema":
            raise TranslationError("output_config.format.type", "expected 'json_schema'")
        schema = _expect(fmt.get("schema"), dict, "an object", "output_config.format.schema")
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }


def to_chat(body: Any, *, count_only: bool = False) -> ChatCall:
    """Translate a Messages request; :class:`TranslationError` names what is wrong.

    ``count_only`` is for ``/v1/messages/count_tokens``, whose requests carry no
    ``max_tokens``.
    """
    if type(body) is not dict:
        raise TranslationError("", "the request body must be a JSON object")
    model = _str(body, "model", "")
    chat: dict[str, Any] = {"model": model}
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _system(system)})
    messages.extend(_messages(body.get("messages")))
    chat["messages"] = messages
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        if not count_only:
            raise TranslationError("max_tokens", "required field missing")
    elif type(max_tokens) is not int or max_tokens < 1:
        raise TranslationError("max_tokens", "expected an integer >= 1")
    else:
        chat["max_tokens"] = max_tokens
    stop: tuple[str, ...] = ()
    sequences = body.get("stop_sequences")
    if sequences is not None:
        for i, s in enumerate(_expect(sequences, list, "an array", "stop_sequences")):
            _expect(s, str, "a string", f"stop_sequences[{i}]")
        stop = tuple(sequences)
        if stop:
            chat["stop"] = list(stop)
    for key in ("temperature", "top_p"):
        value = _opt(body, key, float, "a number")
        if value is not None:
            chat[key] = value
    top_k = _opt(body, "top_k", int, "an integer")
    if top_k is not None:
        chat["top_k"] = top_k
    metadata = _opt(body, "metadata", dict, "an object")
    if metadata is not None and metadata.get("user_id") is not None:
        chat["user"] = _expect(metadata["user_id"], str, "a string", "metadata.user_id")
    tools = body.get("tools")
    if tools is not None:
        converted = _tools(tools)
        if converted:
            chat["tools"] = converted
    choice = body.get("tool_choice")
    if choice is not None:
        scratch: dict[str, Any] = {}
        _tool_choice(choice, scratch)
        if "tools" in chat:  # Chat upstreams refuse a tool_choice without tools
            chat.update(scratch)
    budget = None
    thinking = body.get("thinking")
    if thinking is not None:
        budget = _thinking(thinking)
        if budget is not None:
            chat["reasoning_effort"] = effort_for_budget(budget)
    output_config = body.get("output_config")
    if output_config is not None:
        _output_config(output_config, chat)
    stream = _opt(body, "stream", bool, "a boolean") is True
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return ChatCall(chat, stream, budget, stop)


def count_tokens(call: ChatCall) -> int:
    """An estimate of the prompt's tokens: about four characters a token for text (the
    common rule of thumb for BPE tokenisers on English and code), tool definitions counted as
    their JSON, a fixed 1,600 per image or file (Anthropic's own figure for a ~1.15-megapixel
    image), three per message for the chat framing. Chat upstreams have no counting
    endpoint, so this is an estimate, never an exact count."""
    chars = 0
    fixed = 0
    for message in call.body["messages"]:
        fixed += 3
        content = message.get("content")
        if type(content) is str:
            chars += len(content)
        elif type(content) is list:
            for part in content:
                if part["type"] == "text":
                    chars += len(part["text"])
                else:
                    fixed += 1600
        for tool_call in message.get("tool_calls") or ():
            chars += len(tool_call["function"]["name"]) + len(tool_call["function"]["arguments"])
    tools = call.body.get("tools")
    if tools:
        chars += len(orjson.dumps(tools))
    return fixed + (chars + 3) // 4
