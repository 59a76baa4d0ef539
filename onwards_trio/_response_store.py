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

Two implementations: :class:`MemoryResponseStore` (tests, single process) and
:class:`SqliteResponseStore` (the embedded default: one file, WAL, its own tables, so it may
share the file with the loop's step store). SQLite calls are blocking, so they run in
``trio.to_thread.run_sync`` on one connection serialised by a dedicated ``CapacityLimiter(1)``
(:class:`~onwards_trio._store_sqlite.SqliteFile`, shared with the step store).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs
import orjson
import trio

from ._store_sqlite import SqliteFile, transaction

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "MemoryResponseStore",
    "ResponseStore",
    "SharedResponseStore",
    "SqliteResponseStore",
    "StoredEvent",
    "StoredResponse",
    "can_transition",
]

T = TypeVar("T")

TERMINAL_STATUSES = frozenset({"completed", "failed", "incomplete", "cancelled"})
STATUSES = frozenset({"queued", "in_progress"}) | TERMINAL_STATUSES
_ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"queued", "in_progress"}) | TERMINAL_STATUSES,
    "in_progress": frozenset({"in_progress"}) | TERMINAL_STATUSES,
}


def can_transition(current: str, new: str) -> bool:
    """Whether a response in ``current`` may be rewritten with status ``new``."""
    return new in _ALLOWED.get(current, frozenset())


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


def _copy(obj: T) -> T:
    # Stored JSON must not alias the caller's (mutable) dicts.
    result: T = orjson.loads(orjson.dumps(obj))
    return result


class MemoryResponseStore:
    """A process-local store; contents are lost when the process ends."""

    def __init__(self) -> None:
        self._records: dict[str, StoredResponse] = {}
        self._events: dict[str, list[StoredEvent]] = {}

    async def create(self, record: StoredResponse) -> None:
        await trio.lowlevel.checkpoint()
        if record.id in self._records:
            raise ValueError(f"response {record.id!r} already exists")
        self._records[record.id] = attrs.evolve(
            record,
            response=_copy(record.response),
            input_items=_copy(record.input_items),
            context_items=_copy(record.context_items),
        )
        self._events[record.id] = []

    async def get(self, response_id: str) -> StoredResponse | None:
        await trio.lowlevel.checkpoint()
        record = self._records.get(response_id)
        if record is None:
            return None
        return attrs.evolve(
            record,
            response=_copy(record.response),
            input_items=_copy(record.input_items),
            context_items=_copy(record.context_items),
        )

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        await trio.lowlevel.checkpoint()
        record = self._records.get(response_id)
        if record is None or not can_transition(record.status, str(response.get("status"))):
            return False
        self._records[response_id] = attrs.evolve(record, response=_copy(response))
        return True

    async def delete(self, response_id: str) -> bool:
        await trio.lowlevel.checkpoint()
        self._events.pop(response_id, None)
        return self._records.pop(response_id, None) is not None

    async def append_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        await trio.lowlevel.checkpoint()
        log = self._events.get(response_id)
        if log is not None:
            log.extend(events)

    async def events_after(self, response_id: str, after: int) -> list[StoredEvent]:
        await trio.lowlevel.checkpoint()
        return [e for e in self._events.get(response_id, []) if e.sequence > after]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS oresp_responses (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    context_items TEXT NOT NULL,
    background INTEGER NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS oresp_events (
    response_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (response_id, seq)
);
"""


class SqliteResponseStore:
    """The embedded default: one SQLite file (WAL), schema created on first use.

    The connection is a :class:`~onwards_trio._store_sqlite.SqliteFile`: used from one worker
    thread at a time, and a call that has started is not abandoned when its caller is
    cancelled, so a write is never left half done.
    """

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._db = SqliteFile(path, _SCHEMA, busy_timeout=busy_timeout)

    async def create(self, record: StoredResponse) -> None:
        row = (
            record.id,
            record.status,
            orjson.dumps(record.response).decode(),
            orjson.dumps(record.input_items).decode(),
            orjson.dumps(record.context_items).decode(),
            int(record.background),
            record.created_at,
            record.owner,
        )

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO oresp_responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise ValueError(f"response {record.id!r} already exists") from None

        await self._db.run(insert)

    async def get(self, response_id: str) -> StoredResponse | None:
        def select(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            cur = conn.execute(
                "SELECT response, input_items, context_items, background, created_at, owner "
                "FROM oresp_responses WHERE id = ?",
                (response_id,),
            )
            row: tuple[Any, ...] | None = cur.fetchone()
            return row

        row = await self._db.run(select)
        if row is None:
            return None
        response, input_items, context_items, background, created_at, owner = row
        return StoredResponse(
            id=response_id,
            response=orjson.loads(response),
            input_items=orjson.loads(input_items),
            context_items=orjson.loads(context_items),
            background=bool(background),
            created_at=float(created_at),
            owner=owner,
        )

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        new = str(response.get("status"))
        allowed = sorted(s for s, targets in _ALLOWED.items() if new in targets)
        if not allowed:
            return False
        data = orjson.dumps(response).decode()
        marks = ", ".join("?" for _ in allowed)

        def write(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"UPDATE oresp_responses SET status = ?, response = ? "
                f"WHERE id = ? AND status IN ({marks})",
                (new, data, response_id, *allowed),
            )
            return cur.rowcount == 1

        return await self._db.run(write)

    async def delete(self, response_id: str) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                conn.execute("DELETE FROM oresp_events WHERE response_id = ?", (response_id,))
                cur = conn.execute("DELETE FROM oresp_responses WHERE id = ?", (response_id,))
            return cur.rowcount == 1

        return await self._db.run(remove)

    async def append_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        if not events:
            return
        rows = [(response_id, e.sequence, e.type, e.data, response_id) for e in events]

        def insert(conn: sqlite3.Connection) -> None:
            # Only for a response that exists (as the memory store): a loop still flushing
            # after a DELETE must not leave its events behind.
            with transaction(conn):
                conn.executemany(
                    "INSERT OR REPLACE INTO oresp_events SELECT ?, ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM oresp_responses WHERE id = ?)",
                    rows,
                )

        await self._db.run(insert)

    async def events_after(self, response_id: str, after: int) -> list[StoredEvent]:
        def select(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            cur = conn.execute(
                "SELECT seq, type, data FROM oresp_events WHERE response_id = ? AND seq > ? "
                "ORDER BY seq",
                (response_id, after),
            )
            return cur.fetchall()

        rows = await self._db.run(select)
        return [StoredEvent(int(s), str(t), bytes(d)) for s, t, d in rows]

    async def aclose(self) -> None:
        await self._db.aclose()
