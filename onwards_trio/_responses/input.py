"""Open Responses input: validate a ``POST /v1/responses`` body and turn it into Chat Completions.

Pure functions, no I/O. :func:`parse_request` checks the body and answers a JSON 400 that names
the offending field (``input[2].content[0].type``) instead of the framework errors onwards gives;
:func:`to_chat_request` builds the upstream chat request per reference §1.20.2 with the SPEC
fixes: an item without ``type`` is a message (§5.3.17), ``text.format`` becomes
``response_format`` (§5.3.19), and ``previous_response_id`` replays the stored conversation —
its inputs *and* outputs — not only its output (§5.3.21).

Input items are normalised once (string content → parts, string input → one user message) so
that what is stored, listed by ``GET /v1/responses/{id}/input_items`` and replayed later is the
same shape the client would get back from OpenAI.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import orjson

from onwards_trio._config import REASONING_EFFORTS, json_type_name
from onwards_trio._errors import HTTPError, error_body, invalid_request
from onwards_trio._loop.transition import LOOP_CONTROL

__all__ = [
    "INCLUDE_VALUES",
    "MAX_INPUT_ITEMS",
    "OFF_LOOP_ITEMS",
    "ResponsesRequest",
    "ToolLike",
    "assign_item_ids",
    "chat_content_text",
    "check_call_ids",
    "compaction_item",
    "convert_tool_choice",
    "convert_tools",
    "items_to_messages",
    "new_item_id",
    "normalize_input",
    "parse_request",
    "previous_response_not_found",
    "resolve_references",
    "resolve_server_tools",
    "text_format_to_response_format",
    "to_chat_request",
    "tool_schema_to_chat",
]

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_PART_TYPES = frozenset({"input_text", "output_text", "refusal", "input_image", "input_file"})
_TOOL_CHOICE_STRINGS = frozenset({"none", "auto", "required"})
# ``include`` values: logprobs are asked upstream and returned; encrypted reasoning does not
# exist over Chat Completions, so it is accepted and the field stays absent.
INCLUDE_VALUES = frozenset({"message.output_text.logprobs", "reasoning.encrypted_content"})
_COMPACTION_PREFIX = "onwards.compaction.v1."
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
# Item id prefixes as OpenAI uses them, so ids look familiar in logs and SDK objects.
_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "compaction": "cmp",
}


class ToolLike(Protocol):
    """What conversion needs from a server tool (the loop's ``ToolSchema`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def parameters(self) -> Any: ...
    @property
    def strict(self) -> bool: ...


@attrs.frozen
class ResponsesRequest:
    """A validated Responses request. ``body`` is the client's JSON, kept for echoing."""

    body: dict[str, Any]
    model: str
    input_items: list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    tools: list[dict[str, Any]] = attrs.field(factory=list)  # client function tools
    hosted_tools: list[str] = attrs.field(factory=list)  # names of requested server tools
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    truncation: str | None = None
    service_tier: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_logprobs: int | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    include: tuple[str, ...] = ()
    allowed_tools: tuple[str, ...] | None = None  # tool_choice {type: allowed_tools}

    @property
    def echoed_tools(self) -> list[dict[str, Any]]:
        """The client's tools as a Response object reports them (hosted entries removed):
        function tools with every field the schema requires, ``strict`` as honoured."""
        return [_echo_tool(t) for t in self.tools]


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        return dict(tool)
    return {
        **tool,
        "description": tool.get("description"),
        "parameters": tool.get("parameters"),
        "strict": tool.get("strict") if tool.get("strict") is not None else True,
    }


T = TypeVar("T")


def _bad(message: str, param: str) -> HTTPError:
    return invalid_request(message, param)


def _opt(body: dict[str, Any], key: str, kind: type[T], noun: str) -> T | None:
    """``body[key]`` when present and of ``kind``; absent or null is None; else a 400."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind):
        raise _bad(f"'{key}' must be {noun}, got {json_type_name(value)}.", key)
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    return _opt(body, key, str, "a string")


def _opt_bool(body: dict[str, Any], key: str) -> bool | None:
    return _opt(body, key, bool, "a boolean")


def _opt_number(body: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{key}' must be a number, got {json_type_name(value)}.", key)
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g}, got {value}.", key)
    return float(value)


def _opt_positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"'{key}' must be a positive integer, got {value!r}.", key)
    return value


def _opt_object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    return _opt(body, key, dict, "an object")


# -- items ------------------------------------------------------------------------------------


def _normalize_part(part: Any, role: str, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _bad(f"'{where}' must be an object, got {json_type_name(part)}.", where)
    kind = part.get("type")
    if kind not in _PART_TYPES:
        raise _bad(
            f"'{where}.type' must be one of {', '.join(sorted(_PART_TYPES))}, got {kind!r}.",
            f"{where}.type",
        )
    if kind in ("input_text", "output_text"):
        if not isinstance(part.get("text"), str):
            raise _bad(f"'{where}.text' must be a string.", f"{where}.text")
        if kind == "output_text":
            return {
                "annotations": [],
                "logprobs": [],
                **part,
            }
        return dict(part)
    if kind == "refusal":
        if not isinstance(part.get("refusal"), str):
            raise _bad(f"'{where}.refusal' must be a string.", f"{where}.refusal")
        return dict(part)
    if kind == "input_image":
        url = part.get("image_url")
        if url is not None and not isinstance(url, str):
            raise _bad(f"'{where}.image_url' must be a string.", f"{where}.image_url")
        if url is None and not isinstance(part.get("file_id"), str):
            raise _bad(f"'{where}' needs an 'image_url' or a 'file_id'.", f"{where}.image_url")
        return {"detail": "auto", **part}
    # input_file
    if not any(isinstance(part.get(k), str) for k in ("file_data", "file_id", "file_url")):
        raise _bad(
            f"'{where}' needs one of 'file_data', 'file_id' or 'file_url'.", f"{where}.file_data"
        )
    return dict(part)


def _normalize_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(
            f"'{where}.role' must be one of assistant, developer, system, user, got {role!r}.",
            f"{where}.role",
        )
    content = item.get("content")
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        part: dict[str, Any] = {"type": text_type, "text": content}
        if text_type == "output_text":
            part.update(annotations=[], logprobs=[])
        parts = [part]
    elif isinstance(content, list):
        parts = [_normalize_part(p, role, f"{where}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise _bad(
            f"'{where}.content' must be a string or an array of content parts, "
            f"got {json_type_name(content)}.",
            f"{where}.content",
        )
    out = {**item, "type": "message", "role": role, "content": parts}
    return out


def _normalize_item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _bad(f"'{where}' must be an object, got {json_type_name(item)}.", where)
    kind = item.get("type", "message")  # SPEC fix §5.3.17: no type means a message
    if kind is None and "role" not in item:
        kind = "item_reference"  # the schema lets an item reference's type be null
    if kind == "item_reference":
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise _bad(f"'{where}.id' must be a non-empty string.", f"{where}.id")
        return {"type": "item_reference", "id": item["id"]}
    if kind == "compaction":
        if not isinstance(item.get("encrypted_content"), str):
            raise _bad(
                f"'{where}.encrypted_content' must be a string.", f"{where}.encrypted_content"
            )
        compaction_summary(item["encrypted_content"], f"{where}.encrypted_content")
        return dict(item)
    if not isinstance(kind, str):
        raise _bad(f"'{where}.type' must be a string.", f"{where}.type")
    if kind == "message":
        return _normalize_message(item, where)
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise _bad(f"'{where}.{key}' must be a string.", f"{where}.{key}")
        return dict(item)
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise _bad(f"'{where}.call_id' must be a string.", f"{where}.call_id")
        output = item.get("output")
        if not isinstance(output, str | list):
            raise _bad(
                f"'{where}.output' must be a string or an array of content parts.",
                f"{where}.output",
            )
        if isinstance(output, list):
            for j, p in enumerate(output):
                _normalize_part(p, "user", f"{where}.output[{j}]")
        return dict(item)
    if kind == "reasoning":
        for key in ("summary", "content"):
            value = item.get(key)
            if value is not None and not isinstance(value, list):
                raise _bad(f"'{where}.{key}' must be an array.", f"{where}.{key}")
        return {"summary": [], **item}
    return dict(item)  # unknown item types are kept verbatim (and skipped by conversion)


# Conversion costs Python work per item (100,000 items held the event loop 1.3 s): bounded, and
# inputs above OFF_LOOP_ITEMS are converted in a worker thread (the service decides).
MAX_INPUT_ITEMS = 10_000
OFF_LOOP_ITEMS = 500


def normalize_input(value: Any, param: str = "input") -> list[dict[str, Any]]:
    """Validate ``input`` and return it as a list of items in their canonical shape."""
    if isinstance(value, str):
        return [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}
        ]
    if not isinstance(value, list):
        raise _bad(
            f"'{param}' must be a string or an array of items, got {json_type_name(value)}.", param
        )
    if len(value) > MAX_INPUT_ITEMS:
        raise _bad(
            f"'{param}' has {len(value)} items: at most {MAX_INPUT_ITEMS} are accepted.", param
        )
    return [_normalize_item(item, f"{param}[{i}]") for i, item in enumerate(value)]


def new_item_id(kind: str) -> str:
    """A fresh item id (``msg_…``, ``fc_…``) — random, so ids never collide across processes."""
    return f"{_ID_PREFIX.get(kind, 'item')}_{secrets.token_hex(16)}"


def assign_item_ids(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``items``, each with an ``id`` (kept if the client gave one) and a status."""
    out = []
    for item in items:
        kind = str(item.get("type", "message"))
        new = dict(item)
        if not isinstance(new.get("id"), str) or not new["id"]:
            new["id"] = new_item_id(kind)
        if kind in ("message", "function_call", "function_call_output") and "status" not in new:
            new["status"] = "completed"
        out.append(new)
    return out


# -- tools ------------------------------------------------------------------------------------


def _with_closed_parameters(parameters: Any) -> Any:
    """Add ``additionalProperties: false`` to an object schema that does not say (onwards)."""
    if isinstance(parameters, dict) and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    tools = body.get("tools")
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise _bad(f"'tools' must be an array, got {json_type_name(tools)}.", "tools")
    client: list[dict[str, Any]] = []
    hosted: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"'{where}' must be an object, got {json_type_name(tool)}.", where)
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise _bad(f"'{where}.type' must be a string.", f"{where}.type")
        if kind == "hosted_tool":
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise _bad(f"'{where}.name' must be a non-empty string.", f"{where}.name")
            hosted.append(name)
            continue
        if kind == "function":
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                # Also what the Chat-style nested form {"function": {...}} gets, as onwards.
                raise _bad(f"'{where}.name' must be a non-empty string.", f"{where}.name")
            params = tool.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"'{where}.parameters' must be an object.", f"{where}.parameters")
            desc = tool.get("description")
            if desc is not None and not isinstance(desc, str):
                raise _bad(f"'{where}.description' must be a string.", f"{where}.description")
            strict = tool.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise _bad(f"'{where}.strict' must be a boolean.", f"{where}.strict")
        client.append(tool)
    return client, hosted


def convert_tools(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Client Responses tools → Chat tools. Only ``function`` tools survive (onwards)."""
    out = []
    for tool in tools:
        if tool.get("type") != "function":
            continue
        function: dict[str, Any] = {"name": tool["name"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        function["parameters"] = _with_closed_parameters(
            tool.get("parameters") or _EMPTY_PARAMETERS
        )
        function["strict"] = tool.get("strict") if tool.get("strict") is not None else True
        out.append({"type": "function", "function": function})
    return out


def tool_schema_to_chat(tool: ToolLike) -> dict[str, Any]:
    """A server tool as a Chat ``function`` tool the model can call."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = _with_closed_parameters(tool.parameters or _EMPTY_PARAMETERS)
    function["strict"] = bool(tool.strict)
    return {"type": "function", "function": function}


def resolve_server_tools(
    request: ResponsesRequest, available: Sequence[ToolLike]
) -> list[ToolLike]:
    """The server tools this request offers the model.

    Requested ``hosted_tool`` entries must name available tools (400 otherwise) and must not
    collide with a client function tool (400). Without any ``hosted_tool`` entry every tool
    declared for the alias is offered — config-declared tools exist to be used from the CLI
    with no client cooperation (SPEC §3.3); a request that lists hosted tools gets exactly those.
    """
    by_name = {t.name: t for t in available}
    client_names = {t.get("name") for t in request.tools if t.get("type") == "function"}
    if request.hosted_tools:
        for name in request.hosted_tools:
            if name not in by_name:
                listed = ", ".join(sorted(by_name))
                raise _bad(f"Unknown hosted tool: '{name}'. Available tools: [{listed}]", "tools")
        chosen = [by_name[n] for n in dict.fromkeys(request.hosted_tools)]
        clash = sorted(n for n in dict.fromkeys(request.hosted_tools) if n in client_names)
        if clash:
            raise _bad(
                "Tool name collision: the following tools are provided by both the client and "
                f"server: {', '.join(clash)}",
                "tools",
            )
        return chosen
    # Implicit offer: a client function tool of the same name wins (the client asked for it).
    return [t for t in available if t.name not in client_names]


def _allowed_names(choice: dict[str, Any]) -> tuple[str, ...]:
    tools = choice.get("tools")
    if not isinstance(tools, list) or not tools:
        raise _bad("'tool_choice.tools' must be a non-empty array.", "tool_choice.tools")
    names = []
    for i, tool in enumerate(tools):
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name:
            where = f"tool_choice.tools[{i}].name"
            raise _bad(f"'{where}' must be a non-empty string.", where)
        names.append(name)
    return tuple(names)


def convert_tool_choice(choice: Any) -> Any:
    """``"auto"`` stays; ``{type, name}`` → ``{type:"function", function:{name}}``; a typed
    choice without a name (e.g. a hosted tool type) → ``"auto"``."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        if choice.get("type") == "allowed_tools":
            return choice.get("mode", "auto")  # only the allowed tools are sent upstream
        name = choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
        return "auto"
    return choice


def _parse_tool_choice(body: dict[str, Any]) -> Any:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICE_STRINGS:
            raise _bad(
                f"'tool_choice' must be one of auto, none, required or an object, got {choice!r}.",
                "tool_choice",
            )
        return choice
    if isinstance(choice, dict):
        if not isinstance(choice.get("type"), str):
            raise _bad("'tool_choice.type' must be a string.", "tool_choice.type")
        if choice["type"] == "allowed_tools":
            _allowed_names(choice)
            mode = choice.get("mode", "auto")
            if mode not in _TOOL_CHOICE_STRINGS:
                raise _bad(
                    f"'tool_choice.mode' must be one of auto, none, required, got {mode!r}.",
                    "tool_choice.mode",
                )
        return choice
    raise _bad(
        f"'tool_choice' must be a string or an object, got {json_type_name(choice)}.", "tool_choice"
    )


def text_format_to_response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` → Chat ``response_format`` (``text`` needs nothing upstream)."""
    if not text:
        return None
    fmt = text.get("format")
    if not isinstance(fmt, dict):
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {"name": fmt.get("name") or "response"}
        for key in ("description", "schema", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    return None


def _parse_text(body: dict[str, Any]) -> dict[str, Any] | None:
    text = _opt_object(body, "text")
    if text is None:
        return None
    verbosity = text.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise _bad(
            f"'text.verbosity' must be one of low, medium, high, got {verbosity!r}.",
            "text.verbosity",
        )
    fmt = text.get("format")
    if fmt is None:
        return text
    if not isinstance(fmt, dict):
        raise _bad("'text.format' must be an object.", "text.format")
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise _bad(
            f"'text.format.type' must be one of text, json_object, json_schema, got {kind!r}.",
            "text.format.type",
        )
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("'text.format.schema' must be an object.", "text.format.schema")
        name = fmt.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad("'text.format.name' must be a string.", "text.format.name")
    return text


def _parse_include(body: dict[str, Any]) -> tuple[str, ...]:
    include = body.get("include")
    if include is None:
        return ()
    if not isinstance(include, list):
        raise _bad(f"'include' must be an array, got {json_type_name(include)}.", "include")
    for i, value in enumerate(include):
        if value not in INCLUDE_VALUES:
            raise _bad(
                f"'include[{i}]' must be one of {', '.join(sorted(INCLUDE_VALUES))}, "
                f"got {value!r}.",
                f"include[{i}]",
            )
    return tuple(include)


def _opt_int(body: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"'{key}' must be an integer between {lo} and {hi}, got {value!r}.", key)
    return value


# -- the request ------------------------------------------------------------------------------


def parse_request(body: Any) -> ResponsesRequest:
    """Validate a ``POST /v1/responses`` body; raise a 400 :class:`HTTPError` naming the field."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string.", "model")
    previous = _opt_str(body, "previous_response_id")
    if "input" not in body or body["input"] is None:
        if previous is None:
            raise _bad("'input' is required.", "input")
        items: list[dict[str, Any]] = []
    else:
        items = normalize_input(body["input"])
    tools, hosted = _parse_tools(body)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("'stop' must be a string or an array of strings.", "stop")
    metadata = _opt_object(body, "metadata")
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(value, str):
                raise _bad(f"'metadata.{key}' must be a string.", f"metadata.{key}")
    truncation = _opt_str(body, "truncation")
    if truncation is not None and truncation not in ("auto", "disabled"):
        raise _bad(f"'truncation' must be 'auto' or 'disabled', got {truncation!r}.", "truncation")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise _bad(f"'reasoning' must be an object, got {json_type_name(reasoning)}.", "reasoning")
    effort = (reasoning or {}).get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        listing = ", ".join(REASONING_EFFORTS)
        raise _bad(f"'reasoning.effort' must be one of {listing}.", "reasoning.effort")
    choice = _parse_tool_choice(body)
    allowed = (
        _allowed_names(choice)
        if isinstance(choice, dict) and choice.get("type") == "allowed_tools"
        else None
    )
    store = _opt_bool(body, "store")
    background = bool(_opt_bool(body, "background"))
    if background and store is False:
        raise _bad("Background responses must be stored: 'store' cannot be false.", "store")
    return ResponsesRequest(
        body=body,
        model=model,
        input_items=items,
        instructions=_opt_str(body, "instructions"),
        previous_response_id=previous,
        store=True if store is None else store,
        background=background,
        stream=bool(_opt_bool(body, "stream")),
        tools=tools,
        hosted_tools=hosted,
        tool_choice=choice,
        parallel_tool_calls=_opt_bool(body, "parallel_tool_calls"),
        temperature=_opt_number(body, "temperature", 0.0, 2.0),
        top_p=_opt_number(body, "top_p", 0.0, 1.0),
        max_output_tokens=_opt_positive_int(body, "max_output_tokens"),
        max_tool_calls=_opt_positive_int(body, "max_tool_calls"),
        stop=stop,
        user=_opt_str(body, "user"),
        text=_parse_text(body),
        reasoning=reasoning,
        metadata=metadata,
        truncation=truncation,
        service_tier=_opt_str(body, "service_tier"),
        presence_penalty=_opt_number(body, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_opt_number(body, "frequency_penalty", -2.0, 2.0),
        top_logprobs=_opt_int(body, "top_logprobs", 0, 20),
        prompt_cache_key=_opt_str(body, "prompt_cache_key"),
        safety_identifier=_opt_str(body, "safety_identifier"),
        include=_parse_include(body),
        allowed_tools=allowed,
    )


# -- item references, call ids, compaction -----------------------------------------------------


def previous_response_not_found(response_id: str) -> HTTPError:
    """The error the spec (and the SDKs) name for an unknown ``previous_response_id``."""
    return HTTPError(
        400,
        error_body(
            f"Previous response with id '{response_id}' not found.",
            "invalid_request_error",
            "previous_response_not_found",
            "previous_response_id",
        ),
    )


def resolve_references(
    items: Sequence[dict[str, Any]], history: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``item_reference`` items replaced by the items they name: an item of the replayed
    conversation (``previous_response_id``) or an earlier input item with that ``id``. An id
    that names nothing is a 400 (never a silently dropped turn)."""
    if not any(i.get("type") == "item_reference" for i in items):
        return list(items)
    known: dict[str, Mapping[str, Any]] = {
        i["id"]: i for i in history if isinstance(i.get("id"), str)
    }
    out: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        if item.get("type") == "item_reference":
            target = known.get(item["id"])
            if target is None:
                raise _bad(f"Item with id '{item['id']}' not found.", f"input[{n}].id")
            out.append(dict(target))
            continue
        if isinstance(item.get("id"), str):
            known[item["id"]] = item
        out.append(item)
    return out


def check_call_ids(
    items: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]]
) -> None:
    """Every ``function_call_output`` must answer a ``function_call`` of the conversation
    (a 400 naming the item otherwise): the upstream would refuse the orphan tool message."""
    calls = {i.get("call_id") for i in [*history, *items] if i.get("type") == "function_call"}
    for n, item in enumerate(items):
        if item.get("type") == "function_call_output" and item.get("call_id") not in calls:
            raise _bad(
                f"No tool call found for function call output with call_id "
                f"'{item.get('call_id')}'.",
                f"input[{n}].call_id",
            )


def compaction_item(summary: str) -> dict[str, Any]:
    """A ``compaction`` item carrying ``summary``. A Chat upstream has no encrypted context,
    so ``encrypted_content`` is an opaque, versioned encoding of the summary (not a secret:
    it is the client's own conversation) that :func:`compaction_summary` reads back."""
    raw = base64.urlsafe_b64encode(orjson.dumps({"summary": summary})).decode()
    return {
        "type": "compaction",
        "id": new_item_id("compaction"),
        "encrypted_content": _COMPACTION_PREFIX + raw,
    }


def compaction_summary(encrypted: str, param: str) -> str:
    """The summary inside a :func:`compaction_item`'s ``encrypted_content`` (400 otherwise)."""
    if encrypted.startswith(_COMPACTION_PREFIX):
        try:
            data = orjson.loads(base64.urlsafe_b64decode(encrypted[len(_COMPACTION_PREFIX) :]))
        except (binascii.Error, ValueError):
            data = None
        summary = data.get("summary") if isinstance(data, dict) else None
        if isinstance(summary, str):
            return summary
    raise _bad("The compaction item was not made by this gateway.", param)


# -- items → chat messages -------------------------------------------------------------------


def _chat_part(part: dict[str, Any]) -> dict[str, Any] | None:
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal", "")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            return None  # a file_id image has no Chat equivalent
        image: dict[str, Any] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file: dict[str, Any] = {}
        for key in ("file_data", "file_id", "filename"):
            if isinstance(part.get(key), str):
                file[key] = part[key]
        if "file_data" not in file and "file_id" not in file:
            return None  # a file_url has no Chat equivalent
        return {"type": "file", "file": file}
    return None


def _message_content(content: Any, role: str) -> Any:
    if isinstance(content, str):
        return content
    parts = [p for p in (_chat_part(x) for x in content or []) if p is not None]
    if not parts:
        return ""
    if role != "user" and all(p["type"] == "text" for p in parts):
        # Chat allows only text for these roles; many servers want a plain string there.
        return "".join(p["text"] for p in parts)
    return parts


def chat_content_text(content: Any) -> str:
    """The text of a Chat message's ``content`` (a string, or parts: their texts joined by
    spaces, images and files left out)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and "text" in p
        )
    return ""


def _tool_output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    texts = [
        p.get("text", "")
        for p in output
        if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
    ]
    return "".join(texts)


def items_to_messages(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items → Chat messages.

    A ``function_call`` joins the preceding assistant message's ``tool_calls`` (or starts an
    assistant message without content); ``function_call_output`` is a ``tool`` message;
    reasoning and unknown items are skipped — Chat has no portable way to send reasoning back,
    and servers that emit ``reasoning_content`` commonly reject it on input.
    """
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role", "user")
            messages.append({"role": role, "content": _message_content(item.get("content"), role)})
        elif kind == "compaction":
            summary = compaction_summary(str(item.get("encrypted_content", "")), "input")
            messages.append(
                {"role": "user", "content": f"Summary of the conversation so far:\n{summary}"}
            )
        elif kind == "function_call" and item.get("status") == "incomplete":
            continue  # a call the gateway suppressed (allowed_tools, max_tool_calls): never run
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last.get("role") == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "content": _tool_output_text(item.get("output", "")),
                    "tool_call_id": item["call_id"],
                }
            )
    for message in messages:
        empty = message.get("content") == ""
        if empty and message.get("role") == "assistant" and "tool_calls" in message:
            message["content"] = None
    return messages


def to_chat_request(
    request: ResponsesRequest,
    *,
    history: Sequence[dict[str, Any]] = (),
    server_tools: Sequence[ToolLike] = (),
    stream: bool | None = None,
) -> dict[str, Any]:
    """The Chat Completions request for ``request``.

    ``history`` is the replayed conversation of ``previous_response_id`` (its context, inputs
    and outputs, in order); ``server_tools`` are the tools from :func:`resolve_server_tools`.
    Messages are ``[system(instructions)] + history + input`` — instructions are per response
    and not inherited, as OpenAI documents. ``stream`` overrides the request's own flag.
    """
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    messages.extend(items_to_messages([*history, *request.input_items]))
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    tools = convert_tools(request.tools) + [tool_schema_to_chat(t) for t in server_tools]
    allowed = request.allowed_tools
    if allowed is not None:
        # The model only sees what it may call (portable to every Chat server); the loop
        # also suppresses any other call (spec: allowed_tools is a hard constraint).
        tools = [t for t in tools if t["function"]["name"] in allowed]
    if tools:
        chat["tools"] = tools
        if request.tool_choice is not None:
            chat["tool_choice"] = convert_tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    for key in (
        "temperature",
        "top_p",
        "stop",
        "user",
        "presence_penalty",
        "frequency_penalty",
        "prompt_cache_key",
        "safety_identifier",
        "service_tier",
    ):
        value = getattr(request, key)
        if value is not None:
            chat[key] = value
    if request.top_logprobs:
        chat["logprobs"] = True
        chat["top_logprobs"] = request.top_logprobs
    if "message.output_text.logprobs" in request.include:
        chat["logprobs"] = True
    verbosity = (request.text or {}).get("verbosity")
    if isinstance(verbosity, str):
        chat["verbosity"] = verbosity
    if request.max_output_tokens is not None:
        chat["max_tokens"] = request.max_output_tokens
    control: dict[str, Any] = {}
    if allowed is not None:
        control["allowed_tools"] = list(allowed)
    if request.max_tool_calls is not None:
        control["max_tool_calls"] = request.max_tool_calls
    if control:
        chat[LOOP_CONTROL] = control
    response_format = text_format_to_response_format(request.text)
    if response_format is not None:
        chat["response_format"] = response_format
    effort = (request.reasoning or {}).get("effort")
    if isinstance(effort, str):  # each provider's spelling of it: _proxy.reasoning
        chat["reasoning_effort"] = effort
    streaming = request.stream if stream is None else stream
    if streaming:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat
