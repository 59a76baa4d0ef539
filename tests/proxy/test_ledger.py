"""The usage ledger's buffer and writer task: a full buffer drops and counts (never waits), a
failed write is retried, retention deletes old rows (MockClock and an injected wall clock)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import httpx
import pytest
import trio
import trio.testing

from onwards_trio import Gateway, parse_config
from onwards_trio._config import UsageSpec
from onwards_trio._ops.metrics import Metrics, install_metrics
from onwards_trio._proxy.ledger import UsageLedger, UsageQuery, UsageRow
from onwards_trio._stores.memory import MemoryUsageStore
from tests.support import FakeUpstream, serve_app

DAY = 86400.0


def row(time: float, request_id: str = "r") -> UsageRow:
    return UsageRow(time, request_id, "none", "m", 0, "m", 1, 2, 0, None, 200, 1.0, "/x", False)


async def stored(store: MemoryUsageStore) -> list[str]:
    found = await store.usage_rows(UsageQuery(0, 1e12), 0, 1000)
    return [r["request_id"] for r in found]


async def test_a_full_buffer_drops_new_rows_and_counts_them(nursery: trio.Nursery) -> None:
    upstream = await serve_app(nursery, FakeUpstream())
    config = parse_config(
        {
            "targets": {"m": {"url": upstream}},
            "store": {"kind": "memory"},
            # nothing is written before the read below: the buffer alone decides
            "usage": {"ledger": True, "buffer_rows": 2, "flush_interval_secs": 3600},
        }
    )
    gateway = Gateway(config)
    metrics = install_metrics(gateway, Metrics())
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=info.url, timeout=20) as client:
        body = {"model": "m", "messages": []}
        codes = [
            (await client.post("/v1/chat/completions", json=body)).status_code for _ in range(5)
        ]
        r = await client.get("/v1/usage", params={"start": 0, "limit": 10})
    assert codes == [200] * 5  # no request waited for, or failed on, the full ledger
    assert len(r.json()["rows"]) == 2
    assert b"onwards_usage_ledger_dropped_total 3.0" in metrics.render()


class FlakyStore(MemoryUsageStore):
    """Refuses the first ``failures`` writes."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def add_usage(self, rows: Sequence[UsageRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("store unreachable")
        await super().add_usage(rows)


async def test_a_failed_write_is_kept_and_written_by_the_next_flush() -> None:
    store = FlakyStore(failures=1)
    ledger = UsageLedger(UsageSpec(ledger=True), store)
    ledger._buf.extend([row(1, "a"), row(2, "b")])
    await ledger.flush()
    assert await stored(store) == [] and len(ledger) == 2
    await ledger.flush()
    assert await stored(store) == ["a", "b"] and len(ledger) == 0


async def test_a_failed_batch_goes_back_in_front_of_the_rows_behind_it() -> None:
    store = FlakyStore(failures=1)
    ledger = UsageLedger(UsageSpec(ledger=True, batch_rows=2), store)
    ledger._buf.extend([row(1, "a"), row(2, "b"), row(3, "c")])
    await ledger.flush()
    assert await stored(store) == [] and len(ledger) == 3  # no row lost or written twice
    await ledger.flush()
    assert await stored(store) == ["a", "b", "c"] and len(ledger) == 0


async def test_rows_are_written_in_batches_of_batch_rows() -> None:
    store = MemoryUsageStore()
    batches: list[int] = []
    write = store.add_usage

    async def counted(rows: Sequence[UsageRow]) -> None:
        batches.append(len(rows))
        await write(rows)

    store.add_usage = counted  # type: ignore[method-assign]
    ledger = UsageLedger(UsageSpec(ledger=True, batch_rows=2), store)
    ledger._buf.extend(row(i) for i in range(5))
    await ledger.flush()
    assert batches == [2, 2, 1]


async def test_close_writes_what_is_left() -> None:
    store = MemoryUsageStore()
    ledger = UsageLedger(UsageSpec(ledger=True), store)
    ledger._buf.extend([row(1, "a"), row(2, "b")])
    await ledger.aclose()
    assert await stored(store) == ["a", "b"] and ledger.dropped == 0


async def test_close_counts_what_it_could_not_write_as_dropped() -> None:
    store = FlakyStore(failures=10)
    dropped: list[int] = []
    ledger = UsageLedger(UsageSpec(ledger=True), store, on_drop=dropped.append)
    ledger._buf.extend([row(1), row(2)])
    await ledger.aclose()
    assert ledger.dropped == 2 and dropped == [2]


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "onwards_trio"]


async def test_a_failed_write_is_logged_as_a_warning_with_its_row_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = UsageLedger(UsageSpec(ledger=True), FlakyStore(failures=1))
    ledger._buf.extend([row(1), row(2)])
    with caplog.at_level(logging.WARNING, logger="onwards_trio"):
        await ledger.flush()
    assert logged(caplog) == [
        (logging.WARNING, "usage ledger: writing 2 rows failed (OSError); retrying later")
    ]


async def test_rows_lost_at_shutdown_are_logged_as_an_error_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = UsageLedger(UsageSpec(ledger=True), FlakyStore(failures=10))
    ledger._buf.extend([row(1), row(2), row(3)])
    with caplog.at_level(logging.ERROR, logger="onwards_trio"):
        await ledger.aclose()
    assert logged(caplog) == [
        (logging.ERROR, "usage ledger: 3 rows could not be written at shutdown")
    ]


class HangingStore(MemoryUsageStore):
    """Writes, then takes an hour to close (a database that stopped answering)."""

    async def aclose(self) -> None:
        await trio.sleep(3600)


async def test_close_gives_up_on_a_store_that_hangs_on_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = HangingStore()
    ledger = UsageLedger(UsageSpec(ledger=True), store, close_timeout=5.0)
    ledger._buf.append(row(1, "a"))
    start = trio.current_time()
    await ledger.aclose()
    assert await stored(store) == ["a"]  # the rows were written before the close hung
    assert trio.current_time() - start == 5.0


async def test_a_store_that_hangs_on_close_is_logged_as_an_error(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = UsageLedger(UsageSpec(ledger=True), HangingStore(), close_timeout=5.0)
    with caplog.at_level(logging.ERROR, logger="onwards_trio"):
        await ledger.aclose()
    assert logged(caplog) == [(logging.ERROR, "usage ledger: the store did not close within 5 s")]


class WallClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_retention_deletes_rows_older_than_the_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    wall = WallClock(100 * DAY)
    store = MemoryUsageStore()
    await store.add_usage([row(wall.now - 3 * DAY, "old"), row(wall.now - 0.5 * DAY, "recent")])
    spec = UsageSpec(ledger=True, retention_days=2)
    ledger = UsageLedger(spec, store, clock=wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        await trio.sleep(1)
        assert await stored(store) == ["recent"]  # the first delete runs at start
        wall.now += 2 * DAY  # "recent" is now 2.5 days old
        await trio.sleep(3600)  # the next periodic delete
        assert await stored(store) == []
        nursery.cancel_scope.cancel()


async def test_without_a_retention_nothing_is_deleted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryUsageStore()
    await store.add_usage([row(0.0, "ancient")])
    ledger = UsageLedger(UsageSpec(ledger=True, retention_days=None), store)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        await trio.sleep(10 * 3600)
        nursery.cancel_scope.cancel()
    assert await stored(store) == ["ancient"]


async def test_the_task_flushes_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryUsageStore()
    ledger = UsageLedger(UsageSpec(ledger=True, flush_interval_secs=5), store)
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        ledger._buf.append(row(1, "a"))
        await trio.sleep(4)
        before = await stored(store)
        await trio.sleep(2)
        after = await stored(store)
        nursery.cancel_scope.cancel()
    assert (before, after) == ([], ["a"])
