"""The Metrics object: names, exact values, bounded labels, and the /metrics ASGI app."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from onwards_trio import Targets, parse_config
from onwards_trio._ops.metrics import (
    OTHER_ENDPOINT,
    Metrics,
    endpoint_label,
    serve_metrics,
)


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_two_instances_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.reload(ok=True)
    assert value(a, "onwards_config_reloads_total", result="ok") == 1
    assert value(b, "onwards_config_reloads_total", result="ok") == 0


def test_the_global_registry_is_untouched() -> None:
    from prometheus_client import REGISTRY

    Metrics(prefix="isolation_probe")
    assert (
        REGISTRY.get_sample_value("isolation_probe_config_reloads_total", {"result": "ok"}) is None
    )


def test_a_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    Metrics(registry=registry).reload(ok=False)
    assert registry.get_sample_value("onwards_config_reloads_total", {"result": "failed"}) == 1


@pytest.mark.parametrize("prefix", ["", "9lives", "with-dash", "a b", "onwärds", "a²"])
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid metrics prefix"):
        Metrics(prefix=prefix)


def test_http_counts_duration_and_pending() -> None:
    m = Metrics(prefix="gw")
    token = m.http_started("POST", "/v1/chat/completions")
    assert value(m, "gw_http_requests_pending", method="POST", endpoint="/v1/chat/completions") == 1
    assert value(m, "onwards_requests_inflight") == 1
    m.http_finished(token, 200, 0.25)
    labels = {"method": "POST", "status": "200", "endpoint": "/v1/chat/completions"}
    assert value(m, "gw_http_requests_total", **labels) == 1
    assert value(m, "gw_http_requests_duration_seconds_sum", **labels) == 0.25
    assert value(m, "gw_http_requests_pending", method="POST", endpoint="/v1/chat/completions") == 0
    assert value(m, "onwards_requests_inflight") == 0


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models", "/v1/models"),
        ("/v1/responses/resp_123", "/v1/responses/{id}"),
        ("/v1/responses/resp_123/cancel", "/v1/responses/{id}/cancel"),
        ("/v1/responses/resp_123/input_items", "/v1/responses/{id}/input_items"),
        ("/v1/models/gpt-4", "/v1/models/{model}"),
        ("/v1/secret-sk-abcdef/probe", OTHER_ENDPOINT),
        ("/wp-admin.php", OTHER_ENDPOINT),
        ("/v1/responses/x/delete-everything", OTHER_ENDPOINT),
    ],
)
def test_endpoint_label_is_bounded(path: str, label: str) -> None:
    assert endpoint_label(path) == label


def test_unknown_method_is_collapsed() -> None:
    m = Metrics()
    m.http_finished(m.http_started("BREW", "/v1/models"), 405, 0.0)
    labels = {"method": "OTHER", "status": "405", "endpoint": "/v1/models"}
    assert value(m, "onwards_http_requests_total", **labels) == 1


def test_unconfigured_alias_is_collapsed_once_a_table_is_bound() -> None:
    m = Metrics()
    m.bind_targets(Targets(parse_config({"targets": {"gpt-4": {"url": "https://a"}}})))
    m.rejected("gpt-4", "rate", "pool")
    m.rejected("sk-looks-like-a-key", "rate", "pool")
    assert (
        value(m, "onwards_limit_rejections_total", alias="gpt-4", limit="rate", scope="pool") == 1
    )
    unknown = {"alias": "unknown", "limit": "rate", "scope": "pool"}
    assert value(m, "onwards_limit_rejections_total", **unknown) == 1
    assert b"sk-looks-like-a-key" not in m.render()


def test_upstream_metrics_per_alias_and_provider() -> None:
    m = Metrics()
    m.upstream_response("a", 1, 200, 0.5)
    m.upstream_response("a", 1, 200, 1.5)
    m.upstream_response("a", 0, 503, 0.1)
    m.upstream_failure("a", 0, "timeout")
    m.first_byte("a", 1, 0.3)
    assert value(m, "onwards_upstream_requests_total", alias="a", provider="1", status="200") == 2
    assert value(m, "onwards_upstream_requests_total", alias="a", provider="0", status="503") == 1
    assert (
        value(m, "onwards_upstream_requests_total", alias="a", provider="0", status="timeout") == 1
    )
    assert value(m, "onwards_upstream_request_duration_seconds_sum", alias="a", provider="1") == 2.0
    assert (
        value(m, "onwards_upstream_time_to_first_byte_seconds_count", alias="a", provider="1") == 1
    )


def test_fallback_reasons_are_bounded() -> None:
    m = Metrics()
    m.fallback("a", 0, "timeout")
    m.fallback("a", 0, "something the caller invented")
    assert (
        value(m, "onwards_fallback_attempts_total", alias="a", provider="0", reason="timeout") == 1
    )
    assert value(m, "onwards_fallback_attempts_total", alias="a", provider="0", reason="other") == 1


def test_loop_steps_and_tool_calls_by_outcome() -> None:
    m = Metrics()
    m.loop_step("a", "model_call", "completed")
    m.loop_step("a", "tool_call", "failed")
    m.tool_call("a", "failed")
    m.tool_call("a", "failed")
    steps = "onwards_loop_steps_total"
    assert value(m, steps, alias="a", kind="model_call", outcome="completed") == 1
    assert value(m, steps, alias="a", kind="tool_call", outcome="failed") == 1
    assert value(m, "onwards_tool_calls_total", alias="a", outcome="failed") == 2


def test_inflight_gauges_are_read_from_the_live_table() -> None:
    config = {"targets": {"a": {"providers": [{"url": "https://x"}, {"url": "https://y"}]}}}
    targets = Targets(parse_config(config))
    m = Metrics()
    m.bind_targets(targets)
    permits = [targets.table.pools["a"].providers[1].concurrency.try_acquire() for _ in range(2)]
    assert value(m, "onwards_upstream_inflight", alias="a", provider="1") == 2
    assert value(m, "onwards_upstream_inflight", alias="a", provider="0") == 0
    assert value(m, "onwards_alias_inflight", alias="a") == 2
    for p in permits:
        assert p is not None
        p.release()
    assert value(m, "onwards_alias_inflight", alias="a") == 0


def test_reload_counts_and_timestamp() -> None:
    m = Metrics()
    m.reload(ok=True)
    m.reload(ok=False)
    m.reload(ok=False)
    assert value(m, "onwards_config_reloads_total", result="ok") == 1
    assert value(m, "onwards_config_reloads_total", result="failed") == 2
    stamp = value(m, "onwards_config_last_reload_success_timestamp_seconds")
    assert stamp is not None and stamp > 1.7e9


async def test_metrics_endpoint_over_a_socket(nursery: trio.Nursery) -> None:
    m = Metrics(prefix="scrape")
    m.reload(ok=True)
    url = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        ok = await client.get("/metrics")
        missing = await client.get("/v1/models")
        post = await client.post("/metrics")
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/plain")
    assert 'scrape_config_reloads_total{result="ok"} 1.0' in ok.text
    assert "onwards_requests_inflight 0.0" in ok.text
    assert missing.status_code == 404
    assert post.status_code == 405


async def test_metrics_endpoint_negotiates_openmetrics(nursery: trio.Nursery) -> None:
    m = Metrics()
    url = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_a_duration_on_a_bucket_bound_counts_in_that_bucket() -> None:
    m = Metrics()
    m.upstream_response("a", 0, 200, 0.25)
    m.upstream_response("a", 0, 200, 601.0)
    bucket = "onwards_upstream_request_duration_seconds_bucket"
    assert value(m, bucket, alias="a", provider="0", le="0.1") == 0
    assert value(m, bucket, alias="a", provider="0", le="0.25") == 1
    assert value(m, bucket, alias="a", provider="0", le="600.0") == 1
    assert value(m, bucket, alias="a", provider="0", le="+Inf") == 2
    assert value(m, "onwards_upstream_request_duration_seconds_count", alias="a", provider="0") == 2


def test_http_requests_total_is_the_duration_count() -> None:
    m = Metrics()
    m.http_finished(m.http_started("GET", "/v1/models"), 200, 0.01)
    m.observe_http("GET", "/v1/models", 200, 0.02)
    labels = {"method": "GET", "status": "200", "endpoint": "/v1/models"}
    assert value(m, "onwards_http_requests_total", **labels) == 2
    assert value(m, "onwards_http_requests_duration_seconds_count", **labels) == 2
    assert value(m, "onwards_http_requests_duration_seconds_bucket", le="0.01", **labels) == 1
