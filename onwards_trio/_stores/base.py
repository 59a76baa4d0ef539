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
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs
import orjson
import trio

from onwards_trio._loop.steps import ChainStep, MultiStepStore, ResponseRecord
from onwards_trio._proxy.ledger import BUCKET_SECONDS, COLUMNS, UsageQuery, UsageRow

__all__ = [
    "STATUSES",
    "TERMINAL_STATUSES",
    "Claim",
    "DurableStore",
    "FinishedResponse",
    "FinishedWriter",
    "IdempotencyRecord",
    "ResponseStore",
    "SharedResponseStore",
    "SqlDurableStore",
    "StoreBackend",
    "StoredEvent",
    "StoredResponse",
    "UsageStore",
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


def statuses_before(new: str) -> list[str]:
    """The statuses a response may leave for ``new`` (sorted; empty: ``new`` is no status a
    response may move to) — the condition of a status update in the SQL stores."""
    return sorted(s for s, targets in ALLOWED_TRANSITIONS.items() if new in targets)


def response_row(record: StoredResponse, response_json: bytes | None = None) -> tuple[Any, ...]:
    """``record`` as the SQL stores' ``oresp_responses`` columns, JSON as text:
    ``id, status, response, input_items, context_items, background, created_at, owner``
    (``response_json``: the Response object already encoded)."""
    return (
        record.id,
        record.status,
        (response_json or orjson.dumps(record.response)).decode(),
        orjson.dumps(record.input_items).decode(),
        orjson.dumps(record.context_items).decode(),
        record.background,
        record.created_at,
        record.owner,
    )


def finished_response_text(finished: FinishedResponse) -> tuple[tuple[Any, ...] | None, str]:
    """A finished response's ``oresp_responses`` row when it is new (else None) and its
    Response object as JSON text, encoded once (the answer's bytes when it carries them)."""
    encoded = finished.response_json
    if finished.new:
        row = response_row(finished.record, encoded)
        return row, row[2]
    return None, (encoded or orjson.dumps(finished.record.response)).decode()


def step_row(
    request_id: str, step: ChainStep, dump: Callable[[Any], str | None]
) -> tuple[Any, ...]:
    """A step as the SQL stores' ``loop_steps`` columns ``id, request_id, scope_parent,
    prev_step_id, kind, state, sequence, request_payload, response_payload, error``, its
    payloads as JSON text (``dump``)."""
    return (
        step.id,
        request_id,
        step.parent_step_id,
        step.prev_step_id,
        step.kind.value,
        step.state.value,
        step.sequence,
        dump(step.request_payload),
        dump(step.response_payload),
        dump(step.error),
    )


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

    def with_response(self, response: dict[str, Any]) -> StoredResponse:
        """This record with ``response`` as its Response object (``attrs.evolve``'s result,
        without its generic field-by-field copy: this is on every stored response's path)."""
        return StoredResponse(
            self.id,
            response,
            self.input_items,
            self.context_items,
            self.background,
            self.created_at,
            self.owner,
        )


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


@attrs.frozen
class FinishedResponse:
    """Everything a foreground response leaves in the store, written in one transaction at its
    end (:class:`FinishedWriter`): its Response object in its final state, and the loop's
    rows — the response rows (``loop_responses``: the response and its sub-agents) and every
    step, ``(request_id, step)`` — that the loop kept in memory while it ran.

    ``new``: the Response object was never written (a foreground answer without a stream:
    nobody knew its id before the answer), so it is inserted; otherwise it moves to its
    final status as :meth:`ResponseStore.update` does, and nothing is written when that is
    refused (the response was deleted meanwhile)."""

    record: StoredResponse
    new: bool
    loop_responses: Sequence[ResponseRecord]
    steps: Sequence[tuple[str, ChainStep]]
    # The Response object as JSON, encoded once for the store and the client's answer.
    response_json: bytes | None = None
    # Set: the write is shielded from its caller's cancellation and fails with
    # ``trio.TooSlowError`` if the store has not started it within that many seconds (so the
    # caller needs no cancel scope of its own: batching.py says what that costs).
    start_within: float | None = None


@runtime_checkable
class FinishedWriter(Protocol):
    """A backend that writes a :class:`FinishedResponse` in one call (one transaction, one
    thread hop), instead of the dozen store calls of a loop that writes as it goes."""

    async def write_finished(self, finished: FinishedResponse) -> bool:
        """Write it all, or nothing (raising); ``False`` when the update was refused. With
        ``finished.start_within`` set, shielded from the caller's cancellation and bounded by it
        (:class:`FinishedResponse`)."""


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


@attrs.frozen
class Claim:
    """A background response whose lease this process now holds. ``attempts`` counts the
    owners it lost without a handover (this claim included); ``resume`` is what
    :meth:`DurableStore.acquire_lease` stored for resuming it."""

    response_id: str
    attempts: int
    resume: Any


@attrs.frozen
class IdempotencyRecord:
    """A request seen under an ``Idempotency-Key``: ``in_flight`` until its response is
    stored (``done``: ``status``, ``headers``, ``body`` as first sent)."""

    fingerprint: str
    state: str
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    body: bytes = b""


class DurableStore(Protocol):
    """Leases on running background responses and ``Idempotency-Key`` records.

    A lease row exists from a background response's creation until its end: the owning
    process renews it in one batched write per interval; when it expires (the owner died), any
    gateway on the same store claims it atomically and resumes the response. Times are the
    store's clock (PostgreSQL: the server's), so replicas need no synchronised clocks.
    """

    async def acquire_lease(
        self, response_id: str, owner: str, lease_secs: float, resume: Any
    ) -> None:
        """Create the lease of a new background response, held by ``owner``."""

    async def renew_leases(self, owner: str, lease_secs: float) -> set[str]:
        """Extend every lease ``owner`` holds (one write); return their response ids."""

    async def release_lease(self, response_id: str, owner: str) -> None:
        """Hand the response over: its lease expires now, and the next claim is not counted
        as a failed attempt."""

    async def drop_lease(self, response_id: str) -> None:
        """The response ended (or is gone): forget its lease."""

    async def claim_expired(self, owner: str, lease_secs: float, limit: int) -> list[Claim]:
        """Atomically take up to ``limit`` expired leases for ``owner`` (each claimed by
        exactly one caller, whichever replica asks at the same time)."""

    async def idempotency_begin(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        owner: str,
        ttl_secs: float,
        stale_after: float,
    ) -> IdempotencyRecord | None:
        """Record a new request under ``(scope, key)`` as ``in_flight`` for ``owner`` and
        return ``None``; or, when the key is taken (not expired, not a stale in-flight one),
        change nothing and return what is stored."""

    async def idempotency_finish(
        self,
        scope: str,
        key: str,
        owner: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """Store the response of ``owner``'s in-flight request."""

    async def idempotency_abandon(self, scope: str, key: str, owner: str) -> None:
        """Forget ``owner``'s in-flight request (it produced nothing worth replaying)."""

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The record under ``(scope, key)``, expired ones excluded."""

    async def purge_expired(self) -> None:
        """Delete expired idempotency records."""

    async def aclose(self) -> None:
        """Release resources (connections)."""


class SqlDurableStore:
    """The :class:`DurableStore` statements the SQL backends share, written once with ``%s``
    placeholders and ``{now}`` (the store's clock in epoch seconds, an SQL expression) that a
    backend adapts in :meth:`_execute`. The two operations that must be atomic across
    processes — claiming leases, taking a key — need each database's own locking and are the
    backends' own."""

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows (none for a statement without a result)."""
        raise NotImplementedError

    async def acquire_lease(
        self, response_id: str, owner: str, lease_secs: float, resume: Any
    ) -> None:
        await self._execute(
            "INSERT INTO oresp_leases (response_id, owner, expires_at, attempts, resume) "
            "VALUES (%s, %s, {now} + %s, 0, %s) ON CONFLICT (response_id) DO UPDATE SET "
            "owner = excluded.owner, expires_at = excluded.expires_at, attempts = 0, "
            "resume = excluded.resume",
            (response_id, owner, lease_secs, orjson.dumps(resume).decode()),
        )

    async def renew_leases(self, owner: str, lease_secs: float) -> set[str]:
        rows = await self._execute(
            "UPDATE oresp_leases SET expires_at = {now} + %s WHERE owner = %s "
            "RETURNING response_id",
            (lease_secs, owner),
        )
        return {str(r[0]) for r in rows}

    async def release_lease(self, response_id: str, owner: str) -> None:
        await self._execute(
            "UPDATE oresp_leases SET owner = NULL, expires_at = 0 "
            "WHERE response_id = %s AND owner = %s",
            (response_id, owner),
        )

    async def drop_lease(self, response_id: str) -> None:
        await self._execute("DELETE FROM oresp_leases WHERE response_id = %s", (response_id,))

    async def idempotency_finish(
        self,
        scope: str,
        key: str,
        owner: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        await self._execute(
            "UPDATE idempotency_keys SET state = 'done', status = %s, headers = %s, body = %s "
            "WHERE scope = %s AND key = %s AND owner = %s AND state = 'in_flight'",
            (status, encode_headers(headers), body, scope, key, owner),
        )

    async def idempotency_abandon(self, scope: str, key: str, owner: str) -> None:
        await self._execute(
            "DELETE FROM idempotency_keys "
            "WHERE scope = %s AND key = %s AND owner = %s AND state = 'in_flight'",
            (scope, key, owner),
        )

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyRecord | None:
        rows = await self._execute(
            "SELECT fingerprint, state, status, headers, body FROM idempotency_keys "
            "WHERE scope = %s AND key = %s AND expires_at >= {now}",
            (scope, key),
        )
        return idempotency_record(rows[0]) if rows else None

    async def purge_expired(self) -> None:
        await self._execute("DELETE FROM idempotency_keys WHERE expires_at < {now}")


def claim_of(row: Sequence[Any]) -> Claim:
    """A claimed lease row: ``response_id, attempts, resume`` (JSON text)."""
    return Claim(str(row[0]), int(row[1]), None if row[2] is None else orjson.loads(row[2]))


def idempotency_record(row: Sequence[Any]) -> IdempotencyRecord:
    """A record row: ``fingerprint, state, status, headers, body``."""
    fingerprint, state, status, headers, body = row[:5]
    return IdempotencyRecord(
        fingerprint, state, status, decode_headers(headers), bytes(body or b"")
    )


def encode_headers(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Headers as JSON text (latin-1 round-trips every byte), for the SQL stores."""
    return orjson.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]).decode()


def decode_headers(text: str | bytes | None) -> list[tuple[bytes, bytes]]:
    if not text:
        return []
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in orjson.loads(text)]


@attrs.define(eq=False)
class StoreBackend:
    """One storage backend: the loop's step store and the Responses store over one connection
    (or pool), opened from one ``store`` config entry and closed together, plus the leases and
    idempotency records on the same connection (``durable``)."""

    steps: MultiStepStore
    responses: ResponseStore
    durable: DurableStore | None = None

    async def aclose(self) -> None:
        """Close both (they may share a connection; closing is idempotent)."""
        with trio.CancelScope(shield=True):
            await self.responses.aclose()
            aclose = getattr(self.steps, "aclose", None)
            if aclose is not None:
                await aclose()


# -- the usage ledger ---------------------------------------------------------------------------


class UsageStore(Protocol):
    """Where the usage ledger (``_proxy.ledger``) keeps its rows: one table per backend,
    indexed by time and by key label and time. Every read is of a time range.

    A summary is a list of dicts: the ``group_by`` keys of the query (``hour``/``day``: the
    bucket's start, epoch seconds) plus ``requests``, ``input_tokens``, ``output_tokens``,
    ``cached_tokens`` and ``cost_micros`` (``None`` when no row of the group had a price).
    Without ``group_by`` it is one total, also over no rows. Raw rows are dicts of the
    columns plus ``id`` (increasing in insertion order: the pagination cursor).
    """

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Insert ``rows`` in one transaction (all or none)."""

    async def delete_usage_before(self, cutoff: float) -> int:
        """Delete rows with ``time < cutoff``; return how many."""

    async def summarize_usage(self, query: UsageQuery, max_groups: int) -> list[dict[str, Any]]:
        """Sums per group (at most ``max_groups`` groups; which ones, past it, is unspecified)."""

    async def usage_rows(self, query: UsageQuery, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` rows with ``id > after``, in ``id`` order."""

    async def aclose(self) -> None:
        """Release resources (connections)."""


SUM_KEYS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost_micros")


def usage_group(keys: Sequence[str], values: Sequence[Any]) -> dict[str, Any]:
    """A summary row (group values then the sums, as a store read them) as a dict: sums of
    no rows are 0 (cost: ``None``), ``streamed`` a bool, buckets and sums ints (PostgreSQL
    sums bigints as numerics)."""
    out: dict[str, Any] = {}
    for key, value in zip(keys, values, strict=False):
        if key == "streamed":
            value = bool(value)
        elif key in BUCKET_SECONDS:
            value = int(value)
        out[key] = value
    sums = values[len(keys) :]
    for key, value in zip(SUM_KEYS, sums, strict=True):
        out[key] = None if value is None and key == "cost_micros" else int(value or 0)
    return out


def usage_row(values: Sequence[Any]) -> dict[str, Any]:
    """A stored row (``id`` then the columns) as a dict."""
    out = dict(zip(("id", *COLUMNS), values, strict=True))
    out["streamed"] = bool(out["streamed"])
    return out


_INSERT_USAGE = (
    f"INSERT INTO usage_ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('%s' for _ in COLUMNS)})"
)
_DELETE_CHUNK = 10_000
_USAGE_SUMS = (
    "count(*), sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(cost_micros)"
)


class SqlUsageStore:
    """The :class:`UsageStore` statements both SQL backends share, with ``%s`` placeholders;
    a backend runs them (:meth:`_execute`, :meth:`_insert`) and says how it floors a time
    to a bucket (``_FLOOR``, formatted with the bucket's seconds)."""

    _FLOOR = "CAST(time / {n} AS INTEGER) * {n}"

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement and return its rows (none for a statement without a result)."""
        raise NotImplementedError

    async def _insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row, all in one transaction."""
        raise NotImplementedError

    @staticmethod
    def _where(query: UsageQuery) -> tuple[str, list[Any]]:
        sql = "time >= %s AND time < %s"
        params: list[Any] = [query.start, query.end]
        if query.alias is not None:
            sql += " AND alias = %s"
            params.append(query.alias)
        if query.key_label is not None:
            sql += " AND key_label = %s"
            params.append(query.key_label)
        return sql, params

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if rows:
            await self._insert(_INSERT_USAGE, rows)

    async def delete_usage_before(self, cutoff: float) -> int:
        # In chunks: a month of rows in one statement would hold the write lock (SQLite) or
        # bloat one transaction (PostgreSQL) for as long as it takes.
        total = 0
        while True:
            gone = len(
                await self._execute(
                    "DELETE FROM usage_ledger WHERE id IN (SELECT id FROM usage_ledger "
                    "WHERE time < %s LIMIT %s) RETURNING 1",
                    (cutoff, _DELETE_CHUNK),
                )
            )
            total += gone
            if gone < _DELETE_CHUNK:
                return total

    async def summarize_usage(self, query: UsageQuery, max_groups: int) -> list[dict[str, Any]]:
        where, params = self._where(query)
        keys = query.group_by
        columns = [
            self._FLOOR.format(n=BUCKET_SECONDS[k]) if k in BUCKET_SECONDS else k for k in keys
        ]
        select = ", ".join([*columns, _USAGE_SUMS])
        sql = f"SELECT {select} FROM usage_ledger WHERE {where}"
        if columns:
            sql += f" GROUP BY {', '.join(columns)} LIMIT %s"
            params.append(max_groups)
        return [usage_group(keys, row) for row in await self._execute(sql, params)]

    async def usage_rows(self, query: UsageQuery, after: int, limit: int) -> list[dict[str, Any]]:
        where, params = self._where(query)
        rows = await self._execute(
            f"SELECT id, {', '.join(COLUMNS)} FROM usage_ledger "
            f"WHERE {where} AND id > %s ORDER BY id LIMIT %s",
            [*params, after, limit],
        )
        return [usage_row(row) for row in rows]
