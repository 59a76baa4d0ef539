"""The schemas strict mode validates requests against and coerces responses into.

Schemas are small validator combinators over plain JSON values (what ``orjson.loads`` gives)
rather than classes, because one pass both *checks* and *builds the output*: a closed schema
copies only the keys it knows, backfills defaults, and the result goes straight back to
``orjson.dumps``. No intermediate objects, which matters per streamed chunk.

A failure raises :class:`SchemaError`; the JSON path of the offending value is assembled while
the exception unwinds (segments are appended by the enclosing objects and lists), so the happy
path never builds a path string.

Conventions shared by every object schema (:class:`Obj`):

* a ``null`` value counts as absent (re-serialisation drops explicit nulls of modelled
  optional fields, as onwards does);
* absent + ``default`` → the default is filled in (backfill); absent + ``required`` → error;
  absent + ``null=True`` → the key is emitted as ``null``; otherwise the key is omitted;
* ``extra="keep"`` copies unknown keys verbatim, ``extra="drop"`` removes them (closed schema).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs

__all__ = [
    "CHAT_CHUNK",
    "CHAT_COMPLETION",
    "CHAT_REQUEST",
    "COMPLETION",
    "COMPLETIONS_REQUEST",
    "COMPLETION_CHUNK",
    "EMBEDDINGS",
    "EMBEDDINGS_REQUEST",
    "RESPONSE",
    "RESPONSES_REQUEST",
    "RESPONSE_EVENT",
    "FallbackId",
    "Field",
    "Obj",
    "SchemaError",
    "Validator",
    "backfill_chat",
    "backfill_chat_chunk",
    "backfill_completion",
    "backfill_completion_chunk",
    "backfill_response",
    "normalise_response_event",
]

Validator = Callable[[Any], Any]
FallbackId = Callable[[], str]  # the id for an object that came without one (one per stream)


class SchemaError(ValueError):
    """A value did not fit its schema. ``path`` is a JSON path like ``messages[0].role``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.segments: list[str | int] = []  # innermost first, appended while unwinding

    @property
    def path(self) -> str:
        out = ""
        for seg in reversed(self.segments):
            if isinstance(seg, int):
                out += f"[{seg}]"
            else:
                out += f".{seg}" if out else seg
        return out

    @property
    def message(self) -> str:
        path = self.path
        return f"{self.reason} at '{path}'" if path else self.reason

    def __str__(self) -> str:
        return self.message


# --- primitives -----------------------------------------------------------------------------


def any_json(v: Any) -> Any:
    return v


def string(v: Any) -> str:
    if type(v) is str:
        return v
    raise SchemaError("expected a string")


def boolean(v: Any) -> bool:
    if type(v) is bool:
        return v
    raise SchemaError("expected a boolean")


def integer(v: Any) -> int:
    if type(v) is int:
        return v
    if type(v) is float and v.is_integer():
        return int(v)
    raise SchemaError("expected an integer")


def unsigned(v: Any) -> int:
    n = integer(v)
    if n < 0:
        raise SchemaError("expected a non-negative integer")
    return n


def number(v: Any) -> float | int:
    t = type(v)
    if t is float or t is int:
        return v  # type: ignore[no-any-return]
    raise SchemaError("expected a number")


def json_object(v: Any) -> dict[str, Any]:
    if type(v) is dict:
        return v
    raise SchemaError("expected an object")


def json_array(v: Any) -> list[Any]:
    if type(v) is list:
        return v
    raise SchemaError("expected an array")


def const(*values: str) -> Validator:
    allowed = frozenset(values)
    listing = ", ".join(repr(x) for x in values)

    def check(v: Any) -> str:
        if type(v) is str and v in allowed:
            return v
        raise SchemaError(f"expected one of {listing}")

    return check


def list_of(item: Validator) -> Validator:
    def check(v: Any) -> list[Any]:
        if type(v) is not list:
            raise SchemaError("expected an array")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except SchemaError as exc:
                exc.segments.append(i)
                raise
        return out

    return check


def by_type(expected: str, **choices: Validator) -> Validator:
    """A union dispatched on the JSON type (``str``, ``list``, ``dict``, ``int``, ``float``,
    ``bool``): nested errors keep their precise path instead of a vague "no variant matched"."""
    table: dict[type, Validator] = {}
    names = {"str": str, "list": list, "dict": dict, "int": int, "float": float, "bool": bool}
    for name, validator in choices.items():
        table[names[name]] = validator

    def check(v: Any) -> Any:
        validator = table.get(type(v))
        if validator is None:
            raise SchemaError(f"expected {expected}")
        return validator(v)

    return check


@attrs.frozen
class Field:
    """One key of an :class:`Obj`."""

    check: Validator = any_json
    required: bool = False
    default: Callable[[], Any] | None = None
    null: bool = False  # emit ``null`` when absent (instead of omitting the key)


def F(
    check: Validator = any_json,
    *,
    required: bool = False,
    default: Callable[[], Any] | None = None,
    null: bool = False,
) -> Field:
    return Field(check, required, default, null)


class Obj:
    """An object schema. Key order of the output follows the schema, then kept extras."""

    __slots__ = ("_extra", "_fields", "_items")

    def __init__(self, fields: dict[str, Field], extra: Literal["keep", "drop"] = "drop") -> None:
        self._fields = fields
        self._items = tuple(fields.items())
        self._extra = extra == "keep"

    def __call__(self, v: Any) -> dict[str, Any]:
        if type(v) is not dict:
            raise SchemaError("expected an object")
        out: dict[str, Any] = {}
        for key, field in self._items:
            value = v.get(key)
            if value is None:
                if field.default is not None:
                    out[key] = field.default()
                elif field.required:
                    exc = SchemaError("required field missing")
                    exc.segments.append(key)
                    raise exc
                elif field.null:
                    out[key] = None
                continue
            try:
                out[key] = field.check(value)
            except SchemaError as exc:
                exc.segments.append(key)
                raise
        if self._extra:
            fields = self._fields
            for key, value in v.items():
                if key not in fields:
                    out[key] = value
        return out

    def extend(self, extra: Literal["keep", "drop"] | None = None, **fields: Field) -> Obj:
        merged = {**self._fields, **fields}
        return Obj(merged, extra if extra is not None else ("keep" if self._extra else "drop"))


class Tagged:
    """A union of object schemas chosen by a string tag (``type``). ``fallback`` handles
    unknown tags (``None``: they are an error); ``missing`` is the tag assumed when absent."""

    __slots__ = ("_fallback", "_key", "_listing", "_missing", "_variants")

    def __init__(
        self,
        key: str,
        variants: dict[str, Validator],
        *,
        fallback: Validator | None = None,
        missing: str | None = None,
    ) -> None:
        self._key = key
        self._variants = variants
        self._fallback = fallback
        self._missing = missing
        self._listing = ", ".join(repr(x) for x in variants)

    def __call__(self, v: Any) -> Any:
        if type(v) is not dict:
            raise SchemaError("expected an object")
        tag = v.get(self._key)
        if tag is None and self._missing is not None:
            tag = self._missing
            v = {self._key: tag, **v}
        validator = self._variants.get(tag) if type(tag) is str else None
        if validator is None:
            if type(tag) is str and self._fallback is not None:
                return self._fallback(v)
            exc = SchemaError(
                "required field missing" if tag is None else f"expected one of {self._listing}"
            )
            exc.segments.append(self._key)
            raise exc
        return validator(v)


def _const_tag(name: str) -> Field:
    return F(const(name), required=True)


# --- shared pieces --------------------------------------------------------------------------

STRING_OR_STRINGS = by_type("a string or an array of strings", str=string, list=list_of(string))


# --- requests -------------------------------------------------------------------------------


def _req(check: Validator) -> Field:
    return Field(check, required=True)


_IMAGE_URL = Obj({"url": _req(string), "detail": F(string)}, extra="keep")
_CHAT_PART = Tagged(
    "type",
    {
        "text": Obj({"type": _const_tag("text"), "text": _req(string)}, extra="keep"),
        "image_url": Obj({"type": _const_tag("image_url"), "image_url": _req(_IMAGE_URL)}, "keep"),
        "input_audio": Obj(
            {"type": _const_tag("input_audio"), "input_audio": _req(json_object)}, "keep"
        ),
        "file": Obj({"type": _const_tag("file"), "file": _req(json_object)}, "keep"),
        "refusal": Obj({"type": _const_tag("refusal"), "refusal": _req(string)}, "keep"),
    },
)
_CHAT_CONTENT = by_type(
    "a string or an array of content parts", str=string, list=list_of(_CHAT_PART)
)
_REQ_TOOL_CALL = Obj(
    {
        "id": _req(string),
        "type": _req(string),
        "function": _req(Obj({"name": _req(string), "arguments": _req(string)}, "keep")),
    },
    extra="keep",
)
_CHAT_MESSAGE = Obj(
    {
        "role": _req(string),
        "content": F(_CHAT_CONTENT),
        "name": F(string),
        "tool_calls": F(list_of(_REQ_TOOL_CALL)),
        "tool_call_id": F(string),
        "reasoning": F(any_json),
        "reasoning_content": F(string),
        "reasoning_details": F(json_array),
    },
    extra="keep",
)
_CHAT_TOOL = Obj(
    {
        "type": _req(string),
        "function": _req(
            Obj(
                {
                    "name": _req(string),
                    "description": F(string),
                    "parameters": F(json_object),
                    "strict": F(boolean),
                },
                extra="keep",
            )
        ),
    },
    extra="keep",
)
_TOOL_CHOICE = by_type(
    "a string or an object",
    str=string,
    dict=Obj({"type": _req(string), "function": F(Obj({"name": _req(string)}, "keep"))}, "keep"),
)
_STREAM_OPTIONS = Obj({"include_usage": F(boolean)}, extra="keep")

CHAT_REQUEST = Obj(
    {
        "model": _req(string),
        "messages": _req(list_of(_CHAT_MESSAGE)),
        "temperature": F(number),
        "top_p": F(number),
        "n": F(integer),
        "stream": F(boolean),
        "stream_options": F(_STREAM_OPTIONS),
        "stop": F(STRING_OR_STRINGS),
        "max_tokens": F(integer),
        "max_completion_tokens": F(integer),
        "presence_penalty": F(number),
        "frequency_penalty": F(number),
        "logit_bias": F(json_object),
        "logprobs": F(boolean),
        "top_logprobs": F(integer),
        "user": F(string),
        "seed": F(integer),
        "tools": F(list_of(_CHAT_TOOL)),
        "tool_choice": F(_TOOL_CHOICE),
        "parallel_tool_calls": F(boolean),
        "response_format": F(Obj({"type": _req(string), "json_schema": F(any_json)}, "keep")),
        "service_tier": F(string),
    },
    extra="keep",  # unknown top-level parameters are forwarded (new OpenAI parameters work)
)


def _token_arrays(what: str) -> Validator:
    """string | [string] | [int] | [[int]] — homogeneous arrays only (no mixes, no floats)."""

    ints = list_of(_token)
    nested = list_of(ints)

    def check(v: Any) -> Any:
        if type(v) is str:
            return v
        if type(v) is not list:
            raise SchemaError(f"expected {what}")
        if not v:
            return v
        first = type(v[0])
        if first is str:
            return list_of(string)(v)
        if first is int:
            return ints(v)
        if first is list:
            return nested(v)
        raise SchemaError(f"expected {what}")

    return check


def _token(v: Any) -> int:
    if type(v) is int:
        return v
    raise SchemaError("expected an integer token")


_TEXTS_OR_TOKENS = _token_arrays(
    "a string, an array of strings, an array of tokens or an array of token arrays"
)

COMPLETIONS_REQUEST = Obj(
    {
        "model": _req(string),
        "prompt": F(_TEXTS_OR_TOKENS),
        "suffix": F(string),
        "max_tokens": F(integer),
        "temperature": F(number),
        "top_p": F(number),
        "n": F(integer),
        "stream": F(boolean),
        "stream_options": F(_STREAM_OPTIONS),
        "logprobs": F(integer),
        "echo": F(boolean),
        "stop": F(STRING_OR_STRINGS),
        "presence_penalty": F(number),
        "frequency_penalty": F(number),
        "best_of": F(integer),
        "logit_bias": F(json_object),
        "user": F(string),
        "seed": F(integer),
    },
    extra="drop",  # as onwards: the legacy endpoint forwards only what it models
)

EMBEDDINGS_REQUEST = Obj(
    {
        "model": _req(string),
        "input": _req(_TEXTS_OR_TOKENS),
        "encoding_format": F(const("float", "base64")),
        "dimensions": F(integer),
        "user": F(string),
    },
    extra="drop",
)

# Responses API request items and parts ----------------------------------------------------

_INPUT_PART = Tagged(
    "type",
    {
        "input_text": Obj({"type": _const_tag("input_text"), "text": _req(string)}, "keep"),
        "output_text": Obj({"type": _const_tag("output_text"), "text": _req(string)}, "keep"),
        "input_image": Obj(
            {
                "type": _const_tag("input_image"),
                "image_url": F(string),
                "file_id": F(string),
                "detail": F(string),
            },
            "keep",
        ),
        "input_file": Obj(
            {
                "type": _const_tag("input_file"),
                "file_id": F(string),
                "filename": F(string),
                "file_data": F(string),
                "file_url": F(string),
            },
            "keep",
        ),
        "input_audio": Obj(
            {"type": _const_tag("input_audio"), "input_audio": _req(json_object)}, "keep"
        ),
        "refusal": Obj({"type": _const_tag("refusal"), "refusal": _req(string)}, "keep"),
    },
)
_RESP_CONTENT = by_type(
    "a string or an array of content parts", str=string, list=list_of(_INPUT_PART)
)
_TEXT_PARTS = list_of(Obj({"type": _req(string), "text": _req(string)}, "keep"))
_ITEM = Tagged(
    "type",
    {
        "message": Obj(
            {
                "type": _const_tag("message"),
                "id": F(string),
                "role": _req(string),
                "content": _req(_RESP_CONTENT),
                "status": F(string),
            },
            "keep",
        ),
        "function_call": Obj(
            {
                "type": _const_tag("function_call"),
                "id": F(string),
                "call_id": _req(string),
                "name": _req(string),
                "arguments": _req(string),
                "status": F(string),
            },
            "keep",
        ),
        "function_call_output": Obj(
            {
                "type": _const_tag("function_call_output"),
                "id": F(string),
                "call_id": _req(string),
                "output": _req(by_type("a string or an array", str=string, list=json_array)),
                "status": F(string),
            },
            "keep",
        ),
        "reasoning": Obj(
            {
                "type": _const_tag("reasoning"),
                "id": F(string),
                "content": F(_TEXT_PARTS),
                "encrypted_content": F(string),
                "summary": F(_TEXT_PARTS),
                "status": F(string),
            },
            "keep",
        ),
    },
    fallback=json_object,  # newer item types (web_search_call, …) are forwarded verbatim
    missing="message",  # v0.33.2: an item without `type` is a message
)


def _function_tool(v: Any) -> dict[str, Any]:
    out = _FUNCTION_TOOL(v)
    out.setdefault("strict", True)
    return out


_FUNCTION_TOOL = Obj(
    {
        "type": _const_tag("function"),
        "name": _req(string),
        "description": _req(string),
        "parameters": _req(json_object),
        "strict": F(boolean),
    },
    "keep",
)
_RESP_TOOL = Tagged(
    "type",
    {"function": _function_tool},
    fallback=json_object,  # hosted tools (web_search, file_search, mcp, …) pass as given
)


def _reasoning(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise SchemaError("expected an object")
    return {k: x for k, x in v.items() if x is not None}


_TEXT_FORMAT = Tagged(
    "type",
    {
        "text": Obj({"type": _const_tag("text")}, "keep"),
        "json_object": Obj({"type": _const_tag("json_object")}, "keep"),
        "json_schema": Obj(
            {
                "type": _const_tag("json_schema"),
                "name": F(string),
                "schema": F(json_object),
                "strict": F(boolean),
                "description": F(string),
            },
            "keep",
        ),
    },
)

RESPONSES_REQUEST = Obj(
    {
        "model": _req(string),
        "input": _req(by_type("a string or an array of items", str=string, list=list_of(_ITEM))),
        "instructions": F(string),
        "previous_response_id": F(string),
        "store": F(boolean),
        "metadata": F(json_object),
        "temperature": F(number),
        "top_p": F(number),
        "max_output_tokens": F(integer),
        "stop": F(STRING_OR_STRINGS),
        "stream": F(boolean),
        "tools": F(list_of(_RESP_TOOL)),
        "tool_choice": F(by_type("a string or an object", str=string, dict=json_object)),
        "parallel_tool_calls": F(boolean),
        "truncation": F(const("auto", "disabled")),
        "user": F(string),
        "reasoning": F(_reasoning),
        "text": F(Obj({"format": F(_TEXT_FORMAT)}, "keep")),
        "background": F(boolean),
        "service_tier": F(string),
    },
    extra="keep",
)


# --- responses (closed schemas) -------------------------------------------------------------

_PROMPT_DETAILS = Obj({"cached_tokens": F(unsigned), "audio_tokens": F(unsigned)})
_COMPLETION_DETAILS = Obj(
    {
        "reasoning_tokens": F(unsigned),
        "audio_tokens": F(unsigned),
        "accepted_prediction_tokens": F(unsigned),
        "rejected_prediction_tokens": F(unsigned),
    }
)
_USAGE = Obj(
    {
        "prompt_tokens": _req(unsigned),
        "completion_tokens": _req(unsigned),
        "total_tokens": _req(unsigned),
        "prompt_tokens_details": F(_PROMPT_DETAILS),
        "completion_tokens_details": F(_COMPLETION_DETAILS),
    }
)
_FUNCTION_CALL = Obj({"name": F(string), "arguments": F(string)})
_RESP_TOOL_CALL = Obj({"id": F(string), "type": F(string), "function": F(_FUNCTION_CALL)})
_OUT_MESSAGE = Obj(
    {
        "role": _req(string),
        "content": F(_CHAT_CONTENT),
        "refusal": F(string),
        "name": F(string),
        "tool_calls": F(list_of(_RESP_TOOL_CALL)),
        "tool_call_id": F(string),
        "function_call": F(json_object),
        "audio": F(json_object),
        "annotations": F(json_array),
        "reasoning": F(any_json),
        "reasoning_content": F(string),
        "reasoning_details": F(json_array),
    }
)


def _chat_choice(body: str, body_schema: Validator) -> Obj:
    """A chat choice: ``message`` (whole answers) or ``delta`` (chunks)."""
    return Obj(
        {
            "index": _req(unsigned),
            body: _req(body_schema),
            "finish_reason": F(string),
            "stop_reason": F(any_json),  # vLLM (v0.33.4 keeps it)
            "logprobs": F(any_json),
        }
    )


def _completion_object(choice: Validator, **extra: Field) -> Obj:
    """The envelope chat completions, legacy completions and their chunks share."""
    return Obj(
        {
            "id": _req(string),
            "object": _req(string),
            "created": _req(unsigned),
            "model": _req(string),
            "choices": _req(list_of(choice)),
            "usage": F(_USAGE),
            **extra,
        }
    )


CHAT_COMPLETION = _completion_object(
    _chat_choice("message", _OUT_MESSAGE), system_fingerprint=F(string), service_tier=F(string)
)

_DELTA_TOOL_CALL = Obj(
    {"index": _req(unsigned), "id": F(string), "type": F(string), "function": F(_FUNCTION_CALL)}
)
_DELTA = Obj(
    {
        "role": F(string),
        "content": F(string),
        "refusal": F(string),
        "tool_calls": F(list_of(_DELTA_TOOL_CALL)),
        "function_call": F(json_object),
        "reasoning": F(any_json),
        "reasoning_content": F(string),
        "reasoning_details": F(json_array),
    }
)
CHAT_CHUNK = _completion_object(
    _chat_choice("delta", _DELTA), system_fingerprint=F(string), service_tier=F(string)
)

_COMPLETION_CHOICE = Obj(
    {
        "text": _req(string),
        "index": _req(unsigned),
        "logprobs": F(any_json),
        "finish_reason": F(string),
        "stop_reason": F(any_json),
    }
)
COMPLETION = _completion_object(_COMPLETION_CHOICE, system_fingerprint=F(string))
COMPLETION_CHUNK = _completion_object(_COMPLETION_CHOICE)


def _embedding(v: Any) -> Any:
    if type(v) is str:
        return v  # base64
    if type(v) is list:
        for x in v:
            t = type(x)
            if t is not float and t is not int:
                raise SchemaError("expected an array of numbers or a base64 string")
        return v
    raise SchemaError("expected an array of numbers or a base64 string")


EMBEDDINGS = Obj(
    {
        "object": _req(string),
        "data": _req(
            list_of(
                Obj(
                    {"object": _req(string), "embedding": _req(_embedding), "index": _req(unsigned)}
                )
            )
        ),
        "model": _req(string),
        "usage": _req(Obj({"prompt_tokens": _req(unsigned), "total_tokens": _req(unsigned)})),
    }
)

# Responses API objects -------------------------------------------------------------------

_STATUSES = (
    "queued",
    "in_progress",
    "completed",
    "incomplete",
    "failed",
    "requires_action",
    "cancelled",
    "canceled",  # OpenAI spells it this way; onwards 0.27 rejected it (§5.3 item 17)
)
_OUTPUT_TEXT = Obj(
    {
        "type": _req(string),
        "text": _req(string),
        "annotations": F(json_array, default=list),
        "logprobs": F(json_array),
    }
)
_OUT_PART = Tagged(
    "type",
    {"output_text": _OUTPUT_TEXT, "refusal": Obj({"type": _req(string), "refusal": _req(string)})},
    fallback=json_object,
)
_OUT_ITEM = Tagged(
    "type",
    {
        "message": Obj(
            {
                "id": F(string),
                "type": _req(string),
                "role": _req(string),
                "content": _req(list_of(_OUT_PART)),
                "status": F(string),
            }
        ),
        "function_call": Obj(
            {
                "id": F(string),
                "type": _req(string),
                "call_id": _req(string),
                "name": _req(string),
                "arguments": _req(string),
                "status": F(string),
            }
        ),
        "reasoning": Obj(
            {
                "id": F(string),
                "type": _req(string),
                "summary": F(_TEXT_PARTS, default=list),
                "content": F(_TEXT_PARTS),
                "encrypted_content": F(string),
                "status": F(string),
            }
        ),
    },
    fallback=json_object,  # hosted-tool call items keep their provider-defined shape
)
_RESP_USAGE = Obj(
    {
        "input_tokens": _req(unsigned),
        "output_tokens": _req(unsigned),
        "total_tokens": _req(unsigned),
        "input_tokens_details": F(Obj({"cached_tokens": F(unsigned, default=int)})),
        "output_tokens_details": F(Obj({"reasoning_tokens": F(unsigned, default=int)})),
    }
)
_NULLABLE = Field(any_json, null=True)


def _nullable(check: Validator) -> Field:
    return Field(check, null=True)


RESPONSE = Obj(
    {
        "id": _req(string),
        "object": _req(string),
        "created_at": _req(unsigned),
        "completed_at": _nullable(unsigned),
        "status": _req(const(*_STATUSES)),
        "incomplete_details": _nullable(Obj({"reason": F(string)})),
        "model": _req(string),
        "previous_response_id": _nullable(string),
        "instructions": _nullable(by_type("a string or an array", str=string, list=json_array)),
        "output": _req(list_of(_OUT_ITEM)),
        "error": _nullable(
            Obj(
                {
                    "type": F(string),
                    "code": F(any_json),
                    "message": _req(string),
                    "param": F(any_json),
                }
            )
        ),
        "tools": _req(list_of(json_object)),  # open: newer tool types must not fail (§5.3 #17)
        "tool_choice": _req(any_json),
        "truncation": _req(string),
        "parallel_tool_calls": _req(boolean),
        "text": _req(json_object),
        "top_p": _req(number),
        "presence_penalty": _req(number),
        "frequency_penalty": _req(number),
        "top_logprobs": _req(unsigned),
        "temperature": _req(number),
        "reasoning": _NULLABLE,  # any JSON, inner nulls preserved
        "usage": _nullable(_RESP_USAGE),
        "max_output_tokens": _nullable(unsigned),
        "max_tool_calls": _nullable(unsigned),
        "store": _req(boolean),
        "background": _req(boolean),
        "service_tier": _req(string),
        "metadata": _NULLABLE,
        "safety_identifier": _nullable(string),
        "prompt_cache_key": _nullable(string),
    }
)


_EVENT = Obj(
    {"type": _req(string), "sequence_number": _req(unsigned), "response": F(RESPONSE)},
    extra="keep",  # event payload fields (delta, item_id, output_index, …) stay verbatim
)
RESPONSE_EVENT: Validator = _EVENT


# --- backfill (what onwards fills in before coercing, reference §1.19.3 to §1.20.1) -----------


def _backfill_choices(
    obj: dict[str, Any],
    alias: str,
    fallback_id: FallbackId,
    object_name: str,
    fill: Callable[[dict[str, Any]], None] | None,
    *,
    chunk: bool,
) -> None:
    """Fill the envelope (id, object, created, model) and each choice's ``index`` (by
    position), then ``fill`` each choice; only when there is a ``choices`` array. A chunk with
    ``usage`` and no ``choices`` gets an empty array (some providers omit it there)."""
    choices = obj.get("choices")
    if chunk and choices is None and obj.get("usage") is not None:
        obj["choices"] = choices = []
    if type(choices) is not list:
        return
    if obj.get("id") is None:
        obj["id"] = fallback_id()
    if obj.get("object") is None:
        obj["object"] = object_name
    if obj.get("created") is None:
        obj["created"] = 0
    obj["model"] = alias
    for i, choice in enumerate(choices):
        if type(choice) is not dict:
            continue
        if choice.get("index") is None:
            choice["index"] = i
        if fill is not None:
            fill(choice)


def _assistant_role(choice: dict[str, Any]) -> None:
    message = choice.get("message")
    if type(message) is dict and message.get("role") is None:
        message["role"] = "assistant"


def _empty_delta(choice: dict[str, Any]) -> None:
    if choice.get("delta") is None:
        choice["delta"] = {}


def _empty_text(choice: dict[str, Any]) -> None:
    if choice.get("text") is None:
        choice["text"] = ""


def backfill_chat(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    """Fill non-critical fields of a chat completion in place (only when it has ``choices``)."""
    _backfill_choices(obj, alias, fallback_id, "chat.completion", _assistant_role, chunk=False)


def backfill_chat_chunk(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    _backfill_choices(obj, alias, fallback_id, "chat.completion.chunk", _empty_delta, chunk=True)


def backfill_completion(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    """Legacy completions: ``text`` is deliberately *not* backfilled (a choice without text is
    an upstream failure, not a sparse answer)."""
    _backfill_choices(obj, alias, fallback_id, "text_completion", None, chunk=False)


def backfill_completion_chunk(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    _backfill_choices(obj, alias, fallback_id, "text_completion", _empty_text, chunk=True)


_RESPONSE_DEFAULTS: tuple[tuple[str, Callable[[], Any]], ...] = (
    ("object", lambda: "response"),
    ("created_at", lambda: 0),
    ("status", lambda: "completed"),
    ("output", list),
    ("tools", list),
    ("tool_choice", lambda: "auto"),
    ("truncation", lambda: "disabled"),
    ("parallel_tool_calls", lambda: True),
    ("text", lambda: {"format": {"type": "text"}}),
    ("top_p", lambda: 1.0),
    ("presence_penalty", lambda: 0.0),
    ("frequency_penalty", lambda: 0.0),
    ("top_logprobs", lambda: 0),
    ("temperature", lambda: 1.0),
    ("store", lambda: False),
    ("background", lambda: False),
    ("service_tier", lambda: "default"),
)


def backfill_response(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    """Fill a Responses object's missing keys with OpenAI's defaults (nullable ones are emitted
    as ``null`` by the schema itself)."""
    if obj.get("id") is None:
        obj["id"] = fallback_id()
    for key, make in _RESPONSE_DEFAULTS:
        if obj.get(key) is None:
            obj[key] = make()
    obj["model"] = alias


_EVENT_STATUS = {
    "response.created": "in_progress",
    "response.in_progress": "in_progress",
    "response.queued": "queued",
    "response.completed": "completed",
    "response.failed": "failed",
    "response.incomplete": "incomplete",
    "response.cancelled": "cancelled",
    "response.canceled": "cancelled",
}


def normalise_response_event(obj: dict[str, Any], alias: str, fallback_id: FallbackId) -> None:
    """A streaming event's ``response`` snapshot gets its status from the event type when
    missing, then the usual backfill."""
    snapshot = obj.get("response")
    if type(snapshot) is not dict:
        return
    if snapshot.get("status") is None:
        kind = obj.get("type")
        snapshot["status"] = (
            _EVENT_STATUS.get(kind, "completed") if type(kind) is str else "completed"
        )
    backfill_response(snapshot, alias, fallback_id)
