"""Stored Open Responses: the Response objects, their input items and their event logs.

``/v1/responses`` keeps three things per stored response (SPEC §3.5):

* the latest **Response object** (what ``GET /v1/responses/{id}`` returns), whose ``status``
  only moves forward: ``queued → in_progress → completed | failed | incomplete | cancelled``.
  A terminal status is final — :meth:`ResponseStore.update` refuses to leave it, which is what
  settles the race between a cancel and a loop finishing at the same moment: the first write wins;
* the **items**: the conversation replayed before this response (``context_items``, from
  ``previous_response_id``) and its own ``input_items``, so a later ``previous_response_id`` can
  replay inputs *and* outputs (fix of reference §5.3.21) with one read;
* the **event log** of a background response (the SSE events exactly as sent, by sequence
  number), so ``GET /v1/responses/{id}?stream=true&starting_after=N`` can resume.

Each backend module (``memory``, ``sqlite``, ``postgres``) implements this protocol next to
the loop's step store, and a :class:`StoreBackend` bundles the two over one connection (pool).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs
import trio

from onwards_trio._loop.steps import MultiStepStore

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "ResponseStore",
    "SharedResponseStore",
    "StoreBackend",
    "StoredEvent",
    "StoredResponse",
    "can_transition",
]

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"completed", "failed", "incomplete", "cancelled"})
STATUSES = frozenset({"queued", "in_progress"}) | TERMINAL_STATUSES
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "in_progress"}) | TERMINAL_STATUSES,
    "in_progress": frozenset({"in_progress"}) | TERMINAL_STATUSES,
}


def can_transition(current: str, new: str) -> bool:
    """Whether a response in ``current`` may be rewritten with status ``new``."""
    return new in ALLOWED_TRANSITIONS.get(current, frozenset())


@attrs.frozen
class StoredEvent:
    """One SSE event of a response as sent: ``data`` is its JSON (with ``sequence_number``)."""

    sequence: int
    type: str
    data: bytes


@attrs.frozen
class StoredResponse:
    """A stored response. ``response`` is the Response object; its ``status`` is ``status``."""

    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]] = attrs.field(factory=list)
    context_items: list[dict[str, Any]] = attrs.field(factory=list)
    background: bool = False
    created_at: float = attrs.field(factory=time.time)
    # A digest of the API key that created the response (None: created without a key); the
    # HTTP layer only shows a response to the key that made it.
    owner: str | None = None

    @property
    def status(self) -> str:
        return str(self.response.get("status", "completed"))

    @property
    def output(self) -> list[dict[str, Any]]:
        out = self.response.get("output")
        return list(out) if isinstance(out, list) else []

    def conversation(self) -> list[dict[str, Any]]:
        """Everything a follow-up response replays: context, inputs, then outputs."""
        return [*self.context_items, *self.input_items, *self.output]


class ResponseStore(Protocol):
    """Where ``/v1/responses`` keeps stored responses. All methods are Trio-async."""

    async def create(self, record: StoredResponse) -> None:
        """Insert a new response (its id must be new)."""

    async def get(self, response_id: str) -> StoredResponse | None:
        """The response, or ``None`` when unknown (or deleted)."""

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        """Replace the Response object if its status may move to ``response["status"]``.

        Returns ``False`` (and changes nothing) for an unknown id or a refused transition —
        in particular once the stored status is terminal.
        """

    async def delete(self, response_id: str) -> bool:
        """Forget the response, its items and its events. ``False`` when unknown."""

    async def append_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        """Append events to the response's log (sequence numbers increase); nothing for an
        unknown (or deleted) response."""

    async def events_after(self, response_id: str, after: int) -> list[StoredEvent]:
        """Logged events with ``sequence > after``, in order."""

    async def aclose(self) -> None:
        """Release resources (connections)."""


@runtime_checkable
class SharedResponseStore(Protocol):
    """A response store that other gateway processes write to as well (PostgreSQL).

    A cancel or a ``DELETE`` may then be written by a replica that does not run the response,
    so the replica that runs it polls :meth:`status` and stops its loop. Stores without this
    method (memory, SQLite) are not polled: every cancel reaches the process that runs the
    response.
    """

    async def status(self, response_id: str) -> str | None:
        """The stored status alone, or ``None`` when the response is unknown (or deleted)."""


@attrs.define(eq=False)
class StoreBackend:
    """One storage backend: the loop's step store and the Responses store over one connection
    (or pool), opened from one ``store`` config entry and closed together."""

    steps: MultiStepStore
    responses: ResponseStore

    async def aclose(self) -> None:
        """Close both (they may share a connection; closing is idempotent)."""
        with trio.CancelScope(shield=True):
            await self.responses.aclose()
            aclose = getattr(self.steps, "aclose", None)
            if aclose is not None:
                await aclose()
