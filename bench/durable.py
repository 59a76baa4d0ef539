"""Lease renewal cost with 1,000 running background responses (``python bench/durable.py``).

A gateway renews every lease it holds with one store write (``renew_leases``: one ``UPDATE …
WHERE owner = …``) every ``lease_secs / 3``. We hold ``N`` leases for one owner (plus ``N``
for another, so the update has to pick its rows) and time:

* ``batched``: one ``renew_leases`` call, as the gateway makes it;
* ``per response``: ``N`` single-lease writes, what renewing each response on its own would
  cost (the design this replaces), for comparison;
* ``claim (nothing expired)``: the recovery scan the gateway makes every
  ``recovery_interval_secs``, which reads and writes nothing when no lease expired.

From these: store writes per second at the defaults (``lease_secs`` 15, so one renewal
every 5 s) and the share of the time spent renewing. SQLite always; PostgreSQL when
``ONWARDS_TEST_POSTGRES_DSN`` is set (``.ci/postgres.sh`` prints one).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from onwards_trio._config import BackgroundSpec
from onwards_trio._stores.base import DurableStore
from onwards_trio._stores.sqlite import SqliteDurableStore

N = 1000
ROUNDS = 20
LEASE = BackgroundSpec().lease_secs


async def timed(fn: Callable[[], Awaitable[Any]], rounds: int = ROUNDS) -> float:
    """Median seconds per call."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def measure(name: str, store: DurableStore) -> None:
    for i in range(N):
        await store.acquire_lease(f"resp_a{i}", "owner-a", LEASE, {"alias": "m"})
        await store.acquire_lease(f"resp_b{i}", "owner-b", LEASE, {"alias": "m"})

    async def batched() -> None:
        assert len(await store.renew_leases("owner-a", LEASE)) == N

    async def one_by_one() -> None:
        for i in range(N):
            await store.acquire_lease(f"resp_a{i}", "owner-a", LEASE, {"alias": "m"})

    async def scan() -> None:
        assert await store.claim_expired("owner-c", LEASE, 64) == []

    t_batch = await timed(batched)
    t_each = await timed(one_by_one, rounds=3)
    t_scan = await timed(scan)
    interval = LEASE / 3
    print(f"{name}: {N} running background responses, lease {LEASE:g} s")
    print(f"  batched renewal      {t_batch * 1e3:8.2f} ms per round (1 write)")
    print(f"  per-response renewal {t_each * 1e3:8.2f} ms per round ({N} writes)")
    print(f"  claim, none expired  {t_scan * 1e3:8.2f} ms (0 writes)")
    print(
        f"  store writes/s: batched {1 / interval:.2f} (rows {N / interval:.0f}/s), "
        f"per response {N / interval:.0f}; "
        f"renewing takes {t_batch / interval * 100:.3f} % of the time "
        f"(per response: {t_each / interval * 100:.2f} %, {t_each / t_batch:.0f}x more)"
    )


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteDurableStore(str(Path(tmp) / "bench.sqlite3"))
        try:
            await measure("sqlite", sqlite)
        finally:
            await sqlite.aclose()
    dsn = os.environ.get("ONWARDS_TEST_POSTGRES_DSN")
    if dsn:
        from onwards_trio._stores.postgres import PostgresDatabase, PostgresDurableStore

        pg = PostgresDurableStore(PostgresDatabase(dsn))
        try:
            await pg.database.run(lambda c: c.execute("DELETE FROM oresp_leases"))
            await measure("postgres", pg)
            await pg.database.run(lambda c: c.execute("DELETE FROM oresp_leases"))
        finally:
            await pg.aclose()


if __name__ == "__main__":
    trio.run(main)
