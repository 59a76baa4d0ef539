"""The usage ledger's table in every backend (memory, SQLite, PostgreSQL): the same rows give
the same sums, groups, pages and retention deletes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._proxy.ledger import UsageQuery, UsageRow
from onwards_trio._stores.base import UsageStore
from onwards_trio._stores.memory import MemoryUsageStore
from onwards_trio._stores.postgres import PostgresUsageStore
from onwards_trio._stores.sqlite import SqliteUsageStore
from tests.stores.test_store_postgres import fresh_schema, needs_postgres

HOUR = 3600.0
T0 = 1_700_000_000.0 - 1_700_000_000.0 % 86400  # a day's start

ROWS = [
    # time, request_id, key_label, alias, provider, model, in, out, cached, cost, status,
    # latency, route, streamed
    UsageRow(T0 + 10, "a", "team-a", "m", 0, "m", 10, 5, 2, 100, 200, 12.5, "/v1/c", False),
    UsageRow(T0 + 20, "b", "team-a", "m", 1, "up", 20, 6, 0, None, 200, 3.0, "/v1/c", True),
    UsageRow(T0 + HOUR + 1, "c", "team-b", "m", 0, "m", 30, 7, 1, 50, 200, 1.0, "/v1/c", False),
    UsageRow(T0 + HOUR + 2, "d", "team-b", "x", None, "x", 0, 0, 0, None, 429, 0.5, "/v1/c", False),
]
EVERYTHING = UsageQuery(0, 1e12)


@contextlib.asynccontextmanager
async def open_store(kind: str, tmp_path: Path) -> AsyncIterator[UsageStore]:
    store: UsageStore
    if kind == "postgres":
        async with fresh_schema() as dsn:
            store = PostgresUsageStore(dsn)
            try:
                yield store
            finally:
                await store.aclose()
        return
    store = SqliteUsageStore(tmp_path / "u.sqlite3") if kind == "sqlite" else MemoryUsageStore()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UsageStore]:
    async with open_store(request.param, tmp_path) as opened:
        with trio.fail_after(30):
            await opened.add_usage(ROWS)
        yield opened


def strip(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(groups, key=lambda g: repr(sorted(g.items())))


async def test_rows_come_back_as_written_in_insertion_order(store: UsageStore) -> None:
    found = await store.usage_rows(EVERYTHING, 0, 100)
    assert [tuple(r[k] for k in UsageRow._fields) for r in found] == [tuple(r) for r in ROWS]
    assert [r["id"] for r in found] == sorted({r["id"] for r in found})


async def test_rows_page_after_an_id(store: UsageStore) -> None:
    first = await store.usage_rows(EVERYTHING, 0, 2)
    rest = await store.usage_rows(EVERYTHING, first[-1]["id"], 100)
    assert [r["request_id"] for r in first + rest] == ["a", "b", "c", "d"]


async def test_the_total_sums_every_row_and_only_priced_costs(store: UsageStore) -> None:
    (total,) = await store.summarize_usage(EVERYTHING, 100)
    assert total == {
        "requests": 4,
        "input_tokens": 60,
        "output_tokens": 18,
        "cached_tokens": 3,
        "cost_micros": 150,
    }


async def test_a_total_over_no_rows_is_zero_with_no_cost(store: UsageStore) -> None:
    (total,) = await store.summarize_usage(UsageQuery(0, 1), 100)
    assert total == {
        "requests": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_tokens": 0,
        "cost_micros": None,
    }


async def test_groups_by_columns(store: UsageStore) -> None:
    query = UsageQuery(0, 1e12, ("key_label", "provider", "streamed"))
    groups = await store.summarize_usage(query, 100)
    keys = (*query.group_by, "requests", "cost_micros")
    assert strip([{k: g[k] for k in keys} for g in groups]) == strip(
        [
            dict(zip(keys, ("team-a", 0, False, 1, 100), strict=True)),
            dict(zip(keys, ("team-a", 1, True, 1, None), strict=True)),
            dict(zip(keys, ("team-b", 0, False, 1, 50), strict=True)),
            dict(zip(keys, ("team-b", None, False, 1, None), strict=True)),
        ]
    )


async def test_groups_by_hour_buckets(store: UsageStore) -> None:
    groups = await store.summarize_usage(UsageQuery(0, 1e12, ("hour",)), 100)
    assert strip([{"hour": g["hour"], "requests": g["requests"]} for g in groups]) == strip(
        [{"hour": int(T0), "requests": 2}, {"hour": int(T0 + HOUR), "requests": 2}]
    )


async def test_filters_and_range_narrow_the_rows(store: UsageStore) -> None:
    query = UsageQuery(T0 + 15, T0 + HOUR + 2, (), alias="m", key_label="team-a")
    (total,) = await store.summarize_usage(query, 100)
    found = await store.usage_rows(query, 0, 100)
    assert total["requests"] == 1 and [r["request_id"] for r in found] == ["b"]


async def test_a_range_holds_its_start_and_not_its_end(store: UsageStore) -> None:
    query = UsageQuery(T0 + 10, T0 + HOUR + 2)  # rows at T0 + 10 (a) and T0 + HOUR + 2 (d)
    (total,) = await store.summarize_usage(query, 100)
    found = await store.usage_rows(query, 0, 100)
    assert total["requests"] == 3 and [r["request_id"] for r in found] == ["a", "b", "c"]


async def test_delete_before_a_time_removes_only_older_rows(store: UsageStore) -> None:
    assert await store.delete_usage_before(T0 + HOUR) == 2
    found = await store.usage_rows(EVERYTHING, 0, 100)
    assert [r["request_id"] for r in found] == ["c", "d"]
