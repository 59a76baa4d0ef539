"""Hot reload of a served gateway over loopback (real clock, a fast poll interval)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from onwards_trio import Gateway, parse_config
from onwards_trio._ops.metrics import Metrics, install_metrics
from onwards_trio._ops.reload import ConfigWatcher
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse

CHAT = "/v1/chat/completions"


def body(model: str = "gpt-4", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(doc))
    os.replace(tmp, path)


def read(path: Path) -> bytes:
    return path.read_bytes()


class Served:
    """A gateway served on loopback, watching ``path``."""

    def __init__(self, gateway: Gateway, url: str, watcher: ConfigWatcher) -> None:
        self.gateway = gateway
        self.client = httpx.AsyncClient(base_url=url, timeout=10)
        self.watcher = watcher

    async def reloaded(self, ok: int = 0, failed: int = 0) -> None:
        """Wait for the watcher to have applied/rejected that many versions."""
        with trio.fail_after(5):
            while (self.watcher.reloads_ok, self.watcher.reloads_failed) < (ok, failed):
                await trio.sleep(0.01)


async def serve_watching(nursery: trio.Nursery, path: Path, doc: dict[str, Any]) -> Served:
    write(path, doc)
    config = parse_config(read(path))
    gateway = Gateway(config)
    metrics = install_metrics(gateway, Metrics())
    info = await nursery.start(gateway.serve, "127.0.0.1", 0)
    watcher = ConfigWatcher(
        path, gateway.update_config, current=config, metrics=metrics, interval=0.02, settle=0.01
    )
    await nursery.start(watcher.run)
    return Served(gateway, info.url, watcher)


async def test_new_alias_is_routable_after_an_edit(tmp_path: Path, nursery: trio.Nursery) -> None:
    a, b = FakeUpstream(), FakeUpstream(Reply(body=chat_completion("from b")))
    url_a, url_b = await serve_app(nursery, a), await serve_app(nursery, b)
    path = tmp_path / "config.json"
    served = await serve_watching(nursery, path, {"targets": {"gpt-4": {"url": url_a}}})
    async with served.client as client:
        assert (await client.post(CHAT, json=body("claude"))).status_code == 404
        write(path, {"targets": {"gpt-4": {"url": url_a}, "claude": {"url": url_b}}})
        await served.reloaded(ok=1)
        r = await client.post(CHAT, json=body("claude"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "from b"


async def test_stream_in_flight_during_the_swap_completes_on_its_old_upstream(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    chunks = sse(*({"n": i} for i in range(5)))
    old = FakeUpstream(
        Reply(headers=[(b"content-type", b"text/event-stream")], chunks=chunks, chunk_delay=0.1)
    )
    new = FakeUpstream(Reply(body=chat_completion("new")))
    url_old, url_new = await serve_app(nursery, old), await serve_app(nursery, new)
    path = tmp_path / "config.json"
    served = await serve_watching(nursery, path, {"targets": {"gpt-4": {"url": url_old}}})
    async with served.client as client:
        async with client.stream("POST", CHAT, json=body(stream=True)) as r:
            received = b""
            async for chunk in r.aiter_bytes():
                if not received:  # mid-stream: swap the whole table under it
                    write(path, {"targets": {"gpt-4": {"url": url_new}}})
                    await served.reloaded(ok=1)
                received += chunk
        after = await client.post(CHAT, json=body())
    assert received == b"".join(chunks)
    assert after.json()["choices"][0]["message"]["content"] == "new"
    assert (len(old.requests), len(new.requests)) == (1, 1)


async def test_invalid_file_keeps_serving_then_a_valid_one_applies(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = FakeUpstream()
    url = await serve_app(nursery, up)
    path = tmp_path / "config.json"
    served = await serve_watching(nursery, path, {"targets": {"gpt-4": {"url": url}}})
    async with served.client as client:
        path.write_bytes(b'{"targets": {"gpt-4": {"url": 12}}}')
        await served.reloaded(failed=1)
        assert (await client.post(CHAT, json=body())).status_code == 200
        write(path, {"targets": {"renamed": {"url": url}}})
        await served.reloaded(ok=1, failed=1)
        gone = await client.post(CHAT, json=body())
        renamed = await client.post(CHAT, json=body("renamed"))
    assert (gone.status_code, renamed.status_code) == (404, 200)


async def test_concurrency_limit_counts_a_request_from_before_the_swap(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    release = trio.Event()

    async def hold(_scope: Any, receive: Any, send: Any) -> None:
        if _scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    url = await serve_app(nursery, hold)
    limited = {"url": url, "concurrency_limit": {"max_concurrent_requests": 1}}
    path = tmp_path / "config.json"
    served = await serve_watching(nursery, path, {"targets": {"gpt-4": limited}})
    async with served.client as client:
        async with client.stream("POST", CHAT, json=body(stream=True)) as held:
            chunks = held.aiter_bytes()  # keep a reference: a dropped iterator closes the stream
            await anext(chunks)
            write(path, {"targets": {"gpt-4": limited, "other": {"url": url}}})
            await served.reloaded(ok=1)
            refused = await client.post(CHAT, json=body())
            release.set()
            async for _ in chunks:
                pass
        with trio.fail_after(5):
            while served.gateway.targets.table.pools["gpt-4"].providers[0].concurrency.active:
                await trio.sleep(0.01)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded"


async def test_rate_limit_survives_an_unrelated_reload_and_resets_when_changed(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    up = FakeUpstream()
    url = await serve_app(nursery, up)
    limited = {"url": url, "rate_limit": {"requests_per_second": 0.001}}  # one token per 1000 s
    path = tmp_path / "config.json"
    served = await serve_watching(nursery, path, {"targets": {"gpt-4": limited}})
    async with served.client as client:
        first = await client.post(CHAT, json=body())
        write(path, {"targets": {"gpt-4": limited, "other": {"url": url}}})
        await served.reloaded(ok=1)
        same_limit = await client.post(CHAT, json=body())
        changed = {**limited, "rate_limit": {"requests_per_second": 0.001, "burst_size": 2}}
        write(path, {"targets": {"gpt-4": changed}})
        await served.reloaded(ok=2)
        new_limit = await client.post(CHAT, json=body())
    assert [first.status_code, same_limit.status_code, new_limit.status_code] == [200, 429, 200]
