"""One suite for every DurableStore (memory, SQLite, PostgreSQL): leases on background responses
and Idempotency-Key records. Two instances on one file or database stand for two processes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from onwards_trio._stores.base import Claim, DurableStore
from onwards_trio._stores.memory import MemoryBackend
from onwards_trio._stores.postgres import PostgresDatabase, PostgresDurableStore
from onwards_trio._stores.sqlite import SqliteDurableStore
from tests.stores.test_store_postgres import fresh_schema, needs_postgres

Pair = tuple[DurableStore, DurableStore]


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=needs_postgres)])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    """Two stores over the same data, as two processes would have them."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "memory":
            one = MemoryBackend().durable  # the memory backend's own durable store
            assert one is not None
            yield one, one
            return
        a: DurableStore
        b: DurableStore
        if request.param == "sqlite":
            path = str(tmp_path / "d.sqlite3")
            a, b = SqliteDurableStore(path), SqliteDurableStore(path)
        else:
            dsn = await stack.enter_async_context(fresh_schema())
            a, b = (
                PostgresDurableStore(PostgresDatabase(dsn)),
                PostgresDurableStore(PostgresDatabase(dsn)),
            )
        try:
            yield a, b
        finally:
            await a.aclose()
            await b.aclose()


async def expire(store: DurableStore, response_id: str, owner: str) -> None:
    """Make a lease expire now (as if its owner stopped renewing long ago)."""
    await store.acquire_lease(response_id, owner, -60.0, {"r": response_id})


# -- leases ---------------------------------------------------------------------------------------


async def test_a_live_lease_is_never_claimed(stores: Pair) -> None:
    a, b = stores
    await a.acquire_lease("resp_1", "A", 30.0, {"alias": "m"})
    assert await b.claim_expired("B", 30.0, 10) == []


async def test_an_expired_lease_is_claimed_with_its_resume_data_and_counted(stores: Pair) -> None:
    a, b = stores
    await expire(a, "resp_1", "A")
    (claim,) = await b.claim_expired("B", 30.0, 10)
    assert claim == Claim("resp_1", 1, {"r": "resp_1"})
    assert await b.renew_leases("B", 30.0) == {"resp_1"}
    assert await a.renew_leases("A", 30.0) == set()  # A lost it


async def test_a_released_lease_is_claimable_at_once_and_not_counted(stores: Pair) -> None:
    a, b = stores
    await a.acquire_lease("resp_1", "A", 30.0, None)
    await a.release_lease("resp_1", "A")
    (claim,) = await b.claim_expired("B", 30.0, 10)
    assert claim.attempts == 0


async def test_concurrent_claims_never_share_a_response(stores: Pair) -> None:
    a, b = stores
    for i in range(20):
        await expire(a, f"resp_{i}", "dead")
    got: dict[str, list[Claim]] = {}

    async def claim(store: DurableStore, owner: str) -> None:
        got[owner] = []
        while batch := await store.claim_expired(owner, 30.0, 3):
            got[owner] += batch

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, a, "A")
        nursery.start_soon(claim, b, "B")
    ids_a = {c.response_id for c in got["A"]}
    ids_b = {c.response_id for c in got["B"]}
    assert not ids_a & ids_b
    assert ids_a | ids_b == {f"resp_{i}" for i in range(20)}


async def test_renewal_is_one_call_for_all_leases_of_an_owner(stores: Pair) -> None:
    a, _ = stores
    for i in range(5):
        await a.acquire_lease(f"resp_{i}", "A", 30.0, None)
    await a.acquire_lease("resp_x", "X", 30.0, None)
    assert await a.renew_leases("A", 30.0) == {f"resp_{i}" for i in range(5)}


async def test_a_dropped_lease_is_gone(stores: Pair) -> None:
    a, b = stores
    await expire(a, "resp_1", "A")
    await a.drop_lease("resp_1")
    assert await b.claim_expired("B", 30.0, 10) == []


# -- idempotency records --------------------------------------------------------------------------


async def begin(store: DurableStore, owner: str, fingerprint: str = "f1", **kw: Any) -> Any:
    args: dict[str, Any] = {"ttl_secs": 60.0, "stale_after": 60.0, **kw}
    return await store.idempotency_begin("scope", "key-1", fingerprint, owner, **args)


async def test_the_first_request_under_a_key_owns_it(stores: Pair) -> None:
    a, b = stores
    assert await begin(a, "A") is None
    seen = await begin(b, "B", "f2")
    assert (seen.fingerprint, seen.state) == ("f1", "in_flight")


async def test_a_finished_request_is_stored_for_replay(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A")
    headers = [(b"content-type", b"application/json"), (b"x-odd", b"\xff")]
    await a.idempotency_finish("scope", "key-1", "A", 201, headers, b'{"ok":1}')
    seen = await begin(b, "B")
    assert (seen.state, seen.status, seen.headers, seen.body) == (
        "done",
        201,
        headers,
        b'{"ok":1}',
    )
    assert await b.idempotency_get("scope", "key-1") == seen


async def test_an_abandoned_request_frees_its_key(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A")
    await a.idempotency_abandon("scope", "key-1", "A")
    assert await begin(b, "B") is None


async def test_expired_and_stale_records_free_their_key(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A", ttl_secs=-1.0)
    assert await b.idempotency_get("scope", "key-1") is None
    assert await begin(b, "B") is None  # expired: taken over
    assert await begin(a, "A", stale_after=-1.0) is None  # in flight for too long: taken over
    await a.purge_expired()


async def test_keys_are_scoped(stores: Pair) -> None:
    a, b = stores
    assert await a.idempotency_begin("client-1", "k", "f", "A", 60.0, 60.0) is None
    assert await b.idempotency_begin("client-2", "k", "f", "B", 60.0, 60.0) is None
