"""The usage table's bounds in every backend: a retention cutoff keeps the rows at the cutoff,
a page holds at most its limit, and a summary at most its number of groups, each whole.

Each test kills a mutant of ``_stores/memory.py`` that survived the rest of the suite
(docs/testing-quality.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onwards_trio._proxy.ledger import UsageQuery, UsageRow
from onwards_trio._stores.base import UsageStore
from tests.stores.test_store_postgres import needs_postgres
from tests.stores.test_usage_store import EVERYTHING, ROWS, T0, open_store
from tests.stores.test_usage_store import store as store  # the fixture (ROWS written)

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)]


def row(t: float, key_label: str) -> UsageRow:
    return UsageRow(
        T0 + t, f"r{t}", key_label, "m", 0, "m", 1, 1, 0, None, 200, 1.0, "/v1/c", False
    )


async def test_a_retention_cutoff_keeps_the_rows_at_the_cutoff(store: UsageStore) -> None:
    assert await store.delete_usage_before(ROWS[0].time) == 0
    assert len(await store.usage_rows(EVERYTHING, 0, 100)) == len(ROWS)


async def test_a_page_holds_at_most_its_limit(store: UsageStore) -> None:
    assert [r["request_id"] for r in await store.usage_rows(EVERYTHING, 0, 2)] == ["a", "b"]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_summary_holds_at_most_its_groups_each_whole(kind: str, tmp_path: Path) -> None:
    # Which groups a capped summary keeps is unspecified; each one it keeps counts all its rows.
    async with open_store(kind, tmp_path) as opened:
        await opened.add_usage([row(1, "team-a"), row(2, "team-b"), row(3, "team-a")])
        groups = await opened.summarize_usage(UsageQuery(0, 1e12, ("key_label",)), 1)
    ((label, requests),) = [(g["key_label"], g["requests"]) for g in groups]
    assert requests == {"team-a": 2, "team-b": 1}[label]
