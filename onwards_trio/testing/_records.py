"""What reached the scripted models and tools, as the test reads it back.

Headers are kept minus secrets (any credential-looking header is replaced by ``"<redacted>"``),
so a failing assertion can print them freely.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson

__all__ = [
    "ModelCall",
    "Step",
    "ToolCall",
    "assert_subset",
    "pretty",
    "redact_headers",
]

REDACTED = "<redacted>"
_SECRET_NAMES = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie", "set-cookie"}
)
_SECRET_PARTS = ("key", "token", "secret", "password", "auth")


def is_secret_header(name: str) -> bool:
    lower = name.lower()
    return lower in _SECRET_NAMES or any(part in lower for part in _SECRET_PARTS)


def redact_headers(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names; credential-looking values replaced (never kept, never printed)."""
    return {k.lower(): (REDACTED if is_secret_header(k) else v) for k, v in headers}


def pretty(value: Any) -> str:
    """Stable, indented JSON for diffs (sorted keys)."""
    return orjson.dumps(
        value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS, default=repr
    ).decode()


def _project(actual: Any, expected: Any) -> Any:
    """``actual`` cut down to the shape of ``expected`` (dict keys it names), for a diff that
    shows only what the test asked about."""
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        return {k: _project(actual[k], v) for k, v in expected.items() if k in actual}
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [_project(a, e) for a, e in zip(actual, expected, strict=True)]
    return actual


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and _contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


def assert_subset(actual: Any, expected: Any, what: str) -> None:
    """Fail unless every key/value in ``expected`` is in ``actual`` (dicts match by subset,
    lists item by item), with a unified diff of the part that differs."""
    if _contains(actual, expected):
        return
    diff = difflib.unified_diff(
        pretty(expected).splitlines(),
        pretty(_project(actual, expected)).splitlines(),
        "expected",
        "actual",
        lineterm="",
    )
    raise AssertionError(f"{what} does not match:\n" + "\n".join(diff))


@attrs.frozen
class ModelCall:
    """One request a scripted (or recorded) model received, after the gateway."""

    alias: str
    path: str
    body: Any
    headers: Mapping[str, str]

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        return list(messages) if isinstance(messages, list) else []

    @property
    def tool_names(self) -> list[str]:
        """The tools offered to the model on this call."""
        tools = self.body.get("tools") if isinstance(self.body, dict) else None
        names = []
        for tool in tools or ():
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
        return names

    @property
    def last_user_text(self) -> str | None:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return None

    def assert_body(self, expected: Mapping[str, Any]) -> None:
        """Assert the body contains ``expected`` (a subset), with a diff when it does not."""
        assert_subset(self.body, expected, f"the request body {self.alias!r} received")


@attrs.frozen
class ToolCall:
    """One call of a Python tool by the gateway's loop."""

    name: str
    arguments: Any
    call_id: str | None
    output: Any = None
    error: str | None = None


@attrs.frozen
class Step:
    """One step of a response's loop, as the gateway stored it (model call or tool call)."""

    sequence: int
    kind: str
    state: str
    request: Any
    result: Any = None
    error: Any = None

    @property
    def tool_name(self) -> str | None:
        if self.kind == "tool_call" and isinstance(self.request, dict):
            name = self.request.get("name")
            return name if isinstance(name, str) else None
        return None
