"""Metrics after known traffic through a real gateway, scraped from a real /metrics listener."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from onwards_trio import Gateway
from onwards_trio._ops.metrics import Metrics, install_metrics, serve_metrics
from tests.support import FakeUpstream, Reply, chat_completion, serve_app, sse, start_gateway

CHAT = "/v1/chat/completions"


async def gateway(
    nursery: trio.Nursery, targets: dict[str, Any], **config: Any
) -> tuple[httpx.AsyncClient, httpx.AsyncClient, Metrics]:
    """A gateway with metrics installed, its client, and a client for its metrics port."""
    gw, url = await start_gateway(nursery, {"targets": targets, **config})
    metrics = install_metrics(gw, Metrics())
    metrics_url = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
    return (
        httpx.AsyncClient(base_url=url, timeout=10),
        httpx.AsyncClient(base_url=metrics_url, timeout=10),
        metrics,
    )


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(
    scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


async def settle(metrics: Metrics, name: str, labels: dict[str, str], want: float) -> None:
    """Wait until the gateway recorded ``want`` (it records after the client got its reply)."""
    with trio.fail_after(5):
        while (metrics.registry.get_sample_value(name, labels) or 0.0) < want:
            await trio.sleep(0.005)


def body(model: str = "gpt-4", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_v1_models_requests_are_counted_exactly(nursery: trio.Nursery) -> None:
    """onwards test_metrics_server_for_v1_models: +1 after one request, 11 after ten more."""
    client, scraper, metrics = await gateway(nursery, {"gpt-4": {"url": "https://x.example"}})
    labels = {"method": "GET", "status": "200", "endpoint": "/v1/models"}
    async with client, scraper:
        assert (await client.get("/v1/models")).status_code == 200
        await settle(metrics, "onwards_http_requests_total", labels, 1)
        assert sample(await scrape(scraper), "onwards_http_requests_total", **labels) == 1
        for _ in range(10):
            await client.get("/v1/models")
        await settle(metrics, "onwards_http_requests_total", labels, 11)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_http_requests_total", **labels) == 11
    assert sample(scraped, "onwards_http_requests_duration_seconds_count", **labels) == 11


async def test_missing_target_404s_are_counted_exactly(nursery: trio.Nursery) -> None:
    """onwards test_metrics_server_for_missing_targets."""
    client, scraper, metrics = await gateway(nursery, {"gpt-4": {"url": "https://x.example"}})
    labels = {"method": "POST", "status": "404", "endpoint": CHAT}
    async with client, scraper:
        for _ in range(11):
            assert (await client.post(CHAT, json=body("missing"))).status_code == 404
        await settle(metrics, "onwards_http_requests_total", labels, 11)
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_http_requests_total", **labels) == 11


async def test_unknown_routes_and_aliases_never_become_label_values(
    nursery: trio.Nursery,
) -> None:
    up = FakeUpstream()
    client, scraper, metrics = await gateway(
        nursery, {"gpt-4": {"url": await serve_app(nursery, up)}}
    )
    async with client, scraper:
        await client.post("/v1/private-route-sk-abc123", json=body())
        await client.post(CHAT, json=body("made-up-alias-xyz"))
        labels = {"method": "POST", "status": "200", "endpoint": "other"}
        await settle(metrics, "onwards_http_requests_total", labels, 1)
        text = (await scraper.get("/metrics")).text
    assert "private-route" not in text
    assert "made-up-alias-xyz" not in text


async def test_fallback_attempts_are_counted_by_reason(nursery: trio.Nursery) -> None:
    bad = FakeUpstream(Reply(status=500, body=b'{"error": "boom"}'))
    good = FakeUpstream(Reply(body=chat_completion()))
    pool = {
        "strategy": "priority",
        "fallback": {"enabled": True, "on_status": [500]},
        "providers": [
            {"url": await serve_app(nursery, bad)},
            {"url": await serve_app(nursery, good)},
        ],
    }
    client, scraper, _ = await gateway(nursery, {"gpt-4": pool})
    async with client, scraper:
        for _ in range(3):
            assert (await client.post(CHAT, json=body())).status_code == 200
        scraped = await scrape(scraper)
    name = "onwards_fallback_attempts_total"
    assert sample(scraped, name, alias="gpt-4", provider="0", reason="status") == 3
    assert sample(scraped, name, alias="gpt-4", provider="1", reason="status") == 0


async def test_inflight_per_alias_and_provider_while_a_stream_is_open(
    nursery: trio.Nursery,
) -> None:
    slow = FakeUpstream(
        Reply(
            headers=[(b"content-type", b"text/event-stream")],
            chunks=sse({"n": 1}, {"n": 2}),
            chunk_delay=0.5,
        )
    )
    client, scraper, _ = await gateway(nursery, {"gpt-4": {"url": await serve_app(nursery, slow)}})
    async with client, scraper:
        async with client.stream("POST", CHAT, json=body(stream=True)) as r:
            chunks = r.aiter_bytes()  # keep a reference: a dropped iterator closes the stream
            await anext(chunks)  # the stream is open: first bytes arrived
            during = await scrape(scraper)
            async for _ in chunks:
                pass
        with trio.fail_after(5):
            while sample(await scrape(scraper), "onwards_alias_inflight", alias="gpt-4"):
                await trio.sleep(0.01)
    assert sample(during, "onwards_upstream_inflight", alias="gpt-4", provider="0") == 1
    assert sample(during, "onwards_alias_inflight", alias="gpt-4") == 1


async def test_config_reloads_appear_on_the_scrape(nursery: trio.Nursery) -> None:
    client, scraper, metrics = await gateway(nursery, {"gpt-4": {"url": "https://x.example"}})
    metrics.reload(ok=True)
    metrics.reload(ok=False)
    async with client, scraper:
        scraped = await scrape(scraper)
    assert sample(scraped, "onwards_config_reloads_total", result="ok") == 1
    assert sample(scraped, "onwards_config_reloads_total", result="failed") == 1


async def test_pending_and_inflight_gauges_while_a_stream_is_open(nursery: trio.Nursery) -> None:
    slow = FakeUpstream(
        Reply(
            headers=[(b"content-type", b"text/event-stream")],
            chunks=sse({"n": 1}, {"n": 2}),
            chunk_delay=0.5,
        )
    )
    client, scraper, metrics = await gateway(
        nursery, {"gpt-4": {"url": await serve_app(nursery, slow)}}
    )
    async with client, scraper:
        async with client.stream("POST", CHAT, json=body(stream=True)) as r:
            chunks = r.aiter_bytes()
            await anext(chunks)
            during = await scrape(scraper)
            async for _ in chunks:
                pass
        await settle(
            metrics,
            "onwards_http_requests_total",
            {"method": "POST", "status": "200", "endpoint": CHAT},
            1,
        )
        after = await scrape(scraper)
    pending = {"method": "POST", "endpoint": CHAT}
    assert sample(during, "onwards_http_requests_pending", **pending) == 1
    assert sample(during, "onwards_requests_inflight") == 1
    assert sample(after, "onwards_http_requests_pending", **pending) == 0
    assert sample(after, "onwards_requests_inflight") == 0
    ttfb = "onwards_upstream_time_to_first_byte_seconds_count"
    assert sample(after, ttfb, alias="gpt-4", provider="0") == 1


async def test_upstream_requests_by_status_and_limit_rejections(nursery: trio.Nursery) -> None:
    up = FakeUpstream([Reply(body=chat_completion()), Reply(status=503, body=b"{}")])
    pool = {
        "url": await serve_app(nursery, up),
        "rate_limit": {"requests_per_second": 0.001, "burst_size": 2},
    }
    client, scraper, _ = await gateway(nursery, {"gpt-4": pool})
    async with client, scraper:
        statuses = [(await client.post(CHAT, json=body())).status_code for _ in range(3)]
        scraped = await scrape(scraper)
    assert statuses == [200, 503, 429]
    name = "onwards_upstream_requests_total"
    assert sample(scraped, name, alias="gpt-4", provider="0", status="200") == 1
    assert sample(scraped, name, alias="gpt-4", provider="0", status="503") == 1
    rejections = "onwards_limit_rejections_total"
    assert sample(scraped, rejections, alias="gpt-4", limit="rate", scope="provider") == 1
    latency = "onwards_upstream_request_duration_seconds_count"
    assert sample(scraped, latency, alias="gpt-4", provider="0") == 2


async def test_loop_steps_and_tool_calls_are_counted_by_outcome(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    from onwards_trio._app.demo import demo_config, demo_upstream

    upstream = await serve_app(nursery, demo_upstream(delay=0))
    gw = Gateway(demo_config(upstream, store_path=str(tmp_path / "m.sqlite3")))
    metrics = install_metrics(gw, Metrics())
    info = await nursery.start(gw.serve, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=info.url, timeout=10) as client:
        r = await client.post(
            "/v1/responses", json={"model": "demo", "input": "What is the weather in Oslo?"}
        )
    assert r.status_code == 200 and r.json()["status"] == "completed"
    steps = "onwards_loop_steps_total"
    await settle(metrics, steps, {"alias": "demo", "kind": "model_call", "outcome": "completed"}, 2)
    value = metrics.registry.get_sample_value
    assert value(steps, {"alias": "demo", "kind": "model_call", "outcome": "completed"}) == 2
    assert value(steps, {"alias": "demo", "kind": "tool_call", "outcome": "completed"}) == 1
    assert value("onwards_tool_calls_total", {"alias": "demo", "outcome": "completed"}) == 1
