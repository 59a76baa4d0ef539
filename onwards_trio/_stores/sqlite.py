"""SQLite stores: the embedded default, one file, no set-up.

One connection (``check_same_thread=False``, WAL, ``synchronous=FULL`` unless configured
``NORMAL``) used only by one writer thread at a time (:mod:`~onwards_trio._stores.batching`),
so calls are serialised and the event loop never blocks on disk. The schema is created on
first use. A thread that has started is never abandoned on cancellation
(trio's default), so a write either commits or raises; it is never half done. Sequence
allocation happens inside ``BEGIN IMMEDIATE`` so that several processes sharing the file
still allocate distinct, increasing sequences.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson
import outcome
import trio

from onwards_trio._loop.steps import (
    ChainStep,
    NextAction,
    RecordedStep,
    ResponseRecord,
    ResponseStatus,
    StepDescriptor,
    StepKind,
    StepState,
    StepTransitions,
    StoreError,
    StoreErrorKind,
)
from onwards_trio._loop.tools import ToolSchema
from onwards_trio._loop.transition import ScopeView, Transition, open_responses_transition
from onwards_trio._stores.base import (
    Claim,
    FinishedResponse,
    IdempotencyRecord,
    SqlDurableStore,
    SqlUsageStore,
    StoreBackend,
    StoredEvent,
    StoredResponse,
    claim_of,
    finished_response_text,
    idempotency_record,
    response_row,
    statuses_before,
    step_row,
)
from onwards_trio._stores.batching import Call, GroupCommit
from onwards_trio._stores.memory import new_step_id

__all__ = [
    "SqliteBackend",
    "SqliteDurableStore",
    "SqliteFile",
    "SqliteResponseStore",
    "SqliteStore",
    "SqliteUsageStore",
    "transaction",
]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loop_responses (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT,
    output TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS loop_steps (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    scope_parent TEXT,
    prev_step_id TEXT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    request_payload TEXT,
    response_payload TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (request_id, sequence)
);
DROP INDEX IF EXISTS loop_steps_scope;
"""

_STEP_COLUMNS = (
    "id, kind, state, sequence, prev_step_id, scope_parent, "
    "request_payload, response_payload, error"
)


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError as e:
        raise StoreError(StoreErrorKind.SERIALIZATION, str(e)) from None


def _dumps_once() -> Callable[[Any], str | None]:
    """:func:`_dump` that encodes an object it has seen once only: a finished response's
    chat request is both its loop row's request and its first step's payload (the same
    object, as the response's private memory store does not copy)."""
    texts: dict[int, str | None] = {}

    def dump(value: Any) -> str | None:
        if value is None:
            return None
        key = id(value)  # every value outlives the call: ids are not reused meanwhile
        if key not in texts:
            texts[key] = _dump(value)
        return texts[key]

    return dump


def _load(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def _step(row: tuple[Any, ...]) -> ChainStep:
    return ChainStep(
        id=row[0],
        kind=StepKind(row[1]),
        state=StepState(row[2]),
        sequence=row[3],
        prev_step_id=row[4],
        parent_step_id=row[5],
        request_payload=_load(row[6]),
        response_payload=_load(row[7]),
        error=_load(row[8]),
    )


def _storage(e: sqlite3.Error) -> StoreError:
    return StoreError(StoreErrorKind.STORAGE, f"{type(e).__name__}: {e}")


class SqliteFile:
    """One SQLite connection to ``path`` for Trio code; the plumbing both SQLite stores share.

    The connection (``check_same_thread=False``, autocommit, WAL, ``synchronous`` as given,
    ``schema`` applied) is opened lazily in a worker thread and only ever used from one thread
    at a time (this file's own ``CapacityLimiter(1)``). ``on_error`` turns ``sqlite3.Error``
    into the store's own exception.

    **Group commit.** Calls that arrive while another batch is in the worker thread queue up
    and then run together: one thread hop and one transaction (``BEGIN IMMEDIATE`` …
    ``COMMIT``) for all of them, each call inside its own savepoint, so a call that fails
    rolls back only its own writes. A thread hop costs far more than a small SQLite statement,
    so with many responses in flight this is what lets stored responses keep up with unstored
    ones. A lone call runs on its own, in autocommit mode, as before.

    Durability is unchanged by batching: a call returns only after the transaction holding
    its writes has committed. With ``synchronous="full"`` (the default) each commit is
    flushed to disk (the WAL ``fsync``ed) first, one flush per batch; with ``"normal"``
    committed transactions survive a crash of the process but the last ones may be lost on
    power loss or an OS crash (SQLite's documented trade-off in WAL mode).
    A call that has been taken into a batch is not abandoned on cancellation, so a write
    either commits or raises; a queued call that is cancelled before its batch starts never
    runs.
    """

    def __init__(
        self,
        path: str,
        schema: str,
        *,
        busy_timeout: float = 5.0,
        on_error: Callable[[sqlite3.Error], Exception] | None = None,
        max_batch: int = 128,
        synchronous: str = "full",
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError("synchronous must be 'full' or 'normal'")
        self.path = path
        self.synchronous = synchronous
        self._schema = schema
        self._busy_timeout = busy_timeout
        self._on_error = on_error
        self._conn: sqlite3.Connection | None = None
        self._group: GroupCommit[sqlite3.Connection] = GroupCommit(
            self._run_batch, max_batch=max_batch
        )

    @property
    def _queue(self) -> list[Call[sqlite3.Connection]]:
        return self._group.queue

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # autocommit; multi-statement writes use transaction()
                check_same_thread=False,
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
                conn.executescript(self._schema)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _error(self, e: BaseException) -> BaseException:
        if isinstance(e, sqlite3.Error) and self._on_error is not None:
            mapped = self._on_error(e)
            mapped.__cause__ = None
            mapped.__suppress_context__ = True
            return mapped
        return e

    def _run_batch(self, batch: list[Call[sqlite3.Connection]]) -> None:
        """In the writer thread: every call of ``batch``, one transaction when more than one.

        The rows of the calls that carry them (:meth:`insert`) go first, each table's in one
        multi-row ``INSERT``, with no savepoint: a statement releases and retakes the GIL that
        the busy Trio thread holds, so a batch's hand-offs stay a handful however many
        responses it holds. Should that fail, the transaction is rolled back (nothing else is
        in it yet) and begun again, and those calls run one by one like the others."""
        if batch[0].alone:  # closing the connection: it must not open one first
            (call,) = batch
            call.outcome = outcome.capture(call.fn, cast(sqlite3.Connection, None))
            return
        try:
            conn = self._connect()
        except BaseException as e:
            for call in batch:
                call.outcome = outcome.Error(self._error(e))
            return
        merged = [call for call in batch if call.merge is not None]
        if len(batch) == 1 and not merged:
            (call,) = batch
            try:
                call.outcome = outcome.Value(call.fn(conn))
            except Exception as e:
                call.outcome = outcome.Error(self._error(e))
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            rest = batch
            if merged:
                try:
                    _insert_together(conn, merged)
                except sqlite3.Error:
                    conn.execute("ROLLBACK")
                    conn.execute("BEGIN IMMEDIATE")
                else:
                    for call in merged:
                        call.outcome = outcome.Value(call.value)
                    rest = [call for call in batch if call.merge is None]
            for call in rest:
                conn.execute("SAVEPOINT onwards_call")
                try:
                    value = call.fn(conn)
                except Exception as e:
                    conn.execute("ROLLBACK TO onwards_call")
                    conn.execute("RELEASE onwards_call")
                    call.outcome = outcome.Error(self._error(e))
                else:
                    conn.execute("RELEASE onwards_call")
                    call.outcome = outcome.Value(value)
            conn.execute("COMMIT")
        except Exception as e:  # the transaction itself failed: nothing of it was written
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for call in batch:
                call.outcome = outcome.Error(self._error(e))

    async def run(
        self, fn: Callable[[sqlite3.Connection], T], start_within: float | None = None
    ) -> T:
        """``fn(connection)`` in the writer thread, batched with the calls that queue meanwhile
        (``start_within``: shielded and bounded, :meth:`GroupCommit.run`)."""
        return await self._group.run(fn, start_within=start_within)

    async def insert(
        self,
        fn: Callable[[sqlite3.Connection], T],
        rows: Sequence[tuple[str, Sequence[tuple[Any, ...]]]],
        value: T,
        start_within: float | None = None,
    ) -> T:
        """``fn`` as :meth:`run` does, for a call whose writes are exactly ``rows``:
        ``(insert, rows)`` pairs, ``insert`` an ``INSERT … VALUES`` up to its one row of
        placeholders. In a batch, such calls' rows are inserted together and each returns
        ``value``; ``fn`` runs only when that fails (or when the call is alone)."""
        return await self._group.run(fn, merge=rows, value=value, start_within=start_within)

    async def aclose(self) -> None:
        """Close the connection (shielded: a cancelled close would leak it), after the calls
        queued before it."""

        def close(_: sqlite3.Connection | None) -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        with trio.CancelScope(shield=True):
            await self._group.run(close, alone=True)


# SQLite's limit on one statement's parameters is 32,766; a batch's rows go in chunks below it.
_MAX_PARAMS = 30_000

# What a batch's rows bind for None. sqlite3 binds None as NULL only after its adaptation
# lookup has failed (two attribute lookups, one raising AttributeError: ~3k instructions a
# value, in the writer thread, holding the GIL the Trio thread needs). A float NaN is bound at
# once, and SQLite stores a bound NaN as NULL (it keeps no NaN), so the rows are the same.
_NULL = float("nan")


def _insert_together(conn: sqlite3.Connection, calls: list[Call[sqlite3.Connection]]) -> None:
    """The rows of ``calls`` (:meth:`SqliteFile.insert`), one multi-row ``INSERT`` per table
    (in chunks); raises ``sqlite3.Error`` when one fails (its caller rolls back)."""
    tables: dict[str, list[tuple[Any, ...]]] = {}
    for call in calls:
        for sql, rows in call.merge:
            if rows:
                tables.setdefault(sql, []).extend(rows)
    for sql, rows in tables.items():
        step = max(1, _MAX_PARAMS // len(rows[0]))
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            values = [_NULL if v is None else v for row in chunk for v in row]
            conn.execute(_rows_sql(sql, len(chunk)), values)


@functools.lru_cache(maxsize=256)
def _rows_sql(sql: str, n: int) -> str:
    """``sql`` (an ``INSERT … VALUES (?, …)``) with its row of placeholders ``n`` times."""
    insert, _, marks = sql.partition(" VALUES ")
    return f"{insert} VALUES {', '.join([marks] * n)}"


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """``begin`` … ``COMMIT``, rolled back if anything (the commit included) fails, so the
    connection is never left inside a transaction. Inside a group commit (already in a
    transaction, which holds the write lock) it is a savepoint of its own."""
    nested = db.in_transaction
    if nested:
        db.execute("SAVEPOINT onwards_tx")
        try:
            yield
            db.execute("RELEASE onwards_tx")
        except BaseException:
            db.execute("ROLLBACK TO onwards_tx")
            db.execute("RELEASE onwards_tx")
            raise
        return
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteStore(StepTransitions):
    def __init__(
        self,
        path: str | os.PathLike[str],
        transition: Transition | None = None,
        *,
        busy_timeout: float = 5.0,
        db: SqliteFile | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.transition = transition if transition is not None else open_responses_transition
        self._db = db or SqliteFile(
            self.path, _SCHEMA, busy_timeout=busy_timeout, on_error=_storage
        )

    # -- plumbing -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._db.aclose()

    async def __aenter__(self) -> SqliteStore:
        await self._db.run(lambda db: None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _get(db: sqlite3.Connection, step_id: str) -> ChainStep:
        row = db.execute(
            f"SELECT {_STEP_COLUMNS} FROM loop_steps WHERE id = ?", (step_id,)
        ).fetchone()
        if row is None:
            raise StoreError(StoreErrorKind.NOT_FOUND, f"step {step_id}")
        return _step(row)

    @staticmethod
    def _chain(
        db: sqlite3.Connection, request_id: str, scope_parent: str | None
    ) -> list[ChainStep]:
        rows = db.execute(
            f"SELECT {_STEP_COLUMNS} FROM loop_steps WHERE request_id = ? AND scope_parent IS ? "
            "ORDER BY sequence",
            (request_id, scope_parent),
        ).fetchall()
        return [_step(r) for r in rows]

    @staticmethod
    def _response(db: sqlite3.Connection, request_id: str) -> ResponseRecord | None:
        row = db.execute(
            "SELECT status, request, output FROM loop_responses WHERE id = ?", (request_id,)
        ).fetchone()
        if row is None:
            return None
        return ResponseRecord(request_id, ResponseStatus(row[0]), _load(row[1]), _load(row[2]))

    # -- protocol -------------------------------------------------------------------------------

    async def next_action_for(
        self, request_id: str, scope_parent: str | None, tools: Mapping[str, ToolSchema]
    ) -> NextAction:
        def read(db: sqlite3.Connection) -> ScopeView:
            return ScopeView(
                request_id=request_id,
                scope_parent=scope_parent,
                response=self._response(db, request_id),
                parent_step=self._get(db, scope_parent) if scope_parent else None,
                chain=self._chain(db, request_id, scope_parent),
                tools=tools,
            )

        return self.transition(await self._db.run(read))

    async def record_step(
        self,
        request_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptor: StepDescriptor,
    ) -> RecordedStep:
        payload = _dump(descriptor.request_payload)
        step_id = new_step_id()

        def write(db: sqlite3.Connection) -> RecordedStep:
            now = time.time()
            with transaction(db, "BEGIN IMMEDIATE"):
                (sequence,) = db.execute(
                    "SELECT COALESCE(MAX(sequence), 0) + 1 FROM loop_steps WHERE request_id = ?",
                    (request_id,),
                ).fetchone()
                db.execute(
                    "INSERT INTO loop_steps (id, request_id, scope_parent, prev_step_id, kind, "
                    "state, sequence, request_payload, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                    (
                        step_id,
                        request_id,
                        scope_parent,
                        prev_step_id,
                        descriptor.kind.value,
                        sequence,
                        payload,
                        now,
                        now,
                    ),
                )
            return RecordedStep(step_id, sequence)

        return await self._db.run(write)

    async def _transition(
        self, step_id: str, to: StepState, from_states: Sequence[str], column: str, value: Any
    ) -> bool:
        """Move a step from one of ``from_states`` to ``to``; False if it was elsewhere."""
        text = _dump(value)
        marks = ", ".join("?" * len(from_states))
        sql = (
            f"UPDATE loop_steps SET state = ?, {column} = ?, updated_at = ? "
            f"WHERE id = ? AND state IN ({marks})"
        )

        def write(db: sqlite3.Connection) -> bool:
            cur = db.execute(sql, (to.value, text, time.time(), step_id, *from_states))
            if cur.rowcount == 1:
                return True
            self._get(db, step_id)  # NOT_FOUND if it does not exist
            return False

        return await self._db.run(write)

    async def get_step(self, step_id: str) -> ChainStep:
        return await self._db.run(lambda db: self._get(db, step_id))

    async def list_chain(self, request_id: str, scope_parent: str | None) -> Sequence[ChainStep]:
        return await self._db.run(lambda db: self._chain(db, request_id, scope_parent))

    async def begin_response(self, request_id: str, request: Any) -> None:
        text = _dump(request)

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "INSERT INTO loop_responses (id, status, request, output, created_at, updated_at) "
                "VALUES (?, 'in_progress', ?, NULL, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET status = 'in_progress', "
                "request = COALESCE(excluded.request, request), output = NULL, "
                "updated_at = excluded.updated_at",
                (request_id, text, now, now),
            )

        await self._db.run(write)

    async def finish_response(
        self, request_id: str, status: ResponseStatus, output: Any = None
    ) -> None:
        text = _dump(output)

        def write(db: sqlite3.Connection) -> None:
            now = time.time()
            db.execute(
                "INSERT INTO loop_responses (id, status, request, output, created_at, updated_at) "
                "VALUES (?, ?, NULL, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
                "output = excluded.output, updated_at = excluded.updated_at",
                (request_id, status.value, text, now, now),
            )

        await self._db.run(write)

    async def get_response(self, request_id: str) -> ResponseRecord | None:
        return await self._db.run(lambda db: self._response(db, request_id))


# -- Responses objects ----------------------------------------------------------------------------

_RESPONSES_SCHEMA = """
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

    The connection is a :class:`~onwards_trio._stores.sqlite.SqliteFile`: used from one worker
    thread at a time, and a call that has started is not abandoned when its caller is
    cancelled, so a write is never left half done.
    """

    def __init__(
        self, path: str, *, busy_timeout: float = 5.0, db: SqliteFile | None = None
    ) -> None:
        self.path = path
        self._db = db or SqliteFile(path, _RESPONSES_SCHEMA, busy_timeout=busy_timeout)

    async def create(self, record: StoredResponse) -> None:
        row = response_row(record)
        await self._db.run(lambda conn: self._insert(conn, record.id, row))

    @staticmethod
    def _insert(conn: sqlite3.Connection, response_id: str, row: tuple[Any, ...]) -> None:
        try:
            conn.execute(_INSERT_RESPONSE, row)
        except sqlite3.IntegrityError:
            raise ValueError(f"response {response_id!r} already exists") from None

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
        if not statuses_before(new):
            return False
        data = orjson.dumps(response).decode()
        return await self._db.run(lambda conn: self._update(conn, response_id, new, data))

    @staticmethod
    def _update(conn: sqlite3.Connection, response_id: str, new: str, data: str) -> bool:
        """The conditional status move of :meth:`update`: only from a status that may move
        to ``new``."""
        allowed = statuses_before(new)
        marks = ", ".join("?" for _ in allowed)
        cur = conn.execute(
            f"UPDATE oresp_responses SET status = ?, response = ? "
            f"WHERE id = ? AND status IN ({marks})",
            (new, data, response_id, *allowed),
        )
        return cur.rowcount == 1

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


# -- leases and idempotency records ---------------------------------------------------------------

_DURABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS oresp_leases (
    response_id TEXT PRIMARY KEY,
    owner TEXT,
    expires_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    resume TEXT
);
CREATE INDEX IF NOT EXISTS oresp_leases_owner ON oresp_leases (owner);
CREATE INDEX IF NOT EXISTS oresp_leases_expiry ON oresp_leases (expires_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    started_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    status INTEGER,
    headers TEXT,
    body BLOB,
    PRIMARY KEY (scope, key)
);
"""


class SqliteDurableStore(SqlDurableStore):
    """:class:`~onwards_trio._stores.base.DurableStore` in the SQLite file: leases between
    processes on one host (a restarted gateway claims what the dead one held), and
    ``Idempotency-Key`` records. Claims and new keys are taken inside ``BEGIN IMMEDIATE``, so
    two processes on the file never take the same one."""

    # The system clock in epoch seconds (julianday counts days from 4714 BC, in ms).
    _NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(
        self, path: str, *, busy_timeout: float = 5.0, db: SqliteFile | None = None
    ) -> None:
        self.path = path
        self._db = db or SqliteFile(path, _DURABLE_SCHEMA, busy_timeout=busy_timeout)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        text = sql.replace("%s", "?").replace("{now}", self._NOW)
        return await self._db.run(lambda db: db.execute(text, tuple(params)).fetchall())

    async def claim_expired(self, owner: str, lease_secs: float, limit: int) -> list[Claim]:
        expired = f"SELECT response_id FROM oresp_leases WHERE expires_at < {self._NOW} "

        def claim(db: sqlite3.Connection) -> list[Claim]:
            # The common case (nothing expired) is one read and takes no write lock.
            if db.execute(expired + "LIMIT 1").fetchone() is None:
                return []
            with transaction(db, "BEGIN IMMEDIATE"):
                rows = db.execute(
                    f"UPDATE oresp_leases SET owner = ?, expires_at = {self._NOW} + ?, "
                    "attempts = attempts + (owner IS NOT NULL) "
                    f"WHERE response_id IN ({expired}ORDER BY expires_at LIMIT ?) "
                    "RETURNING response_id, attempts, resume",
                    (owner, lease_secs, limit),
                ).fetchall()
            return [claim_of(r) for r in rows]

        return await self._db.run(claim)

    async def idempotency_begin(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        owner: str,
        ttl_secs: float,
        stale_after: float,
    ) -> IdempotencyRecord | None:
        def begin(db: sqlite3.Connection) -> IdempotencyRecord | None:
            now = time.time()
            with transaction(db, "BEGIN IMMEDIATE"):
                row = db.execute(
                    "SELECT fingerprint, state, status, headers, body, started_at, expires_at "
                    "FROM idempotency_keys WHERE scope = ? AND key = ?",
                    (scope, key),
                ).fetchone()
                if row is not None and not (
                    row[6] < now or (row[1] == "in_flight" and row[5] < now - stale_after)
                ):
                    return idempotency_record(row)
                db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (scope, key, fingerprint, state, "
                    "owner, started_at, expires_at) VALUES (?, ?, ?, 'in_flight', ?, ?, ?)",
                    (scope, key, fingerprint, owner, now, now + ttl_secs),
                )
            return None

        return await self._db.run(begin)

    async def aclose(self) -> None:
        await self._db.aclose()


class SqliteBackend(StoreBackend):
    """Both stores in one SQLite file over one connection (the embedded default)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "full",
    ) -> None:
        path = os.fspath(path)
        db = SqliteFile(
            path,
            _SCHEMA + _RESPONSES_SCHEMA + _DURABLE_SCHEMA,
            busy_timeout=busy_timeout,
            on_error=_storage,
            synchronous=synchronous,
        )
        super().__init__(
            SqliteStore(path, db=db),
            SqliteResponseStore(path, db=db),
            SqliteDurableStore(path, db=db),
        )
        self._db = db

    async def write_finished(self, finished: FinishedResponse) -> bool:
        """:class:`~onwards_trio._stores.base.FinishedWriter`: the Response object, the loop's
        response rows and its steps in one call, so in one transaction (its own, or its share
        of a group commit). A new response's rows are inserted together with those of the
        other new responses in its batch (:meth:`SqliteFile.insert`)."""
        record = finished.record
        row, data = finished_response_text(finished)
        if row is not None:  # ``background`` as an int: sqlite3 adapts a bool slowly (_NULL)
            row = (*row[:5], int(row[5]), *row[6:])
        now = time.time()
        dump = _dumps_once()
        responses = [
            (r.id, r.status.value, dump(r.request), dump(r.output), now, now)
            for r in finished.loop_responses
        ]
        steps = [(*step_row(rid, step, dump), now, now) for rid, step in finished.steps]

        def write(db: sqlite3.Connection) -> bool:
            with transaction(db, "BEGIN IMMEDIATE"):
                if row is not None:
                    SqliteResponseStore._insert(db, record.id, row)
                elif not SqliteResponseStore._update(db, record.id, record.status, data):
                    return False
                db.executemany(_INSERT_LOOP_RESPONSE, responses)
                db.executemany(_INSERT_STEP, steps)
            return True

        if row is None:
            return await self._db.run(write, finished.start_within)
        inserts = ((_INSERT_RESPONSE, (row,)), (_INSERT_LOOP_RESPONSE, responses))
        return await self._db.insert(
            write, (*inserts, (_INSERT_STEP, steps)), True, finished.start_within
        )


_INSERT_RESPONSE = "INSERT INTO oresp_responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_LOOP_RESPONSE = (
    "INSERT OR REPLACE INTO loop_responses (id, status, request, output, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_STEP = (
    "INSERT INTO loop_steps (id, request_id, scope_parent, prev_step_id, kind, state, sequence, "
    "request_payload, response_payload, error, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_ledger (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    key_label TEXT NOT NULL,
    alias TEXT NOT NULL,
    provider INTEGER,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost_micros INTEGER,
    status INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    route TEXT NOT NULL,
    streamed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ledger_time ON usage_ledger (time);
CREATE INDEX IF NOT EXISTS usage_ledger_key_time ON usage_ledger (key_label, time);
"""


class SqliteUsageStore(SqlUsageStore):
    """The usage ledger in an SQLite file, over a connection of its own (the ledger's writes
    never queue behind a response's, and closing the Responses store does not end them)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self._db = SqliteFile(
            self.path, _USAGE_SCHEMA, busy_timeout=busy_timeout, on_error=_storage
        )

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        text = sql.replace("%s", "?")
        return await self._db.run(lambda db: db.execute(text, tuple(params)).fetchall())

    async def _insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        text = sql.replace("%s", "?")

        def insert(db: sqlite3.Connection) -> None:
            with transaction(db, "BEGIN IMMEDIATE"):
                db.executemany(text, rows)

        await self._db.run(insert)

    async def aclose(self) -> None:
        await self._db.aclose()
