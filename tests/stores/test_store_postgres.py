"""The PostgreSQL stores as several replicas see them: two store instances (two pools) on one
database behave as one store, and two gateways on one database serve each other's responses.

Needs a server: set ``ONWARDS_TEST_POSTGRES_DSN`` (``.ci/postgres.sh`` prints one); without it
these tests are skipped. Each test gets a fresh schema (``search_path`` set through the DSN's
``options``), dropped afterwards. The shared suites in ``test_store.py`` and
``test_response_store.py`` use :func:`fresh_schema` too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import orjson
import psycopg
import psycopg.conninfo
import pytest
import trio

from onwards_trio import Gateway, parse_config
from onwards_trio._loop.steps import StepDescriptor, StepState, StoreError, StoreErrorKind
from onwards_trio._stores.base import StoredEvent, StoredResponse
from onwards_trio._stores.postgres import (
    PostgresDatabase,
    PostgresResponseStore,
    PostgresStore,
)
from tests.responses.test_responses_api import BACKGROUND_EVENTS, sdk, text_reply
from tests.support import FakeUpstream, serve_app, start_gateway

POSTGRES_DSN = os.environ.get("ONWARDS_TEST_POSTGRES_DSN", "")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_DSN, reason="set ONWARDS_TEST_POSTGRES_DSN (see .ci/postgres.sh)"
)

MODEL = StepDescriptor.model_call({"model": "m", "messages": []})


def _admin(sql: str) -> None:
    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)


@contextlib.asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A DSN whose ``search_path`` is a new, empty schema (dropped on exit)."""
    name = "onwards_t_" + secrets.token_hex(6)
    with trio.fail_after(15):
        await trio.to_thread.run_sync(_admin, f"CREATE SCHEMA {name}")
    try:
        yield psycopg.conninfo.make_conninfo(POSTGRES_DSN, options=f"-c search_path={name}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            await trio.to_thread.run_sync(_admin, f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
async def dsn() -> AsyncIterator[str]:
    async with fresh_schema() as value:
        yield value


@contextlib.asynccontextmanager
async def replicas(dsn: str) -> AsyncIterator[tuple[PostgresDatabase, PostgresDatabase]]:
    """Two pools on one database, as two gateway processes would have."""
    a, b = PostgresDatabase(dsn, pool_size=4), PostgresDatabase(dsn, pool_size=4)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def record(rid: str) -> StoredResponse:
    return StoredResponse(id=rid, response={"id": rid, "status": "in_progress", "output": []})


# -- without a server -----------------------------------------------------------------------------


async def test_an_unreachable_database_is_a_bounded_storage_error() -> None:
    # Port 1 on loopback refuses at once; the pool retries until connect_timeout, then gives up.
    store = PostgresStore(
        PostgresDatabase("postgresql://nobody@127.0.0.1:1/x", connect_timeout=0.5)
    )
    with trio.fail_after(10), pytest.raises(StoreError) as info:
        await store.list_chain("a", None)
    assert info.value.kind is StoreErrorKind.STORAGE
    await store.aclose()


def test_the_postgres_kind_builds_one_pool_for_both_stores() -> None:
    gateway = Gateway(
        parse_config(
            {
                "targets": {"m": {"url": "http://127.0.0.1:9/v1"}},
                "store": {
                    "kind": "postgres",
                    "dsn": "postgresql://x@127.0.0.1:1/y",
                    "pool_size": 3,
                },
            }
        )
    )
    responses, steps = gateway.responses._stores()
    assert isinstance(responses, PostgresResponseStore)
    assert isinstance(steps, PostgresStore)
    assert responses.database is steps.database
    assert (steps.database.dsn, steps.database.pool_size) == ("postgresql://x@127.0.0.1:1/y", 3)


@needs_postgres
async def test_aclose_in_a_cancelled_scope_still_closes_the_pool(dsn: str) -> None:
    database = PostgresDatabase(dsn)
    await PostgresStore(database).list_chain("r", None)
    pool = database._pool
    assert pool is not None and not pool.closed
    with trio.CancelScope() as scope:
        scope.cancel()
        await database.aclose()
    assert pool.closed


@needs_postgres
async def test_a_closed_store_opens_its_pool_again_when_used(dsn: str) -> None:
    store = PostgresStore(dsn)
    rec = await store.record_step("r", None, None, MODEL)
    await store.aclose()
    try:
        assert [s.id for s in await store.list_chain("r", None)] == [rec.id]
    finally:
        await store.aclose()


# -- two replicas on one database -----------------------------------------------------------------


@needs_postgres
async def test_two_replicas_allocate_distinct_gap_free_sequences(dsn: str) -> None:
    async with replicas(dsn) as (a, b):
        stores = [PostgresStore(a), PostgresStore(b)]
        got: list[int] = []

        async def record_steps(store: PostgresStore) -> None:
            for _ in range(15):
                got.append((await store.record_step("r", None, None, MODEL)).sequence)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for store in stores:
                    for _ in range(4):
                        nursery.start_soon(record_steps, store)
        assert sorted(got) == list(range(1, 121))
        assert [s.sequence for s in await stores[1].list_chain("r", None)] == list(range(1, 121))


@needs_postgres
async def test_two_replicas_creating_the_schema_at_once_both_succeed(dsn: str) -> None:
    async with replicas(dsn) as (a, b), trio.open_nursery() as nursery:
        nursery.start_soon(PostgresStore(a).list_chain, "r", None)
        nursery.start_soon(PostgresResponseStore(b).get, "resp_x")


@needs_postgres
async def test_a_step_canceled_on_one_replica_cannot_complete_on_the_other(dsn: str) -> None:
    async with replicas(dsn) as (a, b):
        first, second = PostgresStore(a), PostgresStore(b)
        rec = await first.record_step("r", None, None, MODEL)
        await second.mark_step_processing(rec.id)
        assert await first.cancel_step(rec.id, {"type": "canceled"})
        with pytest.raises(StoreError) as info:
            await second.complete_step(rec.id, {"late": True})
        assert info.value.kind is StoreErrorKind.CONFLICT
        assert (await second.get_step(rec.id)).state is StepState.CANCELED


@needs_postgres
async def test_a_terminal_status_written_by_one_replica_is_final_for_the_other(dsn: str) -> None:
    async with replicas(dsn) as (a, b):
        first, second = PostgresResponseStore(a), PostgresResponseStore(b)
        await first.create(record("resp_1"))
        cancel = {"id": "resp_1", "status": "cancelled", "output": []}
        done = {"id": "resp_1", "status": "completed", "output": [{"type": "x"}]}
        results: dict[str, bool] = {}

        async def write(name: str, store: PostgresResponseStore, body: dict[str, Any]) -> None:
            results[name] = await store.update("resp_1", body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write, "cancel", first, cancel)
            nursery.start_soon(write, "done", second, done)
        assert sorted(results.values()) == [False, True]  # exactly one writer won
        got = await second.get("resp_1")
        assert got is not None
        assert got.status == ("cancelled" if results["cancel"] else "completed")


@needs_postgres
async def test_events_appended_after_another_replica_deleted_are_not_kept(dsn: str) -> None:
    async with replicas(dsn) as (a, b):
        first, second = PostgresResponseStore(a), PostgresResponseStore(b)
        await first.create(record("resp_1"))
        assert await second.delete("resp_1")
        await first.append_events("resp_1", [StoredEvent(0, "response.created", b"{}")])
        assert await second.events_after("resp_1", -1) == []


@needs_postgres
async def test_event_data_is_kept_byte_for_byte(dsn: str) -> None:
    store = PostgresResponseStore(dsn)
    try:
        await store.create(record("resp_1"))
        data = b'{"b": 1,  "a": "\xc3\xa9"}'  # key order and spacing as sent
        await store.append_events("resp_1", [StoredEvent(3, "response.created", data)])
        assert await store.events_after("resp_1", 0) == [StoredEvent(3, "response.created", data)]
    finally:
        await store.aclose()


@needs_postgres
async def test_a_nul_character_jsonb_refuses_is_a_serialization_error(dsn: str) -> None:
    store = PostgresStore(dsn)
    try:
        with pytest.raises(StoreError) as info:
            await store.record_step("r", None, None, StepDescriptor.model_call({"x": "a\x00b"}))
        assert info.value.kind is StoreErrorKind.SERIALIZATION
        assert await store.list_chain("r", None) == []
    finally:
        await store.aclose()


# -- two gateways on one database -----------------------------------------------------------------


@contextlib.contextmanager
def two_clients(url_a: str, url_b: str) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    with (
        openai.OpenAI(base_url=url_a + "/v1", api_key="k", max_retries=0, timeout=15) as a,
        openai.OpenAI(base_url=url_b + "/v1", api_key="k", max_retries=0, timeout=15) as b,
    ):
        yield a, b


async def two_gateways(nursery: trio.Nursery, dsn: str, upstream: FakeUpstream) -> tuple[str, str]:
    """Two gateways (two pools, as two replicas) on one database; their base URLs."""
    (_, url_a), (_, url_b) = await two_replicas(nursery, dsn, upstream)
    return url_a, url_b


async def two_replicas(
    nursery: trio.Nursery, dsn: str, upstream: FakeUpstream
) -> tuple[tuple[Gateway, str], tuple[Gateway, str]]:
    """Two gateways (two pools, as two replicas) on one database, with their base URLs."""
    upstream_url = await serve_app(nursery, upstream)
    config = {
        "targets": {"m": {"url": upstream_url + "/v1", "open_responses": {"adapter": True}}},
        "store": {"kind": "postgres", "dsn": dsn, "pool_size": 2},
    }
    a = await start_gateway(nursery, config)
    b = await start_gateway(nursery, config)
    return a, b


@needs_postgres
async def test_a_response_made_by_one_gateway_is_retrieved_from_another(
    nursery: trio.Nursery, dsn: str
) -> None:
    url_a, url_b = await two_gateways(nursery, dsn, FakeUpstream(lambda rec: text_reply(rec)))
    with two_clients(url_a, url_b) as (a, b):
        made = await sdk(lambda: a.responses.create(model="m", input="Hi"))
        got = await sdk(lambda: b.responses.retrieve(made.id))
    assert made.status == "completed"
    assert (got.id, got.status, got.output_text) == (made.id, "completed", "Hello world")


@needs_postgres
async def test_a_background_response_is_resumed_on_another_gateway(
    nursery: trio.Nursery, dsn: str
) -> None:
    url_a, url_b = await two_gateways(nursery, dsn, FakeUpstream(lambda rec: text_reply(rec)))
    with two_clients(url_a, url_b) as (a, b):
        queued = await sdk(lambda: a.responses.create(model="m", input="x", background=True))
        with trio.fail_after(10):
            while (await sdk(lambda: b.responses.retrieve(queued.id))).status != "completed":
                await trio.sleep(0.05)

        def resume() -> list[Any]:
            with b.responses.retrieve(queued.id, stream=True, starting_after=3) as stream:
                return list(stream)

        events = await sdk(resume)
    assert [e.sequence_number for e in events] == list(range(4, len(BACKGROUND_EVENTS)))
    assert [e.type for e in events] == BACKGROUND_EVENTS[4:]


@needs_postgres
async def test_a_follow_up_on_another_gateway_replays_the_conversation(
    nursery: trio.Nursery, dsn: str
) -> None:
    upstream = FakeUpstream(lambda rec: text_reply(rec))
    url_a, url_b = await two_gateways(nursery, dsn, upstream)
    with two_clients(url_a, url_b) as (a, b):
        first = await sdk(lambda: a.responses.create(model="m", input="one"))
        second = await sdk(
            lambda: b.responses.create(model="m", input="two", previous_response_id=first.id)
        )
    assert second.status == "completed"
    messages = upstream.requests[-1].json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "Hello world" in orjson.dumps(messages[1]).decode()


@needs_postgres
@pytest.mark.parametrize("via", ["other-cancel", "other-delete", "owner-cancel"])
async def test_a_cancel_through_any_gateway_stops_the_loop_on_the_owner(
    nursery: trio.Nursery, dsn: str, via: str
) -> None:
    # The model streams 30 words 0.3 s apart (~9 s): the cancel must cut it short.
    upstream = FakeUpstream(lambda rec: text_reply(rec, " ".join("w" * 30), chunk_delay=0.3))
    (gw_a, url_a), (_, url_b) = await two_replicas(nursery, dsn, upstream)
    with two_clients(url_a, url_b) as (a, b):
        queued = await sdk(lambda: a.responses.create(model="m", input="x", background=True))
        with trio.fail_after(10):
            while not upstream.active:
                await trio.sleep(0.02)
        assert queued.id in gw_a.responses._live  # A runs it
        start = trio.current_time()
        if via == "other-delete":
            await sdk(lambda: b.responses.delete(queued.id))
        else:
            by = b if via == "other-cancel" else a
            cancelled = await sdk(lambda: by.responses.cancel(queued.id))
            assert cancelled.status == "cancelled"
        with trio.fail_after(10):
            while queued.id in gw_a.responses._live:  # A's loop ended and let go of it
                await trio.sleep(0.02)
        elapsed = trio.current_time() - start
        if via != "other-delete":
            for client in (a, b):
                got = await sdk(functools.partial(client.responses.retrieve, queued.id))
                assert got.status == "cancelled"
    assert elapsed < 3.0, elapsed  # within about a second (plus the cancel's own round trip)
    # The upstream saw its one request cut short, and no further model call was made.
    assert (upstream.active, upstream.finished, len(upstream.requests)) == (0, 0, 1)
    assert upstream.disconnected + upstream.cancelled == 1
    steps = PostgresStore(dsn)
    try:
        chain = await steps.list_chain(queued.id, None)
        loop_record = await steps.get_response(queued.id)
    finally:
        await steps.aclose()
    assert [s.state for s in chain] == [StepState.CANCELED]  # nothing left processing
    assert loop_record is not None and loop_record.status.value == "cancelled"
    responses = PostgresResponseStore(dsn)
    try:
        stored = await responses.get(queued.id)
    finally:
        await responses.aclose()
    if via == "other-delete":
        assert stored is None
    else:
        assert stored is not None and stored.status == "cancelled"


@needs_postgres
async def test_status_reads_only_the_status(dsn: str) -> None:
    store = PostgresResponseStore(dsn)
    try:
        assert await store.status("resp_1") is None
        await store.create(record("resp_1"))
        assert await store.status("resp_1") == "in_progress"
        await store.update("resp_1", {"id": "resp_1", "status": "cancelled", "output": []})
        assert await store.status("resp_1") == "cancelled"
        await store.delete("resp_1")
        assert await store.status("resp_1") is None
    finally:
        await store.aclose()
