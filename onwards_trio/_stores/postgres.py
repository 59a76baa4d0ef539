"""PostgreSQL stores: the step store and the response store shared by many gateway replicas.

psycopg's async API is asyncio-only, so both stores use **sync psycopg 3** and a
``psycopg_pool.ConnectionPool`` from worker threads: a read runs in ``trio.to_thread.run_sync``
behind a ``trio.CapacityLimiter(pool_size)``, a write in one of at most ``pool_size`` writer
threads (group commit, :mod:`~onwards_trio._stores.batching`), so the event loop never blocks on
the network. A call that has started is not abandoned on cancellation (Trio's default): a write
commits or raises, it is never half done.

Multi-replica safety comes from the database, not from the process:

* a step's ``sequence`` comes from an upsert on a per-request counter row in the same
  transaction as the step's insert, so concurrent replicas queue on that row lock and hand out
  distinct, gap-free sequences (a failed insert rolls the counter back too);
* state and status transitions are single conditional ``UPDATE`` statements, so the first
  writer wins and a terminal state is final whichever replica writes second;
* an event is appended under a share lock on its response row, so it can never outlive a
  concurrent ``DELETE`` from another replica;
* :meth:`PostgresResponseStore.status` (one column by primary key) lets the replica running a
  background response notice a cancel or a ``DELETE`` made through another replica (see
  :class:`~onwards_trio._stores.base.SharedResponseStore`).

The schema is created on first use (``CREATE TABLE IF NOT EXISTS`` under an advisory lock, so
replicas starting together do not race on the catalog), in the first schema of the
connection's ``search_path``. Payloads are ``jsonb``; event data is ``bytea`` (replayed byte
for byte). psycopg is an optional dependency (the ``postgres`` extra): import this module only
when a postgres store is wanted.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import orjson
import outcome
import psycopg
import psycopg.errors
import psycopg_pool
import trio
from psycopg.rows import TupleRow
from psycopg.types.json import set_json_loads

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
    "PostgresBackend",
    "PostgresDatabase",
    "PostgresResponseStore",
    "PostgresStore",
    "PostgresUsageStore",
]

T = TypeVar("T")
Conn: TypeAlias = psycopg.Connection[TupleRow]

# Any constant will do: it only has to be the same in every replica.
_SCHEMA_LOCK = 0x6F6E7761726473  # "onwards"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loop_responses (
    id text PRIMARY KEY,
    status text NOT NULL,
    request jsonb,
    output jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS loop_sequences (
    request_id text PRIMARY KEY,
    last bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS loop_steps (
    id text PRIMARY KEY,
    request_id text NOT NULL,
    scope_parent text,
    prev_step_id text,
    kind text NOT NULL,
    state text NOT NULL,
    sequence bigint NOT NULL,
    request_payload jsonb,
    response_payload jsonb,
    error jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, sequence)
);
DROP INDEX IF EXISTS loop_steps_scope; -- (request_id, sequence) serves the chain reads too
CREATE TABLE IF NOT EXISTS oresp_responses (
    id text PRIMARY KEY,
    status text NOT NULL,
    response jsonb NOT NULL,
    input_items jsonb NOT NULL,
    context_items jsonb NOT NULL,
    background boolean NOT NULL,
    created_at double precision NOT NULL,
    owner text
);
CREATE TABLE IF NOT EXISTS oresp_events (
    response_id text NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (response_id, seq)
);
CREATE TABLE IF NOT EXISTS oresp_leases (
    response_id text PRIMARY KEY,
    owner text,
    expires_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    resume text
);
CREATE INDEX IF NOT EXISTS oresp_leases_owner ON oresp_leases (owner);
CREATE INDEX IF NOT EXISTS oresp_leases_expiry ON oresp_leases (expires_at);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    scope text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    state text NOT NULL,
    owner text NOT NULL,
    started_at double precision NOT NULL,
    expires_at double precision NOT NULL,
    status integer,
    headers text,
    body bytea,
    PRIMARY KEY (scope, key)
);
"""


def _store_error(e: psycopg.Error) -> StoreError:
    # A DataError is a value the database refuses (jsonb has no \u0000, for one).
    kind = (
        StoreErrorKind.SERIALIZATION if isinstance(e, psycopg.DataError) else StoreErrorKind.STORAGE
    )
    return StoreError(kind, f"{type(e).__name__}: {e}")


def _configure(conn: Conn) -> None:
    set_json_loads(orjson.loads, conn)


# A connection back in the pool for less than this is handed out unchecked: the check is a
# round trip per call, and what it guards against (a restarted server, a dropped idle
# connection) shows on connections that sat idle. One that broke meanwhile fails its call.
_CHECK_AFTER_IDLE = 1.0


class _IdleCheck:
    """The pool's ``reset`` (when a connection comes back) and ``check`` (when it is handed
    out) callbacks: a connection idle for ``_CHECK_AFTER_IDLE`` or more is checked first."""

    def __init__(self) -> None:
        self._returned: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()

    def reset(self, conn: Conn) -> None:
        self._returned[conn] = time.monotonic()

    def check(self, conn: Conn) -> None:
        returned = self._returned.get(conn)
        if returned is None or time.monotonic() - returned >= _CHECK_AFTER_IDLE:
            psycopg_pool.ConnectionPool.check_connection(conn)


class PostgresDatabase:
    """One lazily opened connection pool to ``dsn``, shared by a step store and a response store.

    ``pool_size`` is the pool's maximum, the limiter on reading threads and the number of
    writer threads; a thread finding every connection taken waits for one
    (``connect_timeout``). Connections are in autocommit mode; multi-statement writes use
    ``conn.transaction()``. ``psycopg.Error`` (pool timeouts included) becomes
    :class:`~onwards_trio._loop.steps.StoreError`. :meth:`aclose` closes the pool; a later call
    opens it again.

    **Group commit** (:meth:`write`, :mod:`~onwards_trio._stores.batching`): writes that find
    ``pool_size`` writers busy queue, and the next writer free runs the queued ones together
    — one transaction and one commit (one WAL flush on the server) for all of them, each call
    in its own savepoint so a failing call rolls back only its own writes. A call returns only
    after the commit that holds its writes, so durability is that of a lone call. Batched calls
    hold their row locks until the batch commits; a call that loses a deadlock to another batch
    is run again alone once its own batch has committed.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.dsn = dsn
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self._pool: psycopg_pool.ConnectionPool[Conn] | None = None
        self._open_lock = threading.Lock()  # worker threads race to open the pool
        self._limiter = trio.CapacityLimiter(pool_size)
        self._group: GroupCommit[Conn] = GroupCommit(self._run_batch, slots=pool_size)

    def _open(self) -> psycopg_pool.ConnectionPool[Conn]:
        with self._open_lock:
            if self._pool is not None:
                return self._pool
            idle = _IdleCheck()
            pool: psycopg_pool.ConnectionPool[Conn] = psycopg_pool.ConnectionPool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                kwargs={"autocommit": True},
                configure=_configure,
                # A replica outlives database restarts: test a connection that sat idle
                # before handing it out.
                check=idle.check,
                reset=idle.reset,
                timeout=self.connect_timeout,
                name="onwards-trio",
            )
            try:
                pool.open(wait=True, timeout=self.connect_timeout)
                with pool.connection() as conn, conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                    conn.execute(_SCHEMA)
            except BaseException:
                pool.close(timeout=self.close_timeout)
                raise
            self._pool = pool
            return pool

    async def run(self, fn: Callable[[Conn], T], *, abandon_on_cancel: bool = False) -> T:
        """``fn(connection)`` in a worker thread, with a pooled connection of its own.

        A started call is waited for even when the caller is cancelled (a write commits or
        raises). Reads may pass ``abandon_on_cancel=True`` instead: the caller returns at once
        and the thread finishes on its own, keeping its limiter slot and its connection until
        then."""

        def call() -> T:
            try:
                with self._open().connection() as conn:
                    return fn(conn)
            except psycopg.Error as e:
                raise _store_error(e) from None

        return await trio.to_thread.run_sync(
            call, limiter=self._limiter, abandon_on_cancel=abandon_on_cancel
        )

    async def write(self, fn: Callable[[Conn], T], start_within: float | None = None) -> T:
        """``fn(connection)`` as :meth:`run` does, but batched with the writes that queue
        meanwhile (group commit). ``fn`` may open transactions of its own (they become
        savepoints in a batch); it must not set the transaction's isolation level.
        ``start_within``: shielded and bounded (:meth:`GroupCommit.run`)."""
        return await self._group.run(fn, start_within=start_within)

    @staticmethod
    def _settle(call: Call[Conn], conn: Conn) -> None:
        try:
            call.outcome = outcome.Value(call.fn(conn))
        except psycopg.Error as e:
            call.outcome = outcome.Error(_store_error(e))
        except Exception as e:
            call.outcome = outcome.Error(e)

    def _run_batch(self, batch: list[Call[Conn]]) -> None:
        """In a worker thread: every call of ``batch``, one transaction when more than one."""
        try:
            with self._open().connection() as conn:
                if len(batch) == 1:
                    self._settle(batch[0], conn)
                    return
                again: list[Call[Conn]] = []
                try:
                    with conn.transaction():
                        for call in batch:
                            try:
                                with conn.transaction():  # a savepoint per call
                                    call.outcome = outcome.Value(call.fn(conn))
                            except psycopg.errors.DeadlockDetected:
                                again.append(call)
                            except psycopg.Error as e:
                                call.outcome = outcome.Error(_store_error(e))
                            except Exception as e:
                                call.outcome = outcome.Error(e)
                except psycopg.Error as e:  # the commit failed: nothing of the batch stands
                    for call in batch:
                        call.outcome = outcome.Error(_store_error(e))
                    return
                for call in again:  # alone, now that this batch's locks are released
                    self._settle(call, conn)
        except psycopg.Error as e:  # no connection (or it broke): calls left without a result
            for call in batch:
                if call.outcome is None:
                    call.outcome = outcome.Error(_store_error(e))

    async def aclose(self) -> None:
        """Close the pool. Shielded (a cancelled close would leak connections) and bounded: a
        close that hangs is abandoned after ``close_timeout`` plus a second."""

        def close() -> None:
            with self._open_lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.close(timeout=self.close_timeout)

        with trio.CancelScope(shield=True), trio.move_on_after(self.close_timeout + 1.0):
            await trio.to_thread.run_sync(close, abandon_on_cancel=True)


def _database(database: PostgresDatabase | str) -> PostgresDatabase:
    return PostgresDatabase(database) if isinstance(database, str) else database


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError as e:
        raise StoreError(StoreErrorKind.SERIALIZATION, str(e)) from None


_STEP_COLUMNS = (
    "id, kind, state, sequence, prev_step_id, scope_parent, "
    "request_payload, response_payload, error"
)


def _step(row: TupleRow) -> ChainStep:
    return ChainStep(
        id=row[0],
        kind=StepKind(row[1]),
        state=StepState(row[2]),
        sequence=row[3],
        prev_step_id=row[4],
        parent_step_id=row[5],
        request_payload=row[6],
        response_payload=row[7],
        error=row[8],
    )


class PostgresStore(StepTransitions):
    """:class:`~onwards_trio._loop.steps.MultiStepStore` on PostgreSQL; replicas on one database
    behave as one store."""

    def __init__(
        self, database: PostgresDatabase | str, transition: Transition | None = None
    ) -> None:
        self.database = _database(database)
        self.transition = transition if transition is not None else open_responses_transition

    # -- plumbing -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self.database.aclose()

    async def __aenter__(self) -> PostgresStore:
        await self.database.run(lambda conn: None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _get(conn: Conn, step_id: str) -> ChainStep:
        row = conn.execute(
            f"SELECT {_STEP_COLUMNS} FROM loop_steps WHERE id = %s", (step_id,)
        ).fetchone()
        if row is None:
            raise StoreError(StoreErrorKind.NOT_FOUND, f"step {step_id}")
        return _step(row)

    @staticmethod
    def _chain(conn: Conn, request_id: str, scope_parent: str | None) -> list[ChainStep]:
        # Two spellings rather than IS NOT DISTINCT FROM, which no index serves.
        if scope_parent is None:
            cur = conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM loop_steps "
                "WHERE request_id = %s AND scope_parent IS NULL ORDER BY sequence",
                (request_id,),
            )
        else:
            cur = conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM loop_steps "
                "WHERE request_id = %s AND scope_parent = %s ORDER BY sequence",
                (request_id, scope_parent),
            )
        return [_step(r) for r in cur.fetchall()]

    @staticmethod
    def _response(conn: Conn, request_id: str) -> ResponseRecord | None:
        row = conn.execute(
            "SELECT status, request, output FROM loop_responses WHERE id = %s", (request_id,)
        ).fetchone()
        if row is None:
            return None
        return ResponseRecord(request_id, ResponseStatus(row[0]), row[1], row[2])

    # -- protocol -------------------------------------------------------------------------------

    async def next_action_for(
        self, request_id: str, scope_parent: str | None, tools: Mapping[str, ToolSchema]
    ) -> NextAction:
        def read(conn: Conn) -> ScopeView:
            # One snapshot: the response row, the parent and the chain agree with each other.
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return ScopeView(
                    request_id=request_id,
                    scope_parent=scope_parent,
                    response=self._response(conn, request_id),
                    parent_step=self._get(conn, scope_parent) if scope_parent else None,
                    chain=self._chain(conn, request_id, scope_parent),
                    tools=tools,
                )

        return self.transition(await self.database.run(read))

    async def record_step(
        self,
        request_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptor: StepDescriptor,
    ) -> RecordedStep:
        payload = _dump(descriptor.request_payload)
        step_id = new_step_id()

        def write(conn: Conn) -> RecordedStep:
            with conn.transaction():
                # The counter row's lock is held until commit: concurrent allocators (in any
                # replica) queue here, and a rollback returns the number.
                row = conn.execute(
                    "INSERT INTO loop_sequences (request_id, last) VALUES (%s, 1) "
                    "ON CONFLICT (request_id) DO UPDATE SET last = loop_sequences.last + 1 "
                    "RETURNING last",
                    (request_id,),
                ).fetchone()
                assert row is not None
                sequence = int(row[0])
                conn.execute(
                    "INSERT INTO loop_steps (id, request_id, scope_parent, prev_step_id, kind, "
                    "state, sequence, request_payload) "
                    "VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s::jsonb)",
                    (
                        step_id,
                        request_id,
                        scope_parent,
                        prev_step_id,
                        descriptor.kind.value,
                        sequence,
                        payload,
                    ),
                )
            return RecordedStep(step_id, sequence)

        return await self.database.write(write)

    async def _transition(
        self, step_id: str, to: StepState, from_states: Sequence[str], column: str, value: Any
    ) -> bool:
        """Move a step from one of ``from_states`` to ``to``; False if it was elsewhere."""
        text = _dump(value)
        sql = (
            f"UPDATE loop_steps SET state = %s, {column} = %s::jsonb, updated_at = now() "
            "WHERE id = %s AND state = ANY(%s)"
        )

        def write(conn: Conn) -> bool:
            cur = conn.execute(sql, (to.value, text, step_id, list(from_states)))
            if cur.rowcount == 1:
                return True
            self._get(conn, step_id)  # NOT_FOUND if it does not exist
            return False

        return await self.database.write(write)

    async def get_step(self, step_id: str) -> ChainStep:
        return await self.database.run(lambda conn: self._get(conn, step_id))

    async def list_chain(self, request_id: str, scope_parent: str | None) -> Sequence[ChainStep]:
        return await self.database.run(lambda conn: self._chain(conn, request_id, scope_parent))

    async def begin_response(self, request_id: str, request: Any) -> None:
        text = _dump(request)

        def write(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO loop_responses (id, status, request, output) "
                "VALUES (%s, 'in_progress', %s::jsonb, NULL) "
                "ON CONFLICT (id) DO UPDATE SET status = 'in_progress', "
                "request = COALESCE(excluded.request, loop_responses.request), output = NULL, "
                "updated_at = now()",
                (request_id, text),
            )

        await self.database.write(write)

    async def finish_response(
        self, request_id: str, status: ResponseStatus, output: Any = None
    ) -> None:
        text = _dump(output)

        def write(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO loop_responses (id, status, request, output) "
                "VALUES (%s, %s, NULL, %s::jsonb) "
                "ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
                "output = excluded.output, updated_at = now()",
                (request_id, status.value, text),
            )

        await self.database.write(write)

    async def get_response(self, request_id: str) -> ResponseRecord | None:
        return await self.database.run(lambda conn: self._response(conn, request_id))


class PostgresResponseStore:
    """:class:`~onwards_trio._stores.base.ResponseStore` on PostgreSQL; replicas on one
    database see the same responses, and a status still moves only forward."""

    def __init__(self, database: PostgresDatabase | str) -> None:
        self.database = _database(database)

    async def create(self, record: StoredResponse) -> None:
        row = response_row(record)
        await self.database.write(lambda conn: self._insert(conn, record.id, row))

    @staticmethod
    def _insert(conn: Conn, response_id: str, row: tuple[Any, ...]) -> None:
        try:
            conn.execute(
                "INSERT INTO oresp_responses (id, status, response, input_items, "
                "context_items, background, created_at, owner) "
                "VALUES (%s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s)",
                row,
            )
        except psycopg.errors.UniqueViolation:
            raise ValueError(f"response {response_id!r} already exists") from None

    async def get(self, response_id: str) -> StoredResponse | None:
        def select(conn: Conn) -> TupleRow | None:
            return conn.execute(
                "SELECT response, input_items, context_items, background, created_at, owner "
                "FROM oresp_responses WHERE id = %s",
                (response_id,),
            ).fetchone()

        row = await self.database.run(select)
        if row is None:
            return None
        response, input_items, context_items, background, created_at, owner = row
        return StoredResponse(
            id=response_id,
            response=response,
            input_items=input_items,
            context_items=context_items,
            background=bool(background),
            created_at=float(created_at),
            owner=owner,
        )

    async def status(self, response_id: str) -> str | None:
        """Only the stored status (``None`` when unknown or deleted): one primary-key read of
        one column, for a replica that checks whether another one cancelled its response. A
        read, so a cancelled caller does not wait for it."""

        def select(conn: Conn) -> str | None:
            row = conn.execute(
                "SELECT status FROM oresp_responses WHERE id = %s", (response_id,)
            ).fetchone()
            return None if row is None else str(row[0])

        return await self.database.run(select, abandon_on_cancel=True)

    async def update(self, response_id: str, response: dict[str, Any]) -> bool:
        new = str(response.get("status"))
        if not statuses_before(new):
            return False
        data = orjson.dumps(response).decode()
        return await self.database.write(lambda conn: self._update(conn, response_id, new, data))

    @staticmethod
    def _update(conn: Conn, response_id: str, new: str, data: str) -> bool:
        # One conditional UPDATE: a replica that loses the race re-checks the status after
        # the winner commits, so a terminal status stays final.
        cur = conn.execute(
            "UPDATE oresp_responses SET status = %s, response = %s::jsonb "
            "WHERE id = %s AND status = ANY(%s)",
            (new, data, response_id, statuses_before(new)),
        )
        return cur.rowcount == 1

    async def delete(self, response_id: str) -> bool:
        def remove(conn: Conn) -> bool:
            with conn.transaction():
                # The response row first: its lock makes a concurrent append wait, then see
                # the row gone.
                cur = conn.execute("DELETE FROM oresp_responses WHERE id = %s", (response_id,))
                found = cur.rowcount == 1
                conn.execute("DELETE FROM oresp_events WHERE response_id = %s", (response_id,))
            return found

        return await self.database.write(remove)

    async def append_events(self, response_id: str, events: Sequence[StoredEvent]) -> None:
        if not events:
            return
        rows = [(response_id, e.sequence, e.type, e.data) for e in events]

        def insert(conn: Conn) -> None:
            with conn.transaction():
                # Only for a response that exists; the share lock holds off a concurrent DELETE
                # until these events are in (and it removes them with the response).
                found = conn.execute(
                    "SELECT 1 FROM oresp_responses WHERE id = %s FOR SHARE", (response_id,)
                ).fetchone()
                if found is None:
                    return
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO oresp_events (response_id, seq, type, data) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (response_id, seq) "
                        "DO UPDATE SET type = excluded.type, data = excluded.data",
                        rows,
                    )

        await self.database.write(insert)

    async def events_after(self, response_id: str, after: int) -> list[StoredEvent]:
        def select(conn: Conn) -> list[TupleRow]:
            return conn.execute(
                "SELECT seq, type, data FROM oresp_events WHERE response_id = %s AND seq > %s "
                "ORDER BY seq",
                (response_id, after),
            ).fetchall()

        rows = await self.database.run(select)
        return [StoredEvent(int(s), str(t), bytes(d)) for s, t, d in rows]

    async def aclose(self) -> None:
        await self.database.aclose()


# The database's clock in epoch seconds (the statement's start: stable, so indexes serve it):
# every replica measures leases by the same clock.
_NOW = "extract(epoch from now())"


class PostgresDurableStore(SqlDurableStore):
    """:class:`~onwards_trio._stores.base.DurableStore` on PostgreSQL, shared by replicas.

    A claim is one ``UPDATE`` of the rows a ``FOR UPDATE SKIP LOCKED`` sub-select picked, so
    replicas claiming at the same moment each get different responses (never the same one
    twice); renewals are one ``UPDATE … WHERE owner = …`` for all of a replica's leases.
    """

    def __init__(self, database: PostgresDatabase | str) -> None:
        self.database = _database(database)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        text = sql.replace("{now}", _NOW)

        def run(conn: Conn) -> list[tuple[Any, ...]]:
            cur = conn.execute(text, tuple(params))
            return list(cur.fetchall()) if cur.description is not None else []

        return await self.database.run(run)

    async def claim_expired(self, owner: str, lease_secs: float, limit: int) -> list[Claim]:
        def claim(conn: Conn) -> list[Claim]:
            # The common case (nothing expired) is one index read and writes nothing.
            found = conn.execute(
                f"SELECT 1 FROM oresp_leases WHERE expires_at < {_NOW} LIMIT 1"
            ).fetchone()
            if found is None:
                return []
            rows = conn.execute(
                f"UPDATE oresp_leases SET owner = %s, expires_at = {_NOW} + %s, "
                "attempts = oresp_leases.attempts + "
                "CASE WHEN oresp_leases.owner IS NULL THEN 0 ELSE 1 END "
                "WHERE response_id IN (SELECT response_id FROM oresp_leases "
                f"WHERE expires_at < {_NOW} ORDER BY expires_at LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING response_id, attempts, resume",
                (owner, lease_secs, limit),
            ).fetchall()
            return [claim_of(r) for r in rows]

        return await self.database.run(claim)

    async def idempotency_begin(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        owner: str,
        ttl_secs: float,
        stale_after: float,
    ) -> IdempotencyRecord | None:
        def begin(conn: Conn) -> IdempotencyRecord | None:
            for _ in range(3):  # the row may vanish between the upsert and the read
                won = conn.execute(
                    "INSERT INTO idempotency_keys (scope, key, fingerprint, state, owner, "
                    f"started_at, expires_at) VALUES (%s, %s, %s, 'in_flight', %s, {_NOW}, "
                    f"{_NOW} + %s) ON CONFLICT (scope, key) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, state = 'in_flight', "
                    "owner = excluded.owner, started_at = excluded.started_at, "
                    "expires_at = excluded.expires_at, status = NULL, headers = NULL, "
                    f"body = NULL WHERE idempotency_keys.expires_at < {_NOW} OR "
                    "(idempotency_keys.state = 'in_flight' AND "
                    f"idempotency_keys.started_at < {_NOW} - %s) RETURNING owner",
                    (scope, key, fingerprint, owner, ttl_secs, stale_after),
                ).fetchone()
                if won is not None:
                    return None
                row = conn.execute(
                    "SELECT fingerprint, state, status, headers, body FROM idempotency_keys "
                    "WHERE scope = %s AND key = %s",
                    (scope, key),
                ).fetchone()
                if row is not None:
                    return idempotency_record(row)
            raise StoreError(StoreErrorKind.CONFLICT, "idempotency key keeps changing")

        return await self.database.run(begin)

    async def aclose(self) -> None:
        await self.database.aclose()


class PostgresBackend(StoreBackend):
    """Both stores over one connection pool; replicas on one database share responses."""

    def __init__(self, database: PostgresDatabase | str, *, pool_size: int = 8) -> None:
        db = (
            PostgresDatabase(database, pool_size=pool_size)
            if isinstance(database, str)
            else database
        )
        super().__init__(PostgresStore(db), PostgresResponseStore(db), PostgresDurableStore(db))
        self.database = db

    async def write_finished(self, finished: FinishedResponse) -> bool:
        """:class:`~onwards_trio._stores.base.FinishedWriter`: the Response object, the loop's
        response rows, their sequence counters and their steps in one transaction (the
        statements pipelined: one round trip per ``executemany``)."""
        record = finished.record
        row, data = finished_response_text(finished)
        responses = [
            (r.id, r.status.value, _dump(r.request), _dump(r.output))
            for r in finished.loop_responses
        ]
        last: dict[str, int] = {}
        steps = []
        for request_id, step in finished.steps:
            last[request_id] = max(last.get(request_id, 0), step.sequence)
            steps.append(step_row(request_id, step, _dump))

        def write(conn: Conn) -> bool:
            with conn.transaction():
                if row is not None:
                    PostgresResponseStore._insert(conn, record.id, row)
                elif not PostgresResponseStore._update(conn, record.id, record.status, data):
                    return False
                # One pipeline for the three: one round trip, not one each.
                with conn.pipeline(), conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO loop_responses (id, status, request, output) "
                        "VALUES (%s, %s, %s::jsonb, %s::jsonb) ON CONFLICT (id) DO UPDATE SET "
                        "status = excluded.status, request = excluded.request, "
                        "output = excluded.output, updated_at = now()",
                        responses,
                    )
                    cur.executemany(
                        "INSERT INTO loop_sequences (request_id, last) VALUES (%s, %s) "
                        "ON CONFLICT (request_id) DO UPDATE "
                        "SET last = GREATEST(loop_sequences.last, excluded.last)",
                        list(last.items()),
                    )
                    cur.executemany(
                        "INSERT INTO loop_steps (id, request_id, scope_parent, prev_step_id, "
                        "kind, state, sequence, request_payload, response_payload, error) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb)",
                        steps,
                    )
            return True

        return await self.database.write(write, finished.start_within)


_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_ledger (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time double precision NOT NULL,
    request_id text NOT NULL,
    key_label text NOT NULL,
    alias text NOT NULL,
    provider integer,
    model text NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    cost_micros bigint,
    status integer NOT NULL,
    latency_ms double precision NOT NULL,
    route text NOT NULL,
    streamed boolean NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ledger_time ON usage_ledger (time);
CREATE INDEX IF NOT EXISTS usage_ledger_key_time ON usage_ledger (key_label, time);
"""


class PostgresUsageStore(SqlUsageStore):
    """The usage ledger on PostgreSQL, shared by replicas (``id`` is an identity column, so
    rows from every replica get distinct, increasing ids). Its table is created on first use,
    under the schema lock, by whichever replica comes first."""

    _FLOOR = "floor(time / {n})::bigint * {n}"

    def __init__(self, database: PostgresDatabase | str) -> None:
        self.database = _database(database)
        self._ready = False

    def _ensure(self, conn: Conn) -> None:
        if not self._ready:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_USAGE_SCHEMA)
            self._ready = True

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run(conn: Conn) -> list[tuple[Any, ...]]:
            self._ensure(conn)
            cur = conn.execute(sql, tuple(params))
            return list(cur.fetchall()) if cur.description is not None else []

        return await self.database.run(run)

    async def _insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        def insert(conn: Conn) -> None:
            self._ensure(conn)
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows)

        await self.database.run(insert)

    async def aclose(self) -> None:
        await self.database.aclose()
