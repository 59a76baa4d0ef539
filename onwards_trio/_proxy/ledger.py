"""The usage ledger: one row per proxied request and per model call of a loop, written off the
hot path.

A request pays for one small tuple appended to a bounded list (:meth:`UsageLedger.note`, at
the end of :meth:`~onwards_trio._proxy.pipeline.Proxy.open_upstream`). A task in the gateway's
service nursery (:meth:`UsageLedger.run`) writes what has accumulated every
``flush_interval_secs`` (sooner when a batch is full), up to ``batch_rows`` rows per store
call, each call one transaction; it also deletes rows past ``retention_days``. A full buffer
drops the new row and counts it (``dropped``, and the ``on_drop`` hook the gateway points at
its Prometheus counter): a request never waits for the ledger.

A batch the store refuses (unreachable, cancelled before it ran) goes back to the front of the
buffer and is tried again at the next flush, so a short outage loses nothing that fits in the
buffer. At shutdown the gateway calls :meth:`UsageLedger.aclose` after its service nursery
has closed, i.e. after every request it answered has noted its row: everything left is
written then (bounded by ``close_timeout``), so a graceful stop loses no answered request.

The ledger opens its own store (``_stores.open_usage_store``): its final write must not race
the Responses store being closed, and a ledger write never queues behind a response's.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import attrs
import trio

from onwards_trio._config import UsageSpec
from onwards_trio._errors import HTTPError
from onwards_trio._proxy.pricing import cost_micros

if TYPE_CHECKING:
    from types import TracebackType

    from onwards_trio._proxy.pipeline import ProxyRequest, UpstreamReply
    from onwards_trio._proxy.targets import Pool, Provider, Table
    from onwards_trio._proxy.usage import Usage
    from onwards_trio._stores.base import UsageStore

__all__ = [
    "GROUP_KEYS",
    "MAX_GROUPS",
    "LedgerNote",
    "UsageLedger",
    "UsageQuery",
    "UsageRow",
    "cost_of",
]

log = logging.getLogger("onwards_trio")

# What GET /v1/usage may group by: row columns, and time buckets (the bucket's start, epoch s).
GROUP_KEYS: Final = (
    "alias",
    "key_label",
    "provider",
    "model",
    "status",
    "route",
    "streamed",
    "hour",
    "day",
)
BUCKET_SECONDS: Final = {"hour": 3600, "day": 86400}
MAX_GROUPS: Final = 1000  # groups one summary returns at most (past it: groups_truncated)
_PURGE_INTERVAL: Final = 3600.0  # seconds between retention deletes


class UsageRow(NamedTuple):
    """One ledger row, in column order (a tuple: cheap to build, written as is)."""

    time: float  # epoch seconds when the request reached the pipeline
    request_id: str  # the response id for a loop's model calls, else one per request
    key_label: str  # the caller's key_definitions name, "none" or "other": never the key
    alias: str  # as the client named it
    provider: int | None  # the index of the provider that answered (None: none was tried)
    model: str  # what the provider was asked for (its onwards_model, else the alias)
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_micros: int | None  # micro-units of the price table's currency (None: no price)
    status: int
    latency_ms: float  # until the answer's last byte was relayed
    route: str  # the client's route (/v1/chat/completions, /v1/responses, /v1/messages, ...)
    streamed: bool


COLUMNS: Final = UsageRow._fields


@attrs.frozen
class UsageQuery:
    """A read of the ledger: rows with ``start <= time < end``, optionally of one alias and
    one key label, summed per distinct value of ``group_by`` (no keys: one total)."""

    start: float
    end: float
    group_by: tuple[str, ...] = ()
    alias: str | None = None
    key_label: str | None = None

    def matches(self, row: Sequence[Any]) -> bool:
        """Whether a row (in :data:`COLUMNS` order) is in the query's range and filters."""
        return (
            self.start <= row[0] < self.end
            and (self.alias is None or row[3] == self.alias)
            and (self.key_label is None or row[2] == self.key_label)
        )


def cost_of(pool: Pool, provider: Provider, usage: Usage) -> int | None:
    """What ``usage`` cost at the price of the provider that answered (micro-units of the
    price table's currency, :mod:`~onwards_trio._proxy.pricing`; ``None``: no price)."""
    price = provider.price
    return cost_micros(usage, price) if price is not None else None


_ids = itertools.count(1)
_ID_PREFIX: Final = f"req_{os.urandom(6).hex()}_"  # unique per process, cheap per request


def new_request_id() -> str:
    return _ID_PREFIX + str(next(_ids))


_new_row: Final = tuple.__new__


class UsageLedger:
    """The buffer and the task that writes it to a :class:`~onwards_trio._stores.base.UsageStore`.

    ``clock`` is the wall clock rows are stamped with and retention is measured by (tests
    inject one); waits use Trio's clock.
    """

    def __init__(
        self,
        spec: UsageSpec,
        store: UsageStore,
        *,
        clock: Callable[[], float] = time.time,
        on_drop: Callable[[int], None] | None = None,
        close_timeout: float = 10.0,
    ) -> None:
        self.spec = spec
        self.store = store
        self.clock = clock
        self.on_drop = on_drop
        self.close_timeout = close_timeout
        self.max_rows = spec.buffer_rows
        self.dropped = 0  # rows dropped since start (full buffer, or unwritable at shutdown)
        self._buf: list[UsageRow] = []
        self._wake = trio.Event()

    def __len__(self) -> int:
        """Rows waiting to be written."""
        return len(self._buf)

    def note(
        self,
        request: ProxyRequest,
        key_label: str,
        pool: Pool,
        provider: Provider | None,
        status: int,
        streamed: bool,
        seconds: float,
    ) -> None:
        """Queue the row of a request that has ended (``seconds`` after it started)."""
        if len(self._buf) >= self.max_rows:
            self.drop(1)
            return
        usage = request.usage
        model = provider.spec.onwards_model if provider is not None else None
        # tuple.__new__: a NamedTuple's own __new__ is Python code, ten times slower
        self._buf.append(
            _new_row(
                UsageRow,
                (
                    self.clock() - seconds,
                    request.request_id or new_request_id(),
                    key_label,
                    request.alias or pool.alias,
                    provider.index if provider is not None else None,
                    model or pool.alias,
                    usage.input_tokens if usage is not None else 0,
                    usage.output_tokens if usage is not None else 0,
                    usage.cached_tokens if usage is not None else 0,
                    request.cost,
                    status,
                    seconds * 1000.0,
                    request.route or request.path,
                    streamed,
                ),
            )
        )
        if len(self._buf) == self.spec.batch_rows:
            self._wake.set()

    def drop(self, count: int) -> None:
        self.dropped += count
        if self.on_drop is not None:
            self.on_drop(count)

    async def flush(self) -> None:
        """Write every waiting row, a batch per store call. A batch that fails goes back to
        the front of the buffer (the next flush retries it) and ends this flush."""
        batch_rows = self.spec.batch_rows
        while self._buf:
            batch = self._buf[:batch_rows]
            del self._buf[:batch_rows]
            try:
                await self.store.add_usage(batch)
            except BaseException as exc:
                self._buf[:0] = batch  # not written: a store call that raises wrote nothing
                if not isinstance(exc, Exception):
                    raise
                log.warning(
                    "usage ledger: writing %d rows failed (%s); retrying later",
                    len(batch),
                    type(exc).__name__,
                )
                return

    async def purge(self) -> None:
        """Delete rows older than the retention (none configured: nothing)."""
        days = self.spec.retention_days
        if days is None:
            return
        try:
            await self.store.delete_usage_before(self.clock() - days * 86400.0)
        except Exception as exc:
            log.warning("usage ledger: retention delete failed (%s)", type(exc).__name__)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush every interval (or when a batch is full) and apply retention, until
        cancelled. What is left at cancellation is :meth:`aclose`'s."""
        task_status.started()
        interval = self.spec.flush_interval_secs
        next_purge = trio.current_time()
        while True:
            if trio.current_time() >= next_purge:
                await self.purge()
                next_purge = trio.current_time() + _PURGE_INTERVAL
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush()

    async def aclose(self) -> None:
        """Write what is left and close the store, shielded: the flush at most
        ``close_timeout``, closing the store at most ``close_timeout`` more, so a store that
        hangs cannot hold shutdown. Rows that could not be written are counted as dropped
        and logged."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.close_timeout):
                await self.flush()
            if self._buf:
                lost, self._buf = len(self._buf), []
                self.drop(lost)
                log.error("usage ledger: %d rows could not be written at shutdown", lost)
            with trio.move_on_after(self.close_timeout) as closing:
                await self.store.aclose()
            if closing.cancelled_caught:
                log.error("usage ledger: the store did not close within %.0f s", self.close_timeout)


class LedgerNote:
    """Notes a pipeline run's row when it ends: pushed first on the run's exit stack, its
    ``__exit__`` runs last, after the body was relayed (or the run failed), and sees how it
    ended. The status is the answer's (``reply``, once there is one), else the gateway
    error's, else 499 (cancelled: the caller went away) or 500."""

    __slots__ = ("ledger", "pool", "reply", "request", "started", "table")

    def __init__(self, ledger: UsageLedger, table: Table, pool: Pool, request: ProxyRequest):
        self.ledger = ledger
        self.table = table
        self.pool = pool
        self.request = request
        self.reply: UpstreamReply | None = None
        self.started = time.perf_counter()  # trio.current_time() costs three Python calls

    def __enter__(self) -> LedgerNote:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        reply = self.reply
        request = self.request
        if reply is not None:
            status = reply.status
        elif isinstance(exc, HTTPError):
            status = exc.status
        else:
            status = 500 if isinstance(exc, Exception) else 499
        self.ledger.note(
            request,
            self.table.key_label_of(request.key_id),
            self.pool,
            reply.provider if reply is not None else None,
            status,
            reply.is_sse if reply is not None else request.wants_stream,
            time.perf_counter() - self.started,
        )
