"""Lease and idempotency-record edges, for every DurableStore (memory, SQLite, PostgreSQL):
what renewing, releasing, dropping, claiming and abandoning change, and what they leave."""

from __future__ import annotations

from tests.stores.test_durable_store import Pair, begin, expire
from tests.stores.test_durable_store import stores as stores  # the fixture


async def test_a_renewed_lease_is_not_claimed(stores: Pair) -> None:
    a, b = stores
    await expire(a, "resp_1", "A")
    assert await a.renew_leases("A", 30.0) == {"resp_1"}
    assert await b.claim_expired("B", 30.0, 10) == []


async def test_only_its_owner_releases_a_lease(stores: Pair) -> None:
    a, b = stores
    await a.acquire_lease("resp_1", "A", 30.0, None)
    await b.release_lease("resp_1", "B")
    assert await b.claim_expired("B", 30.0, 10) == []
    assert await a.renew_leases("A", 30.0) == {"resp_1"}


async def test_dropping_an_unknown_lease_changes_nothing(stores: Pair) -> None:
    a, b = stores
    await expire(a, "resp_1", "A")
    await a.drop_lease("resp_unknown")
    assert [c.response_id for c in await b.claim_expired("B", 30.0, 10)] == ["resp_1"]


async def test_a_claim_takes_at_most_its_limit(stores: Pair) -> None:
    a, b = stores
    for i in range(3):
        await expire(a, f"resp_{i}", "A")
    assert len(await b.claim_expired("B", 30.0, 2)) == 2
    assert len(await b.claim_expired("B", 30.0, 2)) == 1


async def test_every_claim_of_a_lease_counts_an_attempt(stores: Pair) -> None:
    a, b = stores
    await expire(a, "resp_1", "A")
    (first,) = await b.claim_expired("B", -60.0, 10)  # B's lease expired at once too
    (second,) = await a.claim_expired("C", 30.0, 10)
    assert (first.attempts, second.attempts) == (1, 2)


async def test_only_its_owner_abandons_a_request_in_flight(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A")
    await b.idempotency_abandon("scope", "key-1", "B")
    seen = await begin(b, "C", "f2")
    assert (seen.fingerprint, seen.state) == ("f1", "in_flight")


async def test_a_finished_request_is_not_abandoned(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A")
    await a.idempotency_finish("scope", "key-1", "A", 200, [], b"{}")
    await a.idempotency_abandon("scope", "key-1", "A")
    seen = await begin(b, "B")
    assert (seen.state, seen.status) == ("done", 200)


async def test_only_its_owner_finishes_a_request_in_flight(stores: Pair) -> None:
    a, b = stores
    await begin(a, "A")
    await b.idempotency_finish("scope", "key-1", "B", 200, [], b"{}")
    seen = await begin(b, "C", "f2")
    assert (seen.fingerprint, seen.state) == ("f1", "in_flight")
