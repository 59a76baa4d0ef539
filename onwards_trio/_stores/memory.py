"""In-memory :class:`~onwards_trio._loop.steps.MultiStepStore` (tests, single-process embedding).

Payloads are copied through JSON on the way in, so the store behaves like a persistent one: a
caller mutating its dict afterwards changes nothing stored, and an unserialisable payload fails
at write time with ``StoreError(SERIALIZATION)``. Every method checkpoints *before* it mutates,
so a cancelled call either happened completely or not at all.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
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
    StoreError,
    StoreErrorKind,
)
from onwards_trio._loop.tools import ToolSchema
from onwards_trio._loop.transition import ScopeView, Transition, open_responses_transition
from onwards_trio._proxy.ledger import BUCKET_SECONDS, COLUMNS, UsageQuery, UsageRow
from onwards_trio._stores.base import (
    Claim,
    FinishedResponse,
    IdempotencyRecord,
    StoreBackend,
    StoredEvent,
    StoredResponse,
    can_transition,
    usage_group,
    usage_row,
)
from onwards_trio._transport.asgi import loads_off_loop

__all__ = [
    "MemoryBackend",
    "MemoryDurableStore",
    "MemoryResponseStore",
    "MemoryStore",
    "MemoryUsageStore",
    "new_response_id",
    "new_step_id",
]


def _ordered_hex(random_bytes: int) -> str:
    """12 hex digits of the time in milliseconds, then ``random_bytes`` random bytes in hex.

    Ids made later sort later, so the SQL stores' id indexes (B-trees) grow at their right
    edge: a batch of new responses dirties a page or two per index instead of one random page
    per row, which is most of what a commit writes (and syncs to disk). The random part keeps
    ids unguessable and distinct across replicas."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(random_bytes)}"


def new_response_id() -> str:
    """``resp_`` and 48 hex digits: the time in ms (12), then 144 random bits (36)."""
    return "resp_" + _ordered_hex(18)


def new_step_id() -> str:
    """``step_`` and 36 hex digits: the time in ms (12), then 96 random bits (24)."""
    return "step_" + _ordered_hex(12)


def _copy(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return orjson.loads(_dumps(value))


async def _copy_off_loop(value: Any) -> Any:
    """:func:`_copy` for what may be large (a request of 10,000 messages): its parse, the
    costly half, runs in a worker thread then."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return await loads_off_loop(_dumps(value))


def _same(value: Any) -> Any:
    return value


async def _same_off_loop(value: Any) -> Any:
    return value


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as e:
        raise StoreError(StoreErrorKind.SERIALIZATION, str(e)) from None


@attrs.define
class _Row:
    id: str
    request_id: str
    scope_parent: str | None
    prev_step_id: str | None
    kind: StepKind
    state: StepState
    sequence: int
    request_payload: Any
    response_payload: Any = None
    error: Any = None

    def chain_step(self) -> ChainStep:
        return ChainStep(
            id=self.id,
            kind=self.kind,
            state=self.state,
            sequence=self.sequence,
            prev_step_id=self.prev_step_id,
            parent_step_id=self.scope_parent,
            request_payload=self.request_payload,
            response_payload=self.response_payload,
            error=self.error,
        )


class MemoryStore:
    """Steps and loop responses in process memory.

    ``private``: the store of one response whose loop is its only user, held until the
    response is written whole (:class:`~onwards_trio._stores.base.FinishedResponse`) or
    dropped (``store: false``). Nobody else can see or change its rows, so payloads are kept
    as given rather than copied through JSON (what cannot be serialised then fails when the
    response is written, not when the step is recorded), and a call yields only when it is
    cancelled (``checkpoint_if_cancelled``: it still happens completely or not at all) instead
    of at a full schedule point: a response makes about ten such calls, each a task switch.
    """

    def __init__(self, transition: Transition | None = None, *, private: bool = False) -> None:
        self.transition = transition if transition is not None else open_responses_transition
        self._checkpoint = (
            trio.lowlevel.checkpoint_if_cancelled if private else trio.lowlevel.checkpoint
        )
        self._copy = _same if private else _copy
        self._copy_off_loop = _same_off_loop if private else _copy_off_loop
        self._steps: dict[str, _Row] = {}
        self._scopes: dict[tuple[str, str | None], list[_Row]] = {}
        self._next_sequence: dict[str, int] = {}
        self._responses: dict[str, ResponseRecord] = {}

    def _row(self, step_id: str) -> _Row:
        row = self._steps.get(step_id)
        if row is None:
            raise StoreError(StoreErrorKind.NOT_FOUND, f"step {step_id}")
        return row

    async def next_action_for(
        self, request_id: str, scope_parent: str | None, tools: Mapping[str, ToolSchema]
    ) -> NextAction:
        await self._checkpoint()
        view = ScopeView(
            request_id=request_id,
            scope_parent=scope_parent,
            response=self._responses.get(request_id),
            parent_step=self._row(scope_parent).chain_step() if scope_parent else None,
            chain=[r.chain_step() for r in self._scopes.get((request_id, scope_parent), ())],
            tools=tools,
        )
        return self.transition(view)

    async def record_step(
        self,
        request_id: str,
        scope_parent: str | None,
        prev_step_id: str | None,
        descriptor: StepDescriptor,
    ) -> RecordedStep:
        payload = await self._copy_off_loop(descriptor.request_payload)
        await self._checkpoint()
        sequence = self._next_sequence.get(request_id, 1)
        self._next_sequence[request_id] = sequence + 1
        row = _Row(
            id=new_step_id(),
            request_id=request_id,
            scope_parent=scope_parent,
            prev_step_id=prev_step_id,
            kind=descriptor.kind,
            state=StepState.PENDING,
            sequence=sequence,
            request_payload=payload,
        )
        self._steps[row.id] = row
        self._scopes.setdefault((request_id, scope_parent), []).append(row)
        return RecordedStep(row.id, sequence)

    async def mark_step_processing(self, step_id: str) -> None:
        await self._checkpoint()
        row = self._row(step_id)
        if row.state is not StepState.PENDING:
            raise StoreError(StoreErrorKind.CONFLICT, f"step {step_id} is {row.state.value}")
        row.state = StepState.PROCESSING

    def _finish(self, step_id: str, state: StepState) -> _Row:
        row = self._row(step_id)
        if row.state.is_terminal:
            raise StoreError(StoreErrorKind.CONFLICT, f"step {step_id} is {row.state.value}")
        row.state = state
        return row

    async def complete_step(self, step_id: str, payload: Any) -> None:
        payload = self._copy(payload)
        await self._checkpoint()
        self._finish(step_id, StepState.COMPLETED).response_payload = payload

    async def fail_step(self, step_id: str, error: Any) -> None:
        error = self._copy(error)
        await self._checkpoint()
        self._finish(step_id, StepState.FAILED).error = error

    async def cancel_step(self, step_id: str, reason: Any = None) -> bool:
        reason = self._copy(reason)
        await self._checkpoint()
        row = self._row(step_id)
        if row.state.is_terminal:
            return False
        row.state = StepState.CANCELED
        row.error = reason
        return True

    async def get_step(self, step_id: str) -> ChainStep:
        await self._checkpoint()
        return self._row(step_id).chain_step()

    async def list_chain(self, request_id: str, scope_parent: str | None) -> Sequence[ChainStep]:
        await self._checkpoint()
        return self.chain(request_id, scope_parent)

    def chain(self, request_id: str, scope_parent: str | None) -> list[ChainStep]:
        """:meth:`list_chain` without the checkpoint (what is held can be read at once)."""
        return [r.chain_step() for r in self._scopes.get((request_id, scope_parent), ())]

    async def assemble_response(self, request_id: str) -> Any:
        await self._checkpoint()
        record = self._responses.get(request_id)
        if record is None:
            raise StoreError(StoreErrorKind.NOT_FOUND, request_id)
        return record.output

    async def begin_response(self, request_id: str, request: Any) -> None:
        request = await self._copy_off_loop(request)
        await self._checkpoint()
        old = self._responses.get(request_id)
        if old is not None and request is None:
            request = old.request
        self._responses[request_id] = ResponseRecord(
            request_id, ResponseStatus.IN_PROGRESS, request, None
        )

    async def finish_response(
        self, request_id: str, status: ResponseStatus, output: Any = None
    ) -> None:
        output = self._copy(output)
        await self._checkpoint()
        old = self._responses.get(request_id)
        self._responses[request_id] = ResponseRecord(
            request_id, status, old.request if old is not None else None, output
        )

    async def get_response(self, request_id: str) -> ResponseRecord | None:
        await self._checkpoint()
        return self._responses.get(request_id)

    def contents(self) -> tuple[list[ResponseRecord], list[tuple[str, ChainStep]]]:
        """Every response row and every step ``(request_id, step)`` held, for a one-call write
        of a finished response into a persistent store (:class:`FinishedResponse`)."""
        steps = [(r.request_id, r.chain_step()) for r in self._steps.values()]
        return list(self._responses.values()), steps

    def adopt(
        self, responses: Sequence[ResponseRecord], steps: Sequence[tuple[str, ChainStep]]
    ) -> None:
        """Take over rows another store produced (:meth:`contents`); they are not copied."""
        for record in responses:
            self._responses[record.id] = record
        for request_id, step in steps:
            row = _Row(
                id=step.id,
                request_id=request_id,
                scope_parent=step.parent_step_id,
                prev_step_id=step.prev_step_id,
                kind=step.kind,
                state=step.state,
                sequence=step.sequence,
                request_payload=step.request_payload,
                response_payload=step.response_payload,
                error=step.error,
            )
            self._steps[row.id] = row
            self._scopes.setdefault((request_id, row.scope_parent), []).append(row)
            nxt = self._next_sequence.get(request_id, 1)
            self._next_sequence[request_id] = max(nxt, step.sequence + 1)


# -- Responses objects ----------------------------------------------------------------------------


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

    def put(self, finished: FinishedResponse) -> bool:
        """The response part of :meth:`MemoryBackend.write_finished` (no checkpoint)."""
        record = finished.record
        if finished.new:
            if record.id in self._records:
                raise ValueError(f"response {record.id!r} already exists")
            self._events[record.id] = []
        else:
            old = self._records.get(record.id)
            if old is None or not can_transition(old.status, record.status):
                return False
            self._records[record.id] = attrs.evolve(old, response=_copy(record.response))
            return True
        self._records[record.id] = attrs.evolve(
            record,
            response=_copy(record.response),
            input_items=_copy(record.input_items),
            context_items=_copy(record.context_items),
        )
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


@attrs.define
class _Lease:
    owner: str | None
    expires_at: float
    attempts: int
    resume: Any


@attrs.define
class _Idem:
    record: IdempotencyRecord
    owner: str
    started_at: float
    expires_at: float


class MemoryDurableStore:
    """Leases and idempotency records of one process (a memory store never outlives its
    process, so nothing is ever recovered from it; the leases keep the protocol whole)."""

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}
        self._idem: dict[tuple[str, str], _Idem] = {}

    async def acquire_lease(
        self, response_id: str, owner: str, lease_secs: float, resume: Any
    ) -> None:
        await trio.lowlevel.checkpoint()
        self._leases[response_id] = _Lease(owner, time.time() + lease_secs, 0, _copy(resume))

    async def renew_leases(self, owner: str, lease_secs: float) -> set[str]:
        await trio.lowlevel.checkpoint()
        mine = {rid for rid, lease in self._leases.items() if lease.owner == owner}
        for rid in mine:
            self._leases[rid].expires_at = time.time() + lease_secs
        return mine

    async def release_lease(self, response_id: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        lease = self._leases.get(response_id)
        if lease is not None and lease.owner == owner:
            lease.owner, lease.expires_at = None, 0.0

    async def drop_lease(self, response_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self._leases.pop(response_id, None)

    async def claim_expired(self, owner: str, lease_secs: float, limit: int) -> list[Claim]:
        await trio.lowlevel.checkpoint()
        now = time.time()
        claims: list[Claim] = []
        for rid, lease in sorted(self._leases.items(), key=lambda kv: kv[1].expires_at):
            if len(claims) >= limit or lease.expires_at >= now:
                break
            lease.attempts += lease.owner is not None
            lease.owner, lease.expires_at = owner, now + lease_secs
            claims.append(Claim(rid, lease.attempts, _copy(lease.resume)))
        return claims

    async def idempotency_begin(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        owner: str,
        ttl_secs: float,
        stale_after: float,
    ) -> IdempotencyRecord | None:
        await trio.lowlevel.checkpoint()
        now = time.time()
        entry = self._idem.get((scope, key))
        if entry is not None and not (
            entry.expires_at < now
            or (entry.record.state == "in_flight" and entry.started_at < now - stale_after)
        ):
            return entry.record
        record = IdempotencyRecord(fingerprint, "in_flight")
        self._idem[(scope, key)] = _Idem(record, owner, now, now + ttl_secs)
        return None

    async def idempotency_finish(
        self,
        scope: str,
        key: str,
        owner: str,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        await trio.lowlevel.checkpoint()
        entry = self._idem.get((scope, key))
        if entry is not None and entry.owner == owner and entry.record.state == "in_flight":
            entry.record = attrs.evolve(
                entry.record, state="done", status=status, headers=list(headers), body=body
            )

    async def idempotency_abandon(self, scope: str, key: str, owner: str) -> None:
        await trio.lowlevel.checkpoint()
        entry = self._idem.get((scope, key))
        if entry is not None and entry.owner == owner and entry.record.state == "in_flight":
            del self._idem[(scope, key)]

    async def idempotency_get(self, scope: str, key: str) -> IdempotencyRecord | None:
        await trio.lowlevel.checkpoint()
        entry = self._idem.get((scope, key))
        if entry is None or entry.expires_at < time.time():
            return None
        return entry.record

    async def purge_expired(self) -> None:
        await trio.lowlevel.checkpoint()
        now = time.time()
        for k in [k for k, e in self._idem.items() if e.expires_at < now]:
            del self._idem[k]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class MemoryBackend(StoreBackend):
    """A process-local backend: both stores in memory (tests, single-process embedding)."""

    steps: MemoryStore
    responses: MemoryResponseStore

    def __init__(self) -> None:
        super().__init__(MemoryStore(), MemoryResponseStore(), MemoryDurableStore())

    async def write_finished(self, finished: FinishedResponse) -> bool:
        """:class:`~onwards_trio._stores.base.FinishedWriter`: all of it at once (shielded
        when it has ``start_within``, as the SQL stores' writes are)."""
        if finished.start_within is None:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if not self.responses.put(finished):
            return False
        self.steps.adopt(finished.loop_responses, finished.steps)
        return True


_COLUMN = {name: i for i, name in enumerate(COLUMNS)}


class MemoryUsageStore:
    """The usage ledger in a list (tests, single process): what the SQL stores compute, in
    Python."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, UsageRow]] = []
        self._next_id = 1

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        await trio.lowlevel.checkpoint()
        for row in rows:
            self.rows.append((self._next_id, row))
            self._next_id += 1

    async def delete_usage_before(self, cutoff: float) -> int:
        await trio.lowlevel.checkpoint()
        kept = [(i, row) for i, row in self.rows if row.time >= cutoff]
        gone, self.rows = len(self.rows) - len(kept), kept
        return gone

    async def summarize_usage(self, query: UsageQuery, max_groups: int) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        keys = query.group_by
        groups: dict[tuple[Any, ...], list[Any]] = {}
        for _, row in self.rows:
            if not query.matches(row):
                continue
            group = tuple(
                int(row.time // BUCKET_SECONDS[k]) * BUCKET_SECONDS[k]
                if k in BUCKET_SECONDS
                else row[_COLUMN[k]]
                for k in keys
            )
            sums = groups.get(group)
            if sums is None:
                if len(groups) >= max_groups:
                    continue
                sums = groups[group] = [0, 0, 0, 0, None]
            sums[0] += 1
            sums[1] += row.input_tokens
            sums[2] += row.output_tokens
            sums[3] += row.cached_tokens
            if row.cost_micros is not None:
                sums[4] = (sums[4] or 0) + row.cost_micros
        if not keys and not groups:
            groups[()] = [0, 0, 0, 0, None]
        return [usage_group(keys, (*group, *sums)) for group, sums in groups.items()]

    async def usage_rows(self, query: UsageQuery, after: int, limit: int) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        out: list[dict[str, Any]] = []
        for i, row in self.rows:
            if i > after and query.matches(row):
                out.append(usage_row((i, *row)))
                if len(out) >= limit:
                    break
        return out

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
