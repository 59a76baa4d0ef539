"""The step store seam of the multi-step loop: types and the :class:`MultiStepStore` protocol.

The loop owns no state of its own: every step it runs is a row in a store, so a response can be
inspected, resumed from its chain tail, or finished by another process. The protocol keeps the
onwards method set (``next_action_for``, ``record_step``, ``mark_step_processing``,
``complete_step``, ``fail_step``, ``list_chain``, ``assemble_response``) and adds what clean
cancellation and stored responses need:

* ``cancel_step`` moves a pending/processing step to ``canceled`` (a no-op on terminal steps),
  so the loop's shielded clean-up can never leave a step ``processing``;
* ``begin_response`` / ``finish_response`` / ``get_response`` hold the response row: the
  request the transition function works from and the response's final state;
* ``get_step`` reads one step (sub-agent scopes need their parent step).

``next_action_for`` also receives the tools the loop can run at this level, so a transition
function can tell a server-side tool call (run it as a tool step) from a client-side one (hand
it back to the caller).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import attrs

from onwards_trio._errors import OnwardsError

if TYPE_CHECKING:
    from onwards_trio._loop.tools import ToolSchema

__all__ = [
    "AppendSteps",
    "ChainStep",
    "Complete",
    "Fail",
    "MultiStepStore",
    "NextAction",
    "RecordedStep",
    "ResponseRecord",
    "ResponseStatus",
    "StepDescriptor",
    "StepKind",
    "StepState",
    "StoreError",
    "StoreErrorKind",
]


class StepKind(enum.StrEnum):
    MODEL_CALL = "model_call"
    TOOL_CALL = "tool_call"


class StepState(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({StepState.COMPLETED, StepState.FAILED, StepState.CANCELED})


class ResponseStatus(enum.StrEnum):
    """A response's state, with the Open Responses spellings."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self is not ResponseStatus.IN_PROGRESS


@attrs.frozen
class StepDescriptor:
    """What to run. Model steps carry a Chat Completions request; tool steps carry
    ``{"name", "args" | "arguments", "call_id"?}``."""

    kind: StepKind
    request_payload: Any

    @classmethod
    def model_call(cls, request: Any) -> StepDescriptor:
        return cls(StepKind.MODEL_CALL, request)

    @classmethod
    def tool_call(
        cls, name: str, args: Any = None, *, call_id: str | None = None
    ) -> StepDescriptor:
        payload: dict[str, Any] = {"name": name, "args": {} if args is None else args}
        if call_id is not None:
            payload["call_id"] = call_id
        return cls(StepKind.TOOL_CALL, payload)


def _steps(steps: Iterable[StepDescriptor]) -> tuple[StepDescriptor, ...]:
    return tuple(steps)


@attrs.frozen
class AppendSteps:
    """Record these steps and run them: one is a serial step, several are a parallel fan-out."""

    steps: tuple[StepDescriptor, ...] = attrs.field(converter=_steps)


@attrs.frozen
class Complete:
    payload: Any


@attrs.frozen
class Fail:
    payload: Any


NextAction: TypeAlias = AppendSteps | Complete | Fail


@attrs.frozen
class RecordedStep:
    id: str
    sequence: int


@attrs.frozen
class ChainStep:
    """One stored step. ``sequence`` is allocated per request (across scopes), strictly
    increasing, so it doubles as a stable order."""

    id: str
    kind: StepKind
    state: StepState
    sequence: int
    prev_step_id: str | None
    parent_step_id: str | None
    request_payload: Any = None
    response_payload: Any = None
    error: Any = None


@attrs.frozen
class ResponseRecord:
    id: str
    status: ResponseStatus
    request: Any = None
    output: Any = None


class StoreErrorKind(enum.StrEnum):
    NOT_FOUND = "not_found"
    STORAGE = "storage"
    SERIALIZATION = "serialization"
    CONFLICT = "conflict"


_STORE_PREFIX = {
    StoreErrorKind.NOT_FOUND: "Not found",
    StoreErrorKind.STORAGE: "Storage error",
    StoreErrorKind.SERIALIZATION: "Serialization error",
    StoreErrorKind.CONFLICT: "Conflict",
}


class StoreError(OnwardsError):
    """A store could not do what was asked. ``CONFLICT`` is an illegal state transition (for
    example completing a step that was already canceled)."""

    def __init__(self, kind: StoreErrorKind, message: str) -> None:
        self.kind = kind
        self.message = message
        super().__init__(f"{_STORE_PREFIX[kind]}: {message}")


class MultiStepStore(Protocol):
    async def next_action_for(
        self,
        request_id: str,
        scope_parent: str | None,
        tools: Mapping[str, ToolSchema],
    ) -> NextAction:
        """The transition function: what to do next in this scope."""
        ...

    async def record_step(
        self,
        request_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptor: StepDescriptor,
    ) -> RecordedStep:
        """Insert a pending step, allocating the request's next sequence atomically."""
        ...

    async def mark_step_processing(self, step_id: str) -> None: ...

    async def complete_step(self, step_id: str, payload: Any) -> None: ...

    async def fail_step(self, step_id: str, error: Any) -> None: ...

    async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
        """Cancel a non-terminal step; return False (and change nothing) if it is terminal."""
        ...

    async def get_step(self, step_id: str) -> ChainStep: ...

    async def list_chain(self, request_id: str, scope_parent: str | None) -> Sequence[ChainStep]:
        """The steps of one scope, ordered by sequence."""
        ...

    async def assemble_response(self, request_id: str) -> Any: ...

    async def begin_response(self, request_id: str, request: Any) -> None:
        """Create (or re-open, when resuming) the response row, status ``in_progress``."""
        ...

    async def finish_response(
        self, request_id: str, status: ResponseStatus, output: Any = None
    ) -> None:
        """Write the response's final state (creating the row if the host never began it)."""
        ...

    async def get_response(self, request_id: str) -> ResponseRecord | None: ...


class StepTransitions:
    """The step state machine of the SQL stores, on top of one conditional update each store
    implements (``_transition``): from pending to processing, from an open state to a
    terminal one. A refused move of a step that exists is a ``CONFLICT``."""

    _OPEN: tuple[str, ...] = ("pending", "processing")

    async def _transition(
        self, step_id: str, to: StepState, from_states: Sequence[str], column: str, value: Any
    ) -> bool:
        """Move a step from one of ``from_states`` to ``to``, setting ``column`` to ``value``;
        False if it was in another state (``NOT_FOUND`` if it does not exist)."""
        raise NotImplementedError

    async def get_step(self, step_id: str) -> ChainStep:
        raise NotImplementedError

    async def get_response(self, request_id: str) -> ResponseRecord | None:
        raise NotImplementedError

    async def _must(self, step_id: str, ok: bool) -> None:
        if not ok:
            step = await self.get_step(step_id)
            raise StoreError(StoreErrorKind.CONFLICT, f"step {step_id} is {step.state.value}")

    async def mark_step_processing(self, step_id: str) -> None:
        ok = await self._transition(step_id, StepState.PROCESSING, ("pending",), "error", None)
        await self._must(step_id, ok)

    async def complete_step(self, step_id: str, payload: Any) -> None:
        ok = await self._transition(
            step_id, StepState.COMPLETED, self._OPEN, "response_payload", payload
        )
        await self._must(step_id, ok)

    async def fail_step(self, step_id: str, error: Any) -> None:
        ok = await self._transition(step_id, StepState.FAILED, self._OPEN, "error", error)
        await self._must(step_id, ok)

    async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
        return await self._transition(step_id, StepState.CANCELED, self._OPEN, "error", reason)

    async def assemble_response(self, request_id: str) -> Any:
        record = await self.get_response(request_id)
        if record is None:
            raise StoreError(StoreErrorKind.NOT_FOUND, request_id)
        return record.output
