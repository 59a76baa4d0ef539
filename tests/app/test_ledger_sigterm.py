"""SIGTERM to a real ``onwards-trio`` process with the usage ledger on: every request it
answered (the one streaming while the signal came included) is in the store after it exits,
although the ledger's flush interval never came round: the shutdown wrote them."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio

from onwards_trio._proxy.ledger import UsageQuery
from onwards_trio._stores.base import UsageStore
from onwards_trio._stores.postgres import PostgresUsageStore
from onwards_trio._stores.sqlite import SqliteUsageStore
from tests.stores.test_store_postgres import fresh_schema, needs_postgres
from tests.support import (
    FakeUpstream,
    Recorded,
    Reply,
    chat_completion,
    cli_gateway,
    serve_app,
    sse,
)

pytestmark = [pytest.mark.slow]

PLAIN_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
STREAM_USAGE = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}


def script(rec: Recorded) -> Reply:
    if rec.json().get("stream"):
        chunks = sse(
            *({"choices": [{"index": 0, "delta": {"content": str(i)}}]} for i in range(6)),
            {"choices": [], "usage": STREAM_USAGE},
        )
        headers = [(b"content-type", b"text/event-stream")]
        return Reply(chunks=chunks, headers=headers, chunk_delay=0.1)
    return Reply(body=chat_completion(usage=PLAIN_USAGE))


@contextlib.asynccontextmanager
async def ledger_store(
    kind: str, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, Any], UsageStore]]:
    """The ``store`` config and the same store, opened by the test to read it afterwards."""
    if kind == "postgres":
        async with fresh_schema() as dsn:
            reader = PostgresUsageStore(dsn)
            try:
                yield {"kind": "postgres", "dsn": dsn}, reader
            finally:
                await reader.aclose()
        return
    path = tmp_path / "ledger.sqlite3"
    reader_sqlite = SqliteUsageStore(path)
    try:
        yield {"kind": "sqlite", "path": str(path)}, reader_sqlite
    finally:
        await reader_sqlite.aclose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=needs_postgres)])
async def test_every_answered_request_is_in_the_store_after_sigterm(
    kind: str, tmp_path: Path, nursery: trio.Nursery
) -> None:
    upstream = await serve_app(nursery, FakeUpstream(script))
    async with ledger_store(kind, tmp_path) as (store, reader):
        config = tmp_path / "config.json"
        config.write_bytes(
            orjson.dumps(
                {
                    "targets": {"m": {"url": upstream}},
                    "store": store,
                    "usage": {"ledger": True, "flush_interval_secs": 3600},
                }
            )
        )
        async with cli_gateway(config) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as client:
                plain = {"model": "m", "messages": []}
                answered = [await client.post("/v1/chat/completions", json=plain) for _ in "abc"]
                assert [r.status_code for r in answered] == [200] * 3
                streamed = {**plain, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=streamed) as r:
                    stream = r.aiter_bytes()
                    await anext(stream)
                    gateway.process.send_signal(signal.SIGTERM)
                    async for _ in stream:
                        pass
            with trio.fail_after(30):
                code = await gateway.process.wait()
        assert code == 0, "\n".join(gateway.lines)
        with trio.fail_after(30):
            rows = await reader.usage_rows(UsageQuery(0, 1e12), 0, 100)
    usage = [(r["input_tokens"], r["output_tokens"], r["streamed"]) for r in rows]
    assert usage == [(11, 7, False)] * 3 + [(13, 5, True)]
