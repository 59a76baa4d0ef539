"""The tool seam of the multi-step loop: what a host plugs in to run server-side tools.

A :class:`ToolExecutor` lists the tools it offers for a request (``tools``, called once per loop
level) and runs one call (``execute``). ``ToolKind.AGENT`` tools are not executed: the loop runs
a sub-loop scoped under the tool step instead, and that sub-loop's result is the tool output.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import attrs

from onwards_trio._errors import OnwardsError

__all__ = [
    "NoOpToolExecutor",
    "RequestContext",
    "ToolError",
    "ToolErrorKind",
    "ToolExecutor",
    "ToolKind",
    "ToolSchema",
]

T = TypeVar("T")


class ToolKind(enum.StrEnum):
    HTTP = "http"
    AGENT = "agent"


@attrs.frozen
class ToolSchema:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(factory=lambda: {"type": "object"})
    strict: bool = True
    kind: ToolKind = ToolKind.HTTP
    # A call may safely run twice: a loop resumed after its process died re-runs a call of
    # this tool that was in flight (otherwise the call is recorded failed for the model).
    idempotent: bool = False


class ToolErrorKind(enum.StrEnum):
    NOT_FOUND = "not_found"
    EXECUTION = "execution_error"
    INVALID_ARGUMENTS = "invalid_arguments"
    TIMEOUT = "timeout"


_TOOL_PREFIX = {
    ToolErrorKind.NOT_FOUND: "Tool not found",
    ToolErrorKind.EXECUTION: "Tool execution error",
    ToolErrorKind.INVALID_ARGUMENTS: "Invalid arguments",
    ToolErrorKind.TIMEOUT: "Tool timeout",
}


class ToolError(OnwardsError):
    """A tool call failed. The loop persists it on the step; the default transition hands the
    text (``str(error)``) back to the model as the tool output."""

    def __init__(self, kind: ToolErrorKind, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(f"{_TOOL_PREFIX[kind]}: {message}")

    @classmethod
    def not_found(cls, name: str) -> ToolError:
        return cls(ToolErrorKind.NOT_FOUND, name)

    @classmethod
    def execution(cls, message: str) -> ToolError:
        return cls(ToolErrorKind.EXECUTION, message)

    @classmethod
    def invalid_arguments(cls, message: str) -> ToolError:
        return cls(ToolErrorKind.INVALID_ARGUMENTS, message)

    @classmethod
    def timeout(cls, message: str) -> ToolError:
        return cls(ToolErrorKind.TIMEOUT, message)


@attrs.frozen
class RequestContext:
    """Per-request data for tools: the model alias and typed extensions the host attached
    (auth identity, tenant, ...), keyed by type so unrelated hosts cannot collide."""

    model: str | None = None
    extensions: Mapping[type, Any] = attrs.field(factory=dict)

    def with_model(self, model: str) -> RequestContext:
        return attrs.evolve(self, model=model)

    def with_extension(self, value: object) -> RequestContext:
        return attrs.evolve(self, extensions={**self.extensions, type(value): value})

    def extension(self, cls: type[T]) -> T | None:
        value = self.extensions.get(cls)
        return value if isinstance(value, cls) else None


class ToolExecutor(Protocol):
    async def tools(self, ctx: RequestContext) -> Sequence[ToolSchema]:
        """The tools offered for this request."""
        ...

    async def execute(self, name: str, tool_call_id: str, args: Any, ctx: RequestContext) -> Any:
        """Run one call; return its JSON-able output or raise :class:`ToolError`.

        ``tool_call_id`` is the model's ``call_id`` when there is one, else the step id; either
        way it is stable for that step, so executors can use it as an idempotency key.
        """
        ...


class NoOpToolExecutor:
    """No tools: every call is ``NOT_FOUND``."""

    async def tools(self, ctx: RequestContext) -> Sequence[ToolSchema]:
        return ()

    async def execute(self, name: str, tool_call_id: str, args: Any, ctx: RequestContext) -> Any:
        raise ToolError.not_found(name)
